"""The registry of pipeline twins: which STADI pipeline serves which xFuser wrapper, diffusers pipeline
and xDiT runner model.

A *twin* is the STADI form of an xFuser pipeline wrapper: a subclass of it (so xDiT builds it
unchanged) whose `__call__` runs STADI's loop. Each family module in `stadi_xdit/models/` registers
its twins with `@register_twin`; the glue (the CLI hook, the runner) and the benchmark look them up
here. This module imports neither torch nor xfuser, and no family module until a look-up needs
them (the runtime modules the family declarations name, `stadi_xdit.families`), so the glue and
the families both import it and neither imports the other.
"""

from __future__ import annotations

import importlib

from stadi_xdit.families import families

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
    for spec in families():
        importlib.import_module(spec.runtime)
    return dict(_TWINS)


def twin_for(xfuser_class_name: str) -> type | None:
    return twins().get(xfuser_class_name)


def twin_for_diffusers(pipeline_class_name: str) -> type | None:
    twins()
    return _BY_DIFFUSERS.get(pipeline_class_name)


def twin_for_runner_model(model_class_name: str) -> type | None:
    twins()
    return _BY_RUNNER_MODEL.get(model_class_name)
