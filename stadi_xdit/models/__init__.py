"""Model families under STADI: the runtime module of each (its declaration: `stadi_xdit/families/`).

A family module holds its attention processor(s) (on the one band-attention helper,
`runtime/band_attention.py`), its `InjectionPlan` (which attention modules get displaced K/V,
where positions come from), its band model (band dim and unit) and its xFuser pipeline twin(s),
registered with `@register_twin` in `stadi_xdit.registry`. Importing this package applies xfuser's
CPU compat layer first (`stadi_xdit.compat.bootstrap`), because every family module imports xfuser.
"""

from __future__ import annotations

from stadi_xdit.compat import bootstrap
from stadi_xdit.registry import (
    register_twin,
    twin_for,
    twin_for_diffusers,
    twin_for_runner_model,
    twins,
)

bootstrap()  # before any family module (they import xfuser)

__all__ = ["register_twin", "twin_for", "twin_for_diffusers", "twin_for_runner_model", "twins"]
