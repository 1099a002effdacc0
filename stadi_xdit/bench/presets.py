"""Model presets of ``stadi-bench``: which offline pipeline, at which size, and what it costs.

Every preset has random, seeded weights (``stadi_xdit.testing.tiny``) and is driven with stand-in
prompt embeddings (no text encoder), so all arms see exactly the same inputs and weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stadi_xdit.bench.catalog import PATCH_SIZE, PRESET_SHAPES, VAE_SCALE
from stadi_xdit.testing.tiny import FLUX_PRESETS, PIXART_PRESETS, FluxPreset, PixArtPreset


@dataclass(frozen=True)
class BenchPreset:
    name: str
    family: str  # "pixart" | "flux"
    spec: PixArtPreset | FluxPreset
    variant: str  # PixArt: "alpha" | "sigma"; Flux: "dev"
    height: int  # default resolution (square)
    text_tokens: int  # length of the stand-in prompt embeddings

    @property
    def layers(self) -> int:
        if self.family == "flux":
            return self.spec.num_layers + self.spec.num_single_layers
        return self.spec.num_layers

    @property
    def heads(self) -> int:
        return self.spec.num_attention_heads

    @property
    def hidden(self) -> int:
        return self.spec.num_attention_heads * self.spec.attention_head_dim

    @property
    def text_channels(self) -> int:
        return self.spec.joint_attention_dim if self.family == "flux" else self.spec.caption_channels

    def token_rows(self, height: int) -> int:
        return height // VAE_SCALE // PATCH_SIZE

    def forward_flops(self, height: int, width: int | None = None, batch: int | None = None) -> float:
        """FLOPs (2 per multiply-add) of one transformer forward; the cost proxy for scaling sizes.

        Per image token and layer: projections and MLP ``2 * 12 h^2`` (q,k,v,o = 4h^2, MLP 8h^2),
        cross-attention q,o ``2 * 2 h^2`` plus ``2 * 2 S h`` against S text tokens, self-attention
        ``2 * 2 N h`` over all N image tokens. Per layer, independent of the image: the text K/V
        projections ``2 * 2 S h^2``; per forward: the caption projection ``2 * S (C h + h^2)``.
        Flux's joint attention runs its text tokens through every block with the image tokens.
        Norms, embeddings and the final layer are left out (a few %).
        """
        width = width or height
        batch = batch if batch is not None else (2 if self.family == "pixart" else 1)  # CFG batch
        tokens = self.token_rows(height) * (width // VAE_SCALE // PATCH_SIZE)
        h, text = self.hidden, self.text_tokens
        if self.family == "pixart":
            per_token = 2 * (12 * h * h + 2 * h * h + 2 * text * h + 2 * tokens * h)
            per_layer = 2 * 2 * text * h * h
            caption = 2 * text * (self.text_channels * h + h * h)
            return float(batch * (self.layers * (tokens * per_token + per_layer) + caption))
        seq = tokens + text
        per_token = 2 * (12 * h * h + 2 * seq * h)
        return float(batch * self.layers * seq * per_token)

    def kv_bytes(self, height: int, bytes_per_value: int = 4, batch: int | None = None) -> float:
        """Bytes of K and V of the whole image over all displaced attention layers (one exchange)."""
        batch = batch if batch is not None else (2 if self.family == "pixart" else 1)
        tokens = self.token_rows(height) ** 2
        return float(batch * self.layers * tokens * 2 * self.hidden * bytes_per_value)


BENCH_PRESETS: dict[str, BenchPreset] = {
    name: BenchPreset(name, shape.family, (FLUX_PRESETS if shape.family == "flux" else PIXART_PRESETS)[name],
                      shape.variant, shape.height, shape.text_tokens)
    for name, shape in PRESET_SHAPES.items()
}


def get_preset(name: str) -> BenchPreset:
    try:
        return BENCH_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(BENCH_PRESETS)})") from None


def build_pipeline(preset: BenchPreset, seed: int = 0):
    """The diffusers pipeline of ``preset`` (float32, CPU, random weights, no text encoder)."""
    from stadi_xdit.testing.tiny import build_flux_pipeline, build_pixart_pipeline

    if preset.family == "flux":
        return build_flux_pipeline(preset.spec, seed=seed, with_text_encoder=False)
    return build_pixart_pipeline(preset.spec, variant=preset.variant, seed=seed, with_text_encoder=False)


def call_kwargs(preset: BenchPreset, height: int, steps: int, seed: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of one pipeline call: same seed, same stand-in prompt on every arm."""
    from stadi_xdit.testing.tiny import random_prompt_embeds

    embeds = random_prompt_embeds(preset.text_channels, seq_len=preset.text_tokens, seed=seed)
    embeds = embeds.to(device=device, dtype=dtype)
    common = {"height": height, "width": height, "num_inference_steps": steps, "output_type": "latent",
                  "generator": torch.Generator("cpu").manual_seed(seed)}
    if preset.family == "flux":
        pooled = random_prompt_embeds(preset.spec.pooled_projection_dim, seq_len=1, seed=seed + 1)[:, 0]
        return dict(common, prompt_embeds=embeds, pooled_prompt_embeds=pooled.to(device=device, dtype=dtype),
                    guidance_scale=3.5)
    mask = torch.ones(1, preset.text_tokens, device=device, dtype=dtype)
    negative = random_prompt_embeds(preset.text_channels, seq_len=preset.text_tokens, seed=seed + 1)
    return dict(common, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                negative_prompt_embeds=negative.to(device=device, dtype=dtype),
                negative_prompt_attention_mask=mask, guidance_scale=4.5, use_resolution_binning=False)


def construct_on_meta(preset: BenchPreset) -> int:
    """Build the preset's transformer on the meta device (no memory); returns its parameter count.

    Proves a real-size preset constructs on a machine that cannot hold its weights (Flux-dev is
    ~12 B parameters).
    """
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    spec = preset.spec
    with torch.device("meta"):
        if preset.family == "flux":
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=spec.latent_channels * 4, num_layers=spec.num_layers,
                num_single_layers=spec.num_single_layers, attention_head_dim=spec.attention_head_dim,
                num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.joint_attention_dim,
                pooled_projection_dim=spec.pooled_projection_dim, guidance_embeds=spec.guidance_embeds,
                axes_dims_rope=spec.axes_dims_rope)
        else:
            model = PixArtTransformer2DModel(
                num_attention_heads=spec.num_attention_heads, attention_head_dim=spec.attention_head_dim,
                in_channels=4, out_channels=8, num_layers=spec.num_layers,
                cross_attention_dim=spec.num_attention_heads * spec.attention_head_dim,
                caption_channels=spec.caption_channels, sample_size=spec.sample_size, patch_size=2,
                norm_num_groups=32, interpolation_scale=spec.interpolation_scale,
                use_additional_conditions=spec.use_additional_conditions)
    return sum(p.numel() for p in model.parameters())
