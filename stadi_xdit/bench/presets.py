"""Model presets of ``stadi-bench``: which offline pipeline, at which size, and what it costs.

Every preset has random, seeded weights (the families' offline presets, ``stadi_xdit.families``) and
is driven with stand-in prompt embeddings (no text encoder), so all arms see exactly the same inputs
and weights.

A family with bench presets declares them (``FamilySpec.bench``: the shapes, and its subclass of
``BenchPreset`` or ``VideoBenchPreset``, which knows the family's layers, text width, guidance batch,
FLOP count, pipeline and call). The bench, the arms and the simulator use only the preset's methods
(``band_units``, ``width``, ``forward_flops``, ``kv_bytes``, ``build_pipeline``, ``call_kwargs``,
``construct_on_meta``, ``decode``). This module imports no torch until a method needs it, so the
family declarations that subclass its presets stay torch-free.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, replace
from typing import Any

from stadi_xdit.families import BenchShape, bench_shapes, family
from stadi_xdit.geometry import FRAMES_PER_LATENT, TOKEN_ROW_PX, VAE_SCALE, latent_frames


@dataclass(frozen=True)
class BenchPreset:
    """An image preset: images of the shape's aspect ratio, bands of token rows."""

    name: str  # the bench preset's name (a video preset's frame count travels apart: ``num_frames``)
    shape: BenchShape
    spec: Any  # the family's model preset (e.g. PixArtPreset)
    num_frames: int | None = None  # video: frames of the clip (the shape's default unless --num-frames)

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


def _preset_class(family_name: str) -> type[BenchPreset]:
    module, _, name = family(family_name).bench.preset.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def bench_presets() -> dict[str, BenchPreset]:
    """Every family's bench presets by name (built on first use: the declarations subclass this module's
    classes, so they cannot be built while it loads)."""
    return {name: _preset_class(shape.family)(name, shape, family(shape.family).presets[shape.model or name],
                                              num_frames=shape.num_frames)
            for name, shape in bench_shapes().items()}


def __getattr__(name: str):
    if name == "BENCH_PRESETS":  # the mapping, built on first access
        return bench_presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_preset(name: str, num_frames: int | None = None) -> BenchPreset:
    """The preset ``name``; a video preset at ``num_frames`` frames when given (None: its default)."""
    try:
        preset = bench_presets()[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(bench_presets())})") from None
    if num_frames is None or num_frames == preset.num_frames:
        return preset
    if not preset.video:
        raise ValueError(f"preset {name!r} is an image preset: it has no frame count")
    return replace(preset, num_frames=num_frames)


def build_pipeline(preset: BenchPreset, seed: int = 0):
    """The diffusers pipeline of ``preset`` (float32, CPU, random weights, no text encoder)."""
    return preset.build_pipeline(seed)


def call_kwargs(preset: BenchPreset, height: int, steps: int, seed: int, device: str = "cpu", dtype=None) -> dict:
    """Keyword arguments of one pipeline call: same seed, same stand-in prompt on every arm."""
    return preset.call_kwargs(height, steps, seed, device, dtype)


def construct_on_meta(preset: BenchPreset) -> int:
    """Build the preset's transformer on the meta device (no memory); returns its parameter count.

    Proves a real-size preset constructs on a machine that cannot hold its weights (Flux-dev is
    ~12 B parameters, Wan2.1-14B ~14 B).
    """
    return preset.construct_on_meta()
