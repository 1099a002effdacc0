"""Flux.1: the family's declaration (runtime: `stadi_xdit.models.flux`).

Model presets: `tiny` for tests, `small` for CPU runs, and FLUX.1-dev's transformer shape
(`flux-dev-1024`). The runner model "FLUX.1-dev" loads black-forest-labs/FLUX.1-dev: its tiny
hub-cache recipe has both text encoders (CLIP + T5).
"""

from __future__ import annotations

from dataclasses import dataclass

from stadi_xdit.families import ExampleChoice, FamilySpec, HubModel


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



def flux_transformer(preset: str | FluxPreset = "tiny"):
    """The preset's `FluxTransformer2DModel` with random weights (none allocated on the meta device)."""
    from diffusers import FluxTransformer2DModel

    spec = FLUX_PRESETS[preset] if isinstance(preset, str) else preset
    return FluxTransformer2DModel(
        patch_size=1, in_channels=spec.latent_channels * 4,  # 2x2 latent packing
        num_layers=spec.num_layers, num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim, num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.joint_attention_dim, pooled_projection_dim=spec.pooled_projection_dim,
        guidance_embeds=spec.guidance_embeds, axes_dims_rope=spec.axes_dims_rope)


def build_flux_pipeline(preset: str | FluxPreset = "tiny", seed: int = 0,
                        with_text_encoder: bool = True):
    """A float32 CPU Flux.1 pipeline with random weights seeded by ``seed``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from stadi_xdit.offline.components import tiny_clip, tiny_t5, tiny_vae

    spec = FLUX_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = flux_transformer(spec).eval()
    if with_text_encoder:
        tokenizer, text_encoder = tiny_clip(spec.pooled_projection_dim)
        tokenizer_2, text_encoder_2 = tiny_t5(spec.joint_attention_dim, 1)
    else:
        tokenizer = text_encoder = tokenizer_2 = text_encoder_2 = None
    vae = tiny_vae(spec.latent_channels, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False,
                   use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def tiny_flux_pipeline(seed: int = 0):
    return build_flux_pipeline("tiny", seed=seed)


def flux_stand_in_text(pipeline, seed: int) -> dict:
    """Stand-in T5 and pooled CLIP embeddings of the transformer's widths (Flux-dev: no CFG branch)."""
    from stadi_xdit.offline.components import random_prompt_embeds

    config = pipeline.transformer.config
    pooled = random_prompt_embeds(config.pooled_projection_dim, seq_len=1, seed=seed)[:, 0]
    text = random_prompt_embeds(config.joint_attention_dim, seed=seed)
    return {"prompt_embeds": text, "pooled_prompt_embeds": pooled}


SPEC = FamilySpec(
    name="flux",
    runtime="stadi_xdit.models.flux",
    presets=FLUX_PRESETS,
    hub_models=(HubModel("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", tiny_flux_pipeline),),
    examples=(ExampleChoice("flux", "xfuser:xFuserFluxPipeline", "FluxPipeline",
                            lambda preset, text: build_flux_pipeline(preset, with_text_encoder=text),
                            flux_stand_in_text, has_cfg=False, tiny_text_tokens=16),),
)
