"""Offline diffusers pipelines with the real architectures and random, seeded weights.

No hub access is possible on our machines, so every pipeline here is built from configs:
``tiny`` presets for tests, real-size presets (same layer shapes as the released checkpoints)
for benchmarks. Text goes through a tiny T5 (and CLIP for Flux) whose tokenizers are built
in memory, or callers skip the encoders and pass ``prompt_embeds`` directly.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "FLUX_PRESETS",
    "PIXART_PRESETS",
    "FluxPreset",
    "PixArtPreset",
    "build_flux_pipeline",
    "build_pixart_pipeline",
    "random_prompt_embeds",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
]


@dataclass(frozen=True)
class PixArtPreset:
    """Transformer shape of a PixArt model; the real ones match the released checkpoints."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    caption_channels: int
    sample_size: int
    interpolation_scale: int | None = None
    use_additional_conditions: bool = False
    # The tiny text encoder width; real presets skip text encoding and use prompt_embeds.
    text_encoder_layers: int = 1


@dataclass(frozen=True)
class FluxPreset:
    num_layers: int
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    pooled_projection_dim: int
    axes_dims_rope: tuple[int, int, int]
    latent_channels: int
    guidance_embeds: bool = False


PIXART_PRESETS: dict[str, PixArtPreset] = {
    "tiny": PixArtPreset(num_layers=2, num_attention_heads=2, attention_head_dim=8, caption_channels=32,
                         sample_size=16),
    # Calibrated for stadi-bench: one step (CFG batch 2) at 512 px takes 0.60-0.72 s on one core of the
    # 2-vCPU dev machine (20.3 M params, ~133 GFLOP/s); K/V exchange is ~10 % of a 2-rank step.
    "small": PixArtPreset(num_layers=8, num_attention_heads=6, attention_head_dim=64, caption_channels=64,
                          sample_size=64),
    "pixart-alpha-1024": PixArtPreset(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                      caption_channels=4096, sample_size=128,
                                      use_additional_conditions=True),
    "pixart-sigma-1024": PixArtPreset(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                      caption_channels=4096, sample_size=128, interpolation_scale=2),
}

FLUX_PRESETS: dict[str, FluxPreset] = {
    "tiny": FluxPreset(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=8,
                       joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
                       latent_channels=4),
    "small": FluxPreset(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
                        joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28),
                        latent_channels=16),
    "flux-dev-1024": FluxPreset(num_layers=19, num_single_layers=38, num_attention_heads=24,
                                attention_head_dim=128, joint_attention_dim=4096, pooled_projection_dim=768,
                                axes_dims_rope=(16, 56, 56), latent_channels=16, guidance_embeds=True),
}


def _tiny_t5(d_model: int, num_layers: int) -> tuple[T5Tokenizer, T5EncoderModel]:
    # A unigram vocabulary given in memory: T5Tokenizer(vocab=...) needs no sentencepiece file.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits]
    pieces += [("\u2581" + ch, -2.5) for ch in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=2, relative_attention_num_buckets=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


def _tiny_clip(hidden_size: int) -> tuple[CLIPTokenizer, CLIPTextModel]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tokenizer, CLIPTextModel(config).eval()


def _tiny_vae(latent_channels: int, **extra: float) -> AutoencoderKL:
    # Four blocks give the real 8x spatial scale, with very few channels.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, **extra,
    ).eval()


def build_pixart_pipeline(preset: str | PixArtPreset = "tiny", variant: str = "alpha", seed: int = 0,
                          with_text_encoder: bool = True) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    """A float32 CPU PixArt-α/Σ pipeline with random weights seeded by ``seed``.

    With ``with_text_encoder=False`` the tokenizer and T5 are left out (pass ``prompt_embeds``).
    """
    if variant not in ("alpha", "sigma"):
        raise ValueError(f"variant must be 'alpha' or 'sigma', got {variant!r}")
    spec = PIXART_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=spec.num_layers,
        cross_attention_dim=spec.num_attention_heads * spec.attention_head_dim,
        caption_channels=spec.caption_channels,
        sample_size=spec.sample_size,
        patch_size=2,
        norm_num_groups=32,
        interpolation_scale=spec.interpolation_scale,
        use_additional_conditions=spec.use_additional_conditions,
    ).eval()
    tokenizer, text_encoder = (_tiny_t5(spec.caption_channels, spec.text_encoder_layers)
                               if with_text_encoder else (None, None))
    scheduler = DPMSolverMultistepScheduler()
    pipeline_cls = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    return pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(4),
                        transformer=transformer, scheduler=scheduler)


def build_flux_pipeline(preset: str | FluxPreset = "tiny", seed: int = 0,
                        with_text_encoder: bool = True) -> FluxPipeline:
    """A float32 CPU Flux.1 pipeline with random weights seeded by ``seed``."""
    spec = FLUX_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec.latent_channels * 4,  # 2x2 latent packing
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.joint_attention_dim,
        pooled_projection_dim=spec.pooled_projection_dim,
        guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=spec.axes_dims_rope,
    ).eval()
    if with_text_encoder:
        tokenizer, text_encoder = _tiny_clip(spec.pooled_projection_dim)
        tokenizer_2, text_encoder_2 = _tiny_t5(spec.joint_attention_dim, 1)
    else:
        tokenizer = text_encoder = tokenizer_2 = text_encoder_2 = None
    vae = _tiny_vae(spec.latent_channels, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False,
                    use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def tiny_pixart_pipeline(variant: str = "alpha", seed: int = 0) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    return build_pixart_pipeline("tiny", variant=variant, seed=seed)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    return build_flux_pipeline("tiny", seed=seed)


def random_prompt_embeds(channels: int, seq_len: int = 8, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Stand-in text embeddings for presets run without a text encoder."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, channels, generator=generator)
