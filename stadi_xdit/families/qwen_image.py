"""Qwen-Image: the family's declaration (runtime: `stadi_xdit.models.qwen_image`).

Model presets: `tiny` and `small`, built without the Qwen2.5-VL text encoder (stand-in embeddings).
The runner model "Qwen-Image" loads Qwen/Qwen-Image: its tiny hub-cache recipe adds a one-layer
Qwen2.5-VL and a byte-level tokenizer, so the runner's own prompt encoding runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from stadi_xdit.families import ConformanceCase, ExampleChoice, FamilySpec, HubModel


@dataclass(frozen=True)
class QwenImagePreset:
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    axes_dims_rope: tuple[int, int, int]  # sums to attention_head_dim
    latent_channels: int  # VAE z_dim; the transformer sees 4x that (2x2 packing)


QWEN_IMAGE_PRESETS: dict[str, QwenImagePreset] = {
    "tiny": QwenImagePreset(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                            axes_dims_rope=(4, 6, 6), latent_channels=4),
    "small": QwenImagePreset(num_layers=6, num_attention_heads=4, attention_head_dim=64, joint_attention_dim=64,
                             axes_dims_rope=(8, 28, 28), latent_channels=16),
}



def build_qwen_image_pipeline(preset: str | QwenImagePreset = "tiny", seed: int = 0):
    """A float32 CPU Qwen-Image pipeline with random weights seeded by ``seed``, without text encoder.

    Qwen2.5-VL is not built: pass ``prompt_embeds`` (and ``prompt_embeds_mask``, negatives for true
    CFG), e.g. from ``random_prompt_embeds(preset.joint_attention_dim)``.
    """
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    spec = QWEN_IMAGE_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * spec.latent_channels, out_channels=spec.latent_channels,
        num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.joint_attention_dim,
        axes_dims_rope=spec.axes_dims_rope,
    ).eval()
    # Three temporal-downsample flags give the real 8x spatial scale; identity latent statistics.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=spec.latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=[0.0] * spec.latent_channels,
                                 latents_std=[1.0] * spec.latent_channels).eval()
    # Qwen-Image's released scheduler: dynamic (exponential) shifting with mu from the image size.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)


def qwen_image_stand_in_text(pipeline, seed: int) -> dict:
    """Stand-in prompt embeddings of the joint width, with their mask (no negative: no CFG)."""
    import torch

    from stadi_xdit.families.components import random_prompt_embeds

    text = random_prompt_embeds(pipeline.transformer.config.joint_attention_dim, seed=seed)
    return {"prompt_embeds": text, "prompt_embeds_mask": torch.ones(text.shape[:2], dtype=torch.long)}


def _byte_level_alphabet() -> list[str]:
    """The 256 characters byte-level BPE maps bytes to (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def tiny_qwen2_5_vl(hidden_size: int):
    """A Qwen2.5-VL text encoder of width ``hidden_size`` and a byte-level BPE tokenizer with no merges."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for ch in _byte_level_alphabet():  # every byte is one token: any text encodes
        vocab[ch] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    heads, head_dim = 2, hidden_size // 2
    quarter = head_dim // 4  # mrope sections (t, h, w) cover head_dim / 2 rotary pairs
    text = {
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": 1,
        "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
        "rope_scaling": {"type": "mrope", "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden_size,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [0],
              "window_size": 56}
    # image/video token ids past the vocabulary: text-only prompts never contain them
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tokenizer),
                              image_token_id=len(tokenizer) + 1, video_token_id=len(tokenizer) + 2,
                              vision_start_token_id=len(tokenizer) + 3)
    return tokenizer, Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_hub_pipeline():
    """Qwen-Image as the runner loads it: the tiny pipeline with a tiny Qwen2.5-VL text encoder."""
    from diffusers import QwenImagePipeline

    pipe = build_qwen_image_pipeline("tiny")
    tokenizer, text_encoder = tiny_qwen2_5_vl(QWEN_IMAGE_PRESETS["tiny"].joint_attention_dim)
    return QwenImagePipeline(scheduler=pipe.scheduler, vae=pipe.vae, transformer=pipe.transformer,
                             text_encoder=text_encoder, tokenizer=tokenizer)


def qwen_image_conformance_inputs() -> dict:
    """112x80 px: 7 packed token rows (odd) by 5 columns; Qwen's centred RoPE makes every row's position
    depend on the full image. True CFG with text of 6 (one padded) and 4 tokens: the batched pair is
    padded and masked."""
    import torch

    from stadi_xdit.families.components import random_prompt_embeds

    width = QWEN_IMAGE_PRESETS["tiny"].joint_attention_dim
    return {"prompt_embeds": random_prompt_embeds(width, seq_len=6, seed=2),
            "prompt_embeds_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
            "negative_prompt_embeds": random_prompt_embeds(width, seq_len=4, seed=3),
            "true_cfg_scale": 4.0, "height": 112, "width": 80, "num_inference_steps": 6}


SPEC = FamilySpec(
    name="qwen_image",
    presets=QWEN_IMAGE_PRESETS,
    hub_models=(HubModel("Qwen-Image", "Qwen/Qwen-Image", qwen_image_hub_pipeline),),
    # xfuser 0.7.0 has no Qwen-Image wrapper: the example builds the plugin's (`models.qwen_image`).
    examples=(ExampleChoice("qwen-image", "stadi_xdit.models.qwen_image:xFuserQwenImagePipeline",
                            "QwenImagePipeline", lambda preset, text: build_qwen_image_pipeline(preset),
                            qwen_image_stand_in_text, text_presets=(), has_cfg=False),),
    conformance=(ConformanceCase("stadi_xdit.models.qwen_image:StadiQwenImagePipeline", build_qwen_image_pipeline,
                                qwen_image_conformance_inputs, rows=7),),
)
