"""Model families under STADI: one self-contained module each, and the registry of pipeline twins.

A family module holds its attention processor(s), its `InjectionPlan` (which attention modules get
displaced K/V, where positions come from), its band model (band dim and unit) and its xFuser
pipeline twin(s), registered with `@register_twin`. Adding a family = one module named in
`FAMILY_MODULES`, plus its tests; the CLI hook and the benchmark find twins here.
"""

from __future__ import annotations

import importlib

import stadi_xdit.xdit  # noqa: F401  (the compat layer before any family module imports xfuser)

FAMILY_MODULES = ("pixart", "flux", "sd3", "qwen_image", "wan")

_TWINS: dict[str, type] = {}  # xFuser pipeline wrapper class name -> twin
_BY_DIFFUSERS: dict[str, type] = {}  # diffusers pipeline class name -> twin
_BY_RUNNER_MODEL: dict[str, type] = {}  # xDiT runner model class name -> twin


def register_twin(twin: type) -> type:
    """Class decorator: `twin` is the STADI form of the xFuser pipeline wrapper it subclasses.

    The twin names the diffusers pipeline classes it wraps (`diffusers_pipelines`) and the xDiT
    runner models (`runner_models`, classes of `xfuser.runner`'s registry) it serves.
    """
    wrapper = next((base for base in twin.__mro__[1:] if base.__name__.startswith("xFuser")), None)
    if wrapper is None:
        raise TypeError(f"{twin.__name__} must subclass an xFuser pipeline wrapper")
    _TWINS[wrapper.__name__] = twin
    _BY_DIFFUSERS.update(dict.fromkeys(getattr(twin, "diffusers_pipelines", ()), twin))
    _BY_RUNNER_MODEL.update(dict.fromkeys(getattr(twin, "runner_models", ()), twin))
    return twin


def twins() -> dict[str, type]:
    """xFuser wrapper class name -> STADI twin, for every family (imports the family modules)."""
    for name in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return dict(_TWINS)


def twin_for(xfuser_class_name: str) -> type | None:
    return twins().get(xfuser_class_name)


def twin_for_diffusers(pipeline_class_name: str) -> type | None:
    twins()
    return _BY_DIFFUSERS.get(pipeline_class_name)


def twin_for_runner_model(model_class_name: str) -> type | None:
    twins()
    return _BY_RUNNER_MODEL.get(model_class_name)
