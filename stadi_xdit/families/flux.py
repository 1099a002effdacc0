"""Flux.1: the family's declaration (runtime: `stadi_xdit.models.flux`).

Model presets: `tiny` for tests, `small` for CPU runs, and FLUX.1-dev's transformer shape
(`flux-dev-1024`). The runner model "FLUX.1-dev" loads black-forest-labs/FLUX.1-dev: its tiny
hub-cache recipe has both text encoders (CLIP + T5).
"""

from __future__ import annotations

from dataclasses import dataclass

from stadi_xdit.families import BenchModel, BenchShape, ConformanceCase, ExampleChoice, FamilySpec, HubModel
from stadi_xdit.families.bench_preset import BenchPreset
from stadi_xdit.geometry import TOKEN_ROW_PX


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

    from stadi_xdit.families.components import tiny_clip, tiny_t5, tiny_vae

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
    from stadi_xdit.families.components import random_prompt_embeds

    config = pipeline.transformer.config
    pooled = random_prompt_embeds(config.pooled_projection_dim, seq_len=1, seed=seed)[:, 0]
    text = random_prompt_embeds(config.joint_attention_dim, seed=seed)
    return {"prompt_embeds": text, "pooled_prompt_embeds": pooled}


class FluxBench(BenchPreset):
    """Flux under `stadi-bench`: joint attention over image and text tokens, guidance distilled (one branch)."""

    # xDiT's in-tree caches for Flux.1 (its runner lists teacache for FLUX.1-dev; fbcache is the same in-tree
    # engine's first-block form, which xDiT's scripts apply to Flux).
    step_caches = ("teacache", "fbcache")

    @property
    def layers(self) -> int:
        return self.spec.num_layers + self.spec.num_single_layers

    @property
    def text_channels(self) -> int:
        return self.spec.joint_attention_dim

    @property
    def cfg_batch(self) -> int:
        return 1

    def forward_flops(self, height: int, width: int | None = None, batch: int | None = None) -> float:
        """FLOPs (2 per multiply-add) of one denoising step's transformer work.

        Joint attention runs the S text tokens through every block with the N image tokens: per token
        of the joint sequence and layer, projections and MLP ``2 * 12 h^2`` and attention ``2 * 2 (N + S) h``.
        Norms, embeddings and the final layer are left out (a few %).
        """
        width = width or self.width(height)
        batch = batch if batch is not None else self.cfg_batch
        seq = (height // TOKEN_ROW_PX) * (width // TOKEN_ROW_PX) + self.text_tokens
        h = self.hidden
        return float(batch * self.layers * seq * 2 * (12 * h * h + 2 * seq * h))

    def build_pipeline(self, seed: int = 0):
        return build_flux_pipeline(self.spec, seed=seed, with_text_encoder=False)

    def call_kwargs(self, height: int, steps: int, seed: int, device: str = "cpu", dtype=None) -> dict:
        import torch

        from stadi_xdit.families.components import random_prompt_embeds

        dtype = dtype or torch.float32
        embeds = random_prompt_embeds(self.text_channels, seq_len=self.text_tokens, seed=seed)
        pooled = random_prompt_embeds(self.spec.pooled_projection_dim, seq_len=1, seed=seed + 1)[:, 0]
        return {"height": height, "width": self.width(height), "num_inference_steps": steps, "output_type": "latent",
                "generator": torch.Generator("cpu").manual_seed(seed),
                "prompt_embeds": embeds.to(device=device, dtype=dtype),
                "pooled_prompt_embeds": pooled.to(device=device, dtype=dtype), "guidance_scale": 3.5}

    def transformer(self):
        return flux_transformer(self.spec)


def flux_conformance_inputs() -> dict:
    """112x80 px: 7 packed token rows (odd) by 5 columns; Flux's RoPE ids are sliced per band, so wrong
    band positions would show. One guidance-distilled branch; 16 text tokens."""
    return {"prompt": "a red cat", "height": 112, "width": 80, "num_inference_steps": 6, "max_sequence_length": 16,
            "guidance_scale": 3.5}


SPEC = FamilySpec(
    name="flux",
    presets=FLUX_PRESETS,
    hub_models=(HubModel("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", tiny_flux_pipeline),),
    examples=(ExampleChoice("flux", "xfuser:xFuserFluxPipeline", "FluxPipeline",
                            lambda preset, text: build_flux_pipeline(preset, with_text_encoder=text),
                            flux_stand_in_text, has_cfg=False, tiny_text_tokens=16),),
    bench=BenchModel(preset="stadi_xdit.families.flux:FluxBench",
                     shapes={"flux-small": BenchShape("dev", 512, 16, model="small"),
                             "flux-dev-1024": BenchShape("dev", 1024, 512)},
                     xdit_wrappers={"dev": "xFuserFluxPipeline"}),
    conformance=(ConformanceCase("stadi_xdit.models.flux:StadiFluxPipeline", tiny_flux_pipeline, flux_conformance_inputs,
                                 rows=7, guidance_branches=1),),
)
