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
from dataclasses import replace

from stadi_xdit.families import bench_shapes, family
from stadi_xdit.families.bench_preset import BenchPreset, VideoBenchPreset

__all__ = ["BenchPreset", "VideoBenchPreset", "bench_presets", "build_pipeline", "call_kwargs",
           "construct_on_meta", "get_preset"]


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
