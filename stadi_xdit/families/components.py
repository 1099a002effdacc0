"""Tiny components the offline pipelines share: text encoders with in-memory tokenizers, a VAE, stand-in text.

No hub access is possible on our machines, so every pipeline is built from configs with random,
seeded weights: each family's declaration (`stadi_xdit/families/<name>.py`) builds its tiny, small
and real-size pipelines from the real diffusers architectures and these parts, and callers that skip
the text encoders pass `random_prompt_embeds` as ``prompt_embeds``.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

__all__ = ["random_prompt_embeds", "tiny_clip", "tiny_clip_with_projection", "tiny_t5", "tiny_umt5", "tiny_vae"]


def tiny_t5(d_model: int, num_layers: int) -> tuple[T5Tokenizer, T5EncoderModel]:
    # A unigram vocabulary given in memory: T5Tokenizer(vocab=...) needs no sentencepiece file.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits]
    pieces += [("\u2581" + ch, -2.5) for ch in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=2, relative_attention_num_buckets=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_clip(hidden_size: int) -> tuple[CLIPTokenizer, CLIPTextModel]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tokenizer, CLIPTextModel(config).eval()


def tiny_clip_with_projection(hidden_size: int, max_length: int):
    """CLIP text encoder with a projection head (SD3's pooled embedding), on `tiny_clip`'s vocabulary."""
    from transformers import CLIPTextModelWithProjection

    tokenizer, plain = tiny_clip(hidden_size)
    tokenizer.model_max_length = max_length  # SD3 pads CLIP prompts to this; 77 would dominate tiny runs
    return tokenizer, CLIPTextModelWithProjection(plain.config).eval()


def tiny_umt5(d_model: int, num_layers: int):
    """UMT5 encoder (Wan's text encoder family) on `tiny_t5`'s in-memory unigram vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer, _ = tiny_t5(d_model, 1)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=num_layers,
                        num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    return tokenizer, UMT5EncoderModel(config).eval()


def tiny_vae(latent_channels: int, **extra: float) -> AutoencoderKL:
    # Four blocks give the real 8x spatial scale, with very few channels.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, **extra,
    ).eval()


def random_prompt_embeds(channels: int, seq_len: int = 8, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Stand-in text embeddings for presets run without a text encoder."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, channels, generator=generator)
