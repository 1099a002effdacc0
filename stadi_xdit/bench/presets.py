"""Model presets of ``stadi-bench``: which offline pipeline, at which size, and what it costs.

Every preset has random, seeded weights (the families' offline presets, ``stadi_xdit.families``) and is driven with stand-in
prompt embeddings (no text encoder), so all arms see exactly the same inputs and weights.

One class per kind of model: ``BenchPreset`` serves the image families (PixArt, Flux; bands are token
rows of a square image), ``WanBenchPreset`` Wan 2.1 text-to-video (bands are token rows of a whole clip).
The bench, the arms and the simulator use only the preset's methods (``band_units``, ``width``,
``forward_flops``, ``kv_bytes``, ``build_pipeline``, ``call_kwargs``, ``construct_on_meta``, ``decode``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from stadi_xdit.bench.catalog import PATCH_SIZE, PRESET_SHAPES, VAE_SCALE, PresetShape
from stadi_xdit.families.flux import FLUX_PRESETS
from stadi_xdit.families.pixart import PIXART_PRESETS
from stadi_xdit.families.wan import WAN_PRESETS
from stadi_xdit.geometry import FRAMES_PER_LATENT, TOKEN_ROW_PX, latent_frames


@dataclass(frozen=True)
class BenchPreset:
    """An image preset (PixArt, Flux): square images, bands of token rows."""

    name: str  # the bench preset's name (a video preset's frame count travels apart: ``num_frames``)
    shape: PresetShape
    spec: Any  # the family's model preset: PixArtPreset | FluxPreset | WanPreset
    num_frames: int | None = None  # video: frames of the clip (the shape's default unless --num-frames)

    family = property(lambda self: self.shape.family)
    variant = property(lambda self: self.shape.variant)
    height = property(lambda self: self.shape.height)  # default height in px
    text_tokens = property(lambda self: self.shape.text_tokens)
    video = property(lambda self: self.shape.video)
    band_unit = property(lambda self: self.shape.band_unit)  # "token row"

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

    @property
    def cfg_batch(self) -> int:
        """Samples one denoising step runs through the transformer: 2 with classifier-free guidance."""
        return 2 if self.family == "pixart" else 1  # Flux-dev: guidance distilled, one branch

    def width(self, height: int) -> int:
        return self.shape.width_for(height)

    def band_units(self, height: int) -> int:
        """The planner's rows at ``height``: token rows of the image, or of the whole clip (video)."""
        return self.shape.band_units(height, self.num_frames)

    def tokens(self, height: int) -> int:
        """Image (or clip) tokens of one sample."""
        return (height // TOKEN_ROW_PX) * (self.width(height) // TOKEN_ROW_PX)

    def shape_label(self, height: int) -> str:
        """The size in tables: ``512px`` for square images."""
        return f"{height}px"

    def forward_flops(self, height: int, width: int | None = None, batch: int | None = None) -> float:
        """FLOPs (2 per multiply-add) of one denoising step's transformer work; the cost proxy for scaling sizes.

        Per image token and layer: projections and MLP ``2 * 12 h^2`` (q,k,v,o = 4h^2, MLP 8h^2),
        cross-attention q,o ``2 * 2 h^2`` plus ``2 * 2 S h`` against S text tokens, self-attention
        ``2 * 2 N h`` over all N image tokens. Per layer, independent of the image: the text K/V
        projections ``2 * 2 S h^2``; per forward: the caption projection ``2 * S (C h + h^2)``.
        Flux's joint attention runs its text tokens through every block with the image tokens.
        Norms, embeddings and the final layer are left out (a few %).
        """
        width = width or self.width(height)
        batch = batch if batch is not None else self.cfg_batch
        tokens = (height // VAE_SCALE // PATCH_SIZE) * (width // VAE_SCALE // PATCH_SIZE)
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
        batch = batch if batch is not None else self.cfg_batch
        return float(batch * self.layers * self.tokens(height) * 2 * self.hidden * bytes_per_value)

    def build_pipeline(self, seed: int = 0):
        """The diffusers pipeline (float32, CPU, random weights, no text encoder)."""
        from stadi_xdit.families.flux import build_flux_pipeline
        from stadi_xdit.families.pixart import build_pixart_pipeline

        if self.family == "flux":
            return build_flux_pipeline(self.spec, seed=seed, with_text_encoder=False)
        return build_pixart_pipeline(self.spec, variant=self.variant, seed=seed, with_text_encoder=False)

    def call_kwargs(self, height: int, steps: int, seed: int, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
        """Keyword arguments of one pipeline call: same seed, same stand-in prompt on every arm."""
        from stadi_xdit.offline.components import random_prompt_embeds

        embeds = random_prompt_embeds(self.text_channels, seq_len=self.text_tokens, seed=seed)
        embeds = embeds.to(device=device, dtype=dtype)
        common = {"height": height, "width": self.width(height), "num_inference_steps": steps,
                  "output_type": "latent", "generator": torch.Generator("cpu").manual_seed(seed)}
        if self.family == "flux":
            pooled = random_prompt_embeds(self.spec.pooled_projection_dim, seq_len=1, seed=seed + 1)[:, 0]
            return dict(common, prompt_embeds=embeds, pooled_prompt_embeds=pooled.to(device=device, dtype=dtype),
                        guidance_scale=3.5)
        mask = torch.ones(1, self.text_tokens, device=device, dtype=dtype)
        negative = random_prompt_embeds(self.text_channels, seq_len=self.text_tokens, seed=seed + 1)
        return dict(common, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                    negative_prompt_embeds=negative.to(device=device, dtype=dtype),
                    negative_prompt_attention_mask=mask, guidance_scale=4.5, use_resolution_binning=False)

    def construct_on_meta(self) -> int:
        """Build the transformer on the meta device (no memory); returns its parameter count."""
        from stadi_xdit.families.flux import flux_transformer
        from stadi_xdit.families.pixart import pixart_transformer

        with torch.device("meta"):
            model = (flux_transformer if self.family == "flux" else pixart_transformer)(self.spec)
        return sum(p.numel() for p in model.parameters())

    def decode(self, vae, latent: torch.Tensor) -> torch.Tensor:
        """Latent -> image in [0, 1] with the pipeline's VAE."""
        with torch.no_grad():
            image = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True)
class WanBenchPreset(BenchPreset):
    """Wan 2.1 text-to-video: clips of ``num_frames`` (4k+1) frames, bands of the clip's token rows.

    Tokens are latent frames x (H/16) x (W/16) (patch (1, 2, 2)); every block runs self-attention over
    all tokens of the clip, cross-attention to the text and an FFN of ``ffn_dim``. Guidance runs both
    branches every step (diffusers: two forwards; STADI: one batch of two).
    """

    @property
    def layers(self) -> int:
        return self.spec.num_layers

    @property
    def text_channels(self) -> int:
        return self.spec.text_dim

    @property
    def cfg_batch(self) -> int:
        return 2

    @property
    def clip_frames(self) -> int:
        return self.num_frames or self.shape.num_frames

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.clip_frames)

    def tokens(self, height: int) -> int:
        return self.latent_frames * super().tokens(height)

    def shape_label(self, height: int) -> str:
        return f"{height}x{self.width(height)}px x {self.clip_frames} frames"

    def forward_flops(self, height: int, width: int | None = None, batch: int | None = None) -> float:
        """FLOPs (2 per multiply-add) of one denoising step's transformer work (both CFG branches).

        Per token and block: self-attention q,k,v,o ``2 * 4 h^2`` and ``2 * 2 N h`` over all N tokens of
        the clip, cross-attention q,o ``2 * 2 h^2`` and ``2 * 2 S h`` against S text tokens, FFN
        ``2 * 2 h F``. Per block: the text K/V projections ``2 * 2 S h^2``; per forward: the text
        embedding ``2 * S (T h + h^2)`` (T = text width). Patch embedding, norms, modulation and the
        output projection are left out (< 1 % at real sizes).
        """
        width = width or self.width(height)
        batch = batch if batch is not None else self.cfg_batch
        tokens = self.latent_frames * (height // TOKEN_ROW_PX) * (width // TOKEN_ROW_PX)
        h, text, ffn = self.hidden, self.text_tokens, self.spec.ffn_dim
        per_token = 2 * (6 * h * h + 2 * tokens * h + 2 * text * h + 2 * h * ffn)
        per_layer = 2 * 2 * text * h * h
        text_embedding = 2 * text * (self.text_channels * h + h * h)
        return float(batch * (self.layers * (tokens * per_token + per_layer) + text_embedding))

    def kv_bytes(self, height: int, bytes_per_value: int = 4, batch: int | None = None) -> float:
        """One rank's displaced K/V store for the clip (``runtime.video_bands.displaced_kv_bytes``)."""
        from stadi_xdit.families.wan import wan_transformer_config
        from stadi_xdit.runtime.video_bands import displaced_kv_bytes

        batch = batch if batch is not None else self.cfg_batch
        return float(displaced_kv_bytes(wan_transformer_config(self.spec), height, self.width(height),
                                        self.clip_frames, batch=batch, bytes_per_value=bytes_per_value,
                                        spatial_scale=VAE_SCALE, temporal_scale=FRAMES_PER_LATENT))

    def build_pipeline(self, seed: int = 0):
        from stadi_xdit.families.wan import build_wan_pipeline

        return build_wan_pipeline(self.spec, seed=seed, with_text_encoder=False)

    def call_kwargs(self, height: int, steps: int, seed: int, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
        """WanPipeline's arguments: both prompts as embeddings of one length (Wan pads its prompts alike)."""
        from stadi_xdit.offline.components import random_prompt_embeds

        embeds, negative = (random_prompt_embeds(self.text_channels, seq_len=self.text_tokens, seed=seed + i)
                            .to(device=device, dtype=dtype) for i in (0, 1))
        return {"height": height, "width": self.width(height), "num_frames": self.clip_frames,
                "num_inference_steps": steps, "output_type": "latent",
                "generator": torch.Generator("cpu").manual_seed(seed), "prompt_embeds": embeds,
                "negative_prompt_embeds": negative, "guidance_scale": 5.0}

    def construct_on_meta(self) -> int:
        from diffusers import WanTransformer3DModel

        from stadi_xdit.families.wan import wan_transformer_config

        with torch.device("meta"):
            model = WanTransformer3DModel(**wan_transformer_config(self.spec))
        return sum(p.numel() for p in model.parameters())

    def decode(self, vae, latent: torch.Tensor) -> torch.Tensor:
        """Latent clip -> video (batch, 3, frames, H, W) in [0, 1], de-normalised as WanPipeline does."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latent.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latent.dtype)
        with torch.no_grad():
            video = vae.decode((latent * std + mean).to(vae.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)


_FAMILIES = {"pixart": (BenchPreset, PIXART_PRESETS), "flux": (BenchPreset, FLUX_PRESETS),
             "wan": (WanBenchPreset, WAN_PRESETS)}

BENCH_PRESETS: dict[str, BenchPreset] = {
    name: _FAMILIES[shape.family][0](name, shape, _FAMILIES[shape.family][1][shape.model or name],
                                     num_frames=shape.num_frames)
    for name, shape in PRESET_SHAPES.items()
}


def get_preset(name: str, num_frames: int | None = None) -> BenchPreset:
    """The preset ``name``; a video preset at ``num_frames`` frames when given (None: its default)."""
    try:
        preset = BENCH_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(BENCH_PRESETS)})") from None
    if num_frames is None or num_frames == preset.num_frames:
        return preset
    if not preset.video:
        raise ValueError(f"preset {name!r} is an image preset: it has no frame count")
    return replace(preset, num_frames=num_frames)


def build_pipeline(preset: BenchPreset, seed: int = 0):
    """The diffusers pipeline of ``preset`` (float32, CPU, random weights, no text encoder)."""
    return preset.build_pipeline(seed)


def call_kwargs(preset: BenchPreset, height: int, steps: int, seed: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of one pipeline call: same seed, same stand-in prompt on every arm."""
    return preset.call_kwargs(height, steps, seed, device, dtype)


def construct_on_meta(preset: BenchPreset) -> int:
    """Build the preset's transformer on the meta device (no memory); returns its parameter count.

    Proves a real-size preset constructs on a machine that cannot hold its weights (Flux-dev is
    ~12 B parameters, Wan2.1-14B ~14 B).
    """
    return preset.construct_on_meta()
