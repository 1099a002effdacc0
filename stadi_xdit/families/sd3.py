"""Stable Diffusion 3 / 3.5: the family's declaration (runtime: `stadi_xdit.models.sd3`).

Model presets: `tiny` (one SD3.5-medium style dual-attention block) and `small`. The runner model
"SD3.5" loads stabilityai/stable-diffusion-3.5-large, which has no dual-attention blocks: its tiny
hub-cache recipe drops them and has both CLIPs and the T5.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from stadi_xdit.families import ConformanceCase, ExampleChoice, FamilySpec, HubModel


@dataclass(frozen=True)
class SD3Preset:
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int  # T5 width; CLIP hidden states are zero-padded up to it
    clip_hidden_size: int  # each of the two CLIPs; pooled projection is twice this
    sample_size: int  # default latent size
    pos_embed_max_size: int
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5-medium style `attn2` blocks
    qk_norm: str | None = "rms_norm"


SD3_PRESETS: dict[str, SD3Preset] = {
    # pos_embed_max_size above the test grids, so the centred crop has non-zero offsets.
    "tiny": SD3Preset(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
                      clip_hidden_size=8, sample_size=8, pos_embed_max_size=12, dual_attention_layers=(0,)),
    "small": SD3Preset(num_layers=6, num_attention_heads=4, attention_head_dim=64, joint_attention_dim=64,
                       clip_hidden_size=16, sample_size=64, pos_embed_max_size=96, dual_attention_layers=(0, 1, 2)),
}


def build_sd3_pipeline(preset: str | SD3Preset = "tiny", seed: int = 0, with_text_encoder: bool = True,
                       clip_max_length: int = 16):
    """A float32 CPU Stable Diffusion 3.5 pipeline (two CLIPs + T5) with random weights seeded by ``seed``.

    With ``with_text_encoder=False`` all three encoders are left out: pass ``prompt_embeds``,
    ``pooled_prompt_embeds`` and, with CFG, their negative twins.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from stadi_xdit.families.components import tiny_clip_with_projection, tiny_t5, tiny_vae

    spec = SD3_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size, patch_size=2, in_channels=16, out_channels=16,
        num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.joint_attention_dim,
        caption_projection_dim=spec.num_attention_heads * spec.attention_head_dim,
        pooled_projection_dim=2 * spec.clip_hidden_size, pos_embed_max_size=spec.pos_embed_max_size,
        dual_attention_layers=spec.dual_attention_layers, qk_norm=spec.qk_norm,
    ).eval()
    encoders: dict[str, object] = dict.fromkeys(
        ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3"))
    if with_text_encoder:
        encoders["tokenizer"], encoders["text_encoder"] = tiny_clip_with_projection(spec.clip_hidden_size,
                                                                                    clip_max_length)
        encoders["tokenizer_2"], encoders["text_encoder_2"] = tiny_clip_with_projection(spec.clip_hidden_size,
                                                                                        clip_max_length)
        encoders["tokenizer_3"], encoders["text_encoder_3"] = tiny_t5(spec.joint_attention_dim, 1)
    # SD3's VAE: 16 latent channels, shift and scale of the released checkpoints, no quant convs.
    vae = tiny_vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                    use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **encoders)


def sd3_stand_in_text(pipeline, seed: int) -> dict:
    """Stand-in joint text and pooled embeddings, and zero negatives for the CFG branch."""
    import torch

    from stadi_xdit.families.components import random_prompt_embeds

    config = pipeline.transformer.config
    text = random_prompt_embeds(config.joint_attention_dim, seed=seed)
    pooled = random_prompt_embeds(config.pooled_projection_dim, seq_len=1, seed=seed)[:, 0]
    return {"prompt_embeds": text, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": torch.zeros_like(text),
            "negative_pooled_prompt_embeds": torch.zeros_like(pooled)}


def sd35_large_hub_pipeline():
    """SD3.5-large as the runner loads it: no dual-attention (attn2) blocks, every text encoder."""
    return build_sd3_pipeline(replace(SD3_PRESETS["tiny"], dual_attention_layers=()))


def sd3_conformance_inputs() -> dict:
    """112x80 px: 7 token rows (odd) by 5 columns; the tiny 12x12 position table is cropped at an offset, so
    wrong band positions would show. CFG as a batch of two; text = 16 CLIP + 8 T5 tokens."""
    return {"prompt": "a red cat", "negative_prompt": "blurry", "height": 112, "width": 80, "num_inference_steps": 6,
            "guidance_scale": 4.0, "max_sequence_length": 8}


SPEC = FamilySpec(
    name="sd3",
    presets=SD3_PRESETS,
    hub_models=(HubModel("SD3.5", "stabilityai/stable-diffusion-3.5-large", sd35_large_hub_pipeline),),
    examples=(ExampleChoice("sd3", "xfuser:xFuserStableDiffusion3Pipeline", "StableDiffusion3Pipeline",
                            lambda preset, text: build_sd3_pipeline(preset, with_text_encoder=text),
                            sd3_stand_in_text, tiny_text_tokens=16),),
    conformance=(ConformanceCase("stadi_xdit.models.sd3:StadiStableDiffusion3Pipeline", build_sd3_pipeline,
                                sd3_conformance_inputs, rows=7),),
)
