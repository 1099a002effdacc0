"""The base classes of the families' `stadi-bench` presets (`BenchPreset`, `VideoBenchPreset`).

Each family with bench presets subclasses one of them in its declaration (`FluxBench`, `PixArtBench`,
`WanBench`); `stadi_xdit.bench.presets` builds them by name. They live here, below both the families
and the bench, so that neither package imports the other in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from stadi_xdit.families import BenchShape, family
from stadi_xdit.geometry import FRAMES_PER_LATENT, TOKEN_ROW_PX, VAE_SCALE, latent_frames


@dataclass(frozen=True)
class BenchPreset:
    """An image preset: images of the shape's aspect ratio, bands of token rows."""

    name: str  # the bench preset's name (a video preset's frame count travels apart: ``num_frames``)
    shape: BenchShape
    spec: Any  # the family's model preset (e.g. PixArtPreset)
    num_frames: int | None = None  # video: frames of the clip (the shape's default unless --num-frames)

    step_caches: ClassVar[tuple[str, ...]] = ()  # xDiT's in-tree step caches that fit the family's transformer (class-wide)

    family = property(lambda self: self.shape.family)
    variant = property(lambda self: self.shape.variant)
    height = property(lambda self: self.shape.height)  # default height in px
    text_tokens = property(lambda self: self.shape.text_tokens)
    video = property(lambda self: self.shape.video)
    band_unit = property(lambda self: self.shape.band_unit)  # "token row"

    # --- what each family's preset says ------------------------------------------------------------
    @property
    def layers(self) -> int:
        """Transformer blocks with image attention (those whose K/V are displaced)."""
        return self.spec.num_layers

    @property
    def text_channels(self) -> int:
        """Width of the stand-in prompt embeddings."""
        raise NotImplementedError

    @property
    def cfg_batch(self) -> int:
        """Samples one denoising step runs through the transformer: 2 with classifier-free guidance."""
        raise NotImplementedError

    def forward_flops(self, height: int, width: int | None = None, batch: int | None = None) -> float:
        """FLOPs (2 per multiply-add) of one denoising step's transformer work; the cost proxy for scaling."""
        raise NotImplementedError

    def build_pipeline(self, seed: int = 0):
        """The diffusers pipeline (float32, CPU, random weights, no text encoder)."""
        raise NotImplementedError

    def call_kwargs(self, height: int, steps: int, seed: int, device: str = "cpu", dtype=None) -> dict:
        """Keyword arguments of one pipeline call: same seed, same stand-in prompt on every arm."""
        raise NotImplementedError

    def transformer(self):
        """The family's transformer for this preset, random weights (none allocated on the meta device)."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.spec.num_attention_heads

    @property
    def hidden(self) -> int:
        return self.spec.num_attention_heads * self.spec.attention_head_dim

    @property
    def xdit_wrapper(self) -> str:
        """The xFuser pipeline wrapper class xDiT's arms build (STADI's twin subclasses it)."""
        return family(self.family).bench.xdit_wrappers[self.variant]

    @property
    def xdit_runner_transformer(self) -> str | None:
        """Where xfuser serves the family only through its runner: the sequence-parallel transformer the
        runner puts into the diffusers pipeline ("module.Class"), which xDiT's arms use too."""
        return family(self.family).bench.xdit_runner_transformers.get(self.variant)

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

    def kv_bytes(self, height: int, bytes_per_value: int = 4, batch: int | None = None) -> float:
        """Bytes of K and V of the whole image over all displaced attention layers (one exchange)."""
        batch = batch if batch is not None else self.cfg_batch
        return float(batch * self.layers * self.tokens(height) * 2 * self.hidden * bytes_per_value)

    def construct_on_meta(self) -> int:
        """Build the transformer on the meta device (no memory); returns its parameter count."""
        import torch

        with torch.device("meta"):
            model = self.transformer()
        return sum(p.numel() for p in model.parameters())

    def decode(self, vae, latent):
        """Latent -> image in [0, 1] with the pipeline's VAE."""
        import torch

        with torch.no_grad():
            image = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True)
class VideoBenchPreset(BenchPreset):
    """A video preset: clips of ``num_frames`` (4k+1) frames, bands of the clip's token rows."""

    def transformer_config(self) -> dict:
        """The transformer's config (``runtime.video_bands.displaced_kv_bytes`` reads its shape)."""
        raise NotImplementedError

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

    def kv_bytes(self, height: int, bytes_per_value: int = 4, batch: int | None = None) -> float:
        """One rank's displaced K/V store for the clip (``runtime.video_bands.displaced_kv_bytes``)."""
        from stadi_xdit.runtime.video_bands import displaced_kv_bytes

        batch = batch if batch is not None else self.cfg_batch
        return float(displaced_kv_bytes(self.transformer_config(), height, self.width(height),
                                        self.clip_frames, batch=batch, bytes_per_value=bytes_per_value,
                                        spatial_scale=VAE_SCALE, temporal_scale=FRAMES_PER_LATENT))
