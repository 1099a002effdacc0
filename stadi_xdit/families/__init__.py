"""What each model family declares, in one place and one form: its `FamilySpec`.

A family is two modules and its tests:

- `stadi_xdit/models/<name>.py`, the runtime: its attention processor(s) on the band-attention
  helper, its injection plan, its band model and its xFuser pipeline twin(s), registered with
  `@register_twin` (`stadi_xdit.registry`);
- `stadi_xdit/families/<name>.py`, the declaration (this package): `SPEC = FamilySpec(...)` names the
  runtime module, the offline model presets (tiny, small, real sizes) and how to build them with
  random weights, the xDiT runner models it serves with the hub repo each loads and its tiny
  hub-cache recipe, its `--pipeline` choices in `scripts/stadi_example.py`, its `stadi-bench`
  presets, and its conformance cases (one tiny call per twin, which every family's checks run on).

Everything else finds families here: the registry (which runtime modules to import), the hub
cache, the example script and the benchmark. This package imports no torch: a declaration builds
its pipelines through functions that import what they need when called, so argument checks read
the declarations in milliseconds.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from stadi_xdit.geometry import TOKEN_ROW_PX, latent_frames


@dataclass(frozen=True)
class HubModel:
    """An xDiT runner model the family serves (`xdit --model NAME`) and the tiny pipeline written for it."""

    runner_model: str  # the name in xfuser's runner registry
    repo_id: str  # the hub repo its ModelSettings(model_name=...) loads
    build: Callable[[], Any]  # a tiny pipeline with every component that runner model loads
    # The runner's size flags for one tiny call of that pipeline, on an odd number of token rows (the
    # runner conformance cases, tests/test_runner_conformance.py, launch it in every mode users use)
    tiny_call: tuple[str, ...] = ("--height", "112", "--width", "80")


@dataclass(frozen=True)
class ExampleChoice:
    """One `--pipeline` of `scripts/stadi_example.py`: xDiT's wrapper, the offline presets, stand-in text."""

    pipeline: str  # the --pipeline value
    wrapper: str  # "module:Class" of the xFuser pipeline wrapper the script builds
    diffusers_class: str  # `_class_name` a local --model folder's model_index.json must have
    build: Callable[[str, bool], Any]  # (preset, with_text_encoder) -> diffusers pipeline
    stand_in_text: Callable[[Any, int], dict]  # (diffusers pipeline, seed) -> embeddings
    text_presets: tuple[str, ...] = ("tiny",)  # presets that carry a tiny text encoder
    has_cfg: bool = True
    call_kwargs: tuple[tuple[str, object], ...] = ()
    tiny_text_tokens: int | None = None  # max_sequence_length with the tiny text encoder (keeps tiny runs tiny)
    extra_presets: tuple[str, ...] = ()  # further --model names the script resolves itself (e.g. "toy-trained")

    def wrapper_class(self) -> type:
        module, _, name = self.wrapper.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class BenchShape:
    """One `stadi-bench --preset`: which model preset, at which default size, with which stand-in text."""

    variant: str  # the family's own variant key (PixArt: "alpha" | "sigma"), a key of its xdit_wrappers
    height: int  # default height in px
    text_tokens: int  # length of the stand-in prompt embeddings
    model: str | None = None  # the family's model preset (default: this bench preset's name)
    width: int | None = None  # default width in px (None: square); --height keeps the aspect ratio
    num_frames: int | None = None  # video: default frames of the clip (4k+1); None: an image preset
    decode: bool = False  # small enough to decode every arm's output for image/video PSNR
    calibrates: bool = False  # `--simulate` can measure a forward of it on this CPU
    family: str = ""  # the declaring family (`bench_shapes` fills it in)

    @property
    def video(self) -> bool:
        return self.num_frames is not None

    @property
    def band_unit(self) -> str:
        """What a STADI band is made of, and the planner's row: token rows of an image, or of a clip (its
        frames' rows one after the other)."""
        return "token row"

    def width_for(self, height: int) -> int:
        """Width in px at ``height``: the preset's aspect ratio, on whole token columns (>= 1)."""
        if self.width is None:
            return height
        return max(1, round(height * self.width / self.height / TOKEN_ROW_PX)) * TOKEN_ROW_PX

    def band_units(self, height: int, num_frames: int | None = None) -> int:
        """The planner's rows: token rows of the image, or of the whole clip (latent frames of ``num_frames``,
        or the preset's, x token rows per frame); the band granularity and the limit on STADI ranks."""
        if self.video:
            return latent_frames(num_frames or self.num_frames) * (height // TOKEN_ROW_PX)
        return height // TOKEN_ROW_PX


@dataclass(frozen=True)
class BenchModel:
    """How `stadi-bench` runs the family.

    `preset` is "module:Class" of the family's `stadi_xdit.families.bench_preset.BenchPreset` subclass (imported
    when the bench needs it), built as ``Class(name, shape, model_preset)`` for each of `shapes`.
    """

    preset: str
    shapes: Mapping[str, BenchShape]
    xdit_wrappers: Mapping[str, str]  # variant -> the xFuser pipeline wrapper class xDiT's arms build
    # variant -> the sequence-parallel transformer ("module.Class") xfuser's runner puts into the diffusers
    # pipeline, where xfuser serves the family only through its runner (xDiT's arms then do the same)
    xdit_runner_transformers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConformanceCase:
    """The family's tiny model as the conformance suite runs it (`tests/test_conformance.py`): one seeded
    call on an image (or clip) with an odd number of token rows."""

    twin: str  # "module:Class" of the STADI twin the suite builds around `build()`
    build: Callable[[], Any]  # the seeded tiny diffusers pipeline (also the one-process reference)
    # The call's keyword arguments, `height` and `num_inference_steps` among them; the suite adds
    # `output_type` and a generator seeded with `seed`.
    inputs: Callable[[], dict]
    rows: int  # its token rows (odd): the planner's rows
    output: str = "images"  # the output's field: "images", or "frames" for a video
    # Samples per forward: 2 for classifier-free guidance as one batch (its CFG-parallel pair is checked
    # too), 1 for a guidance-distilled model (Flux.1-dev) with no CFG branches
    guidance_branches: int = 2
    seed: int = 1

    def twin_class(self) -> type:
        module, _, name = self.twin.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class FamilySpec:
    name: str  # its declaration's module name, and its runtime's: stadi_xdit.models.<name>
    presets: Mapping[str, Any]  # offline model presets by name: tiny, small, real sizes
    hub_models: tuple[HubModel, ...] = ()
    examples: tuple[ExampleChoice, ...] = ()
    bench: BenchModel | None = None
    conformance: tuple[ConformanceCase, ...] = ()  # one per twin

    @property
    def runtime(self) -> str:
        """The module holding the family's twins (its declaration's namesake in `stadi_xdit.models`)."""
        return f"stadi_xdit.models.{self.name}"


# Modules of this package that declare no family: the parts every declaration shares.
SHARED_MODULES = ("bench_preset", "components")


@functools.cache
def families() -> tuple[FamilySpec, ...]:
    """Every declared family, in module name order (each module of this package with a `SPEC`)."""
    specs = []
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)
                         if not info.name.startswith("_") and info.name not in SHARED_MODULES):
        spec = getattr(importlib.import_module(f"{__name__}.{module}"), "SPEC", None)
        if not isinstance(spec, FamilySpec) or spec.name != module:
            raise TypeError(f"{__name__}.{module} must declare SPEC = FamilySpec(name={module!r}, ...)")
        specs.append(spec)
    return tuple(specs)


def family(name: str) -> FamilySpec:
    for spec in families():
        if spec.name == name:
            return spec
    raise KeyError(f"no model family {name!r} (known: {', '.join(s.name for s in families())})")


def conformance_cases() -> dict[str, ConformanceCase]:
    """Twin class name -> its conformance case, over every family."""
    return {case.twin.partition(":")[2]: case for spec in families() for case in spec.conformance}


def hub_models() -> dict[str, HubModel]:
    """Runner model name -> its hub repo and tiny recipe, over every family."""
    return {hub.runner_model: hub for spec in families() for hub in spec.hub_models}


def example_choices() -> dict[str, ExampleChoice]:
    """`--pipeline` value -> its example choice, over every family."""
    return {choice.pipeline: choice for spec in families() for choice in spec.examples}


def bench_shapes() -> dict[str, BenchShape]:
    """`stadi-bench --preset` name -> its shape, over every family with bench presets."""
    return {name: replace(shape, family=spec.name)
            for spec in families() if spec.bench for name, shape in spec.bench.shapes.items()}
