"""The noise floor: keep the current plan unless the evidence says another one is better.

Pure Python. Every plan STADI makes from measured timings (the warmup layout of a call, the plan
after warmup, a re-plan at a sync point) is *settled* against an anchor: equal bands at stride 1
when nothing was planned yet, else the plan in use. The fresh plan of the estimates replaces the
anchor only when the difference is more than noise could explain:

* **Strides first, on more evidence.** A rank runs a stride ``s > 1`` only while its ideal stride
  ``s*`` (fastest step speed / its own) lies past the rounding boundary ``sqrt(s * (s - 1))`` by
  ``STRIDE_CONFIDENCE`` standard errors of the log speed ratio (``sqrt(e_i^2 + e_fastest^2)``, with
  ``e`` each estimate's relative error); otherwise every rank runs stride 1. Strides cost quality, so
  they need more evidence than bands (3 standard errors against 2), at every decision, not only when
  they change: stride 1 is the default a plan falls back to. (A stride taken on a noisy first call
  would otherwise hold itself up: a stride-2 rank publishes its K/V on every step, so its forwards
  cost more, and it keeps looking slow.)
* **Bands.** With the anchor's strides, the bands move only when some rank's band changes by more
  than one alignment unit *and* the predicted latency of the base steps falls by more than
  ``BAND_CONFIDENCE * sqrt(2) * max_i e_i`` (the relative error of a ratio of two ranks' times).

Both rules are hysteresis: estimates that wander within the noise never move a plan, so under a
steady load the plan reaches a fixed point and stays there, and identical ranks keep equal bands at
stride 1. Speeds given by the user (errors 0) still never move a plan by a single unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .bands import uniform_band_rows
from .evidence import CostEstimate
from .plan_types import Plan
from .planning import plan, step_speeds
from .strides import ideal_strides

BAND_CONFIDENCE = 2.0
STRIDE_CONFIDENCE = 3.0


@dataclass(frozen=True)
class Settled:
    plan: Plan
    moved: bool  # the plan differs from the anchor
    reason: str  # one phrase for the log: why it moved or stayed
    gain: float  # predicted relative gain of the fresh bands over the anchor's (base steps)
    margin: float  # the gain the noise could explain


def noise_margin(estimates: Sequence[CostEstimate]) -> float:
    """Relative latency change that estimation noise could explain, at `BAND_CONFIDENCE`."""
    return BAND_CONFIDENCE * math.sqrt(2.0) * max(e.relative_error for e in estimates)


def confident_strides(estimates: Sequence[CostEstimate], strides: Sequence[int], rows: int) -> bool:
    """Whether every stride above 1 is backed by `STRIDE_CONFIDENCE` standard errors: the rank's ideal
    stride lies past the rounding boundary ``sqrt(s * (s - 1))`` below its stride by that much."""
    speeds = step_speeds([e.speed for e in estimates], [e.fixed_seconds for e in estimates], rows)
    ideal = ideal_strides(speeds)
    fastest = max(range(len(speeds)), key=speeds.__getitem__)
    for rank, stride in enumerate(strides):
        if stride == 1:
            continue
        distance = math.log(ideal[rank]) - 0.5 * math.log(stride * (stride - 1))
        error = math.hypot(estimates[rank].relative_error, estimates[fastest].relative_error)
        if distance <= STRIDE_CONFIDENCE * error:
            return False
    return True


def _base_seconds(p: Plan) -> float:
    return p.predicted.total_seconds - p.predicted.warmup_seconds


def settle_plan(estimates: Sequence[CostEstimate], *, anchor_rows: Sequence[int] | None = None,
                anchor_strides: Sequence[int] | None = None, rows: int, align: int, num_steps: int,
                warmup_steps: int, mode: str, **plan_terms) -> Settled:
    """The plan for ``estimates``, kept at the anchor unless the evidence beats the noise floor.

    ``anchor_rows``/``anchor_strides``: the plan in use (default: equal bands, stride 1).
    ``plan_terms``: the rest of `plan()`'s keywords (max_stride, tolerance, exchange terms, warmup_rows).
    """
    # The estimates' fixed costs are the plan's step overheads (whatever `plan_terms` says).
    terms = {**plan_terms, "rows": rows, "align": align, "num_steps": num_steps, "warmup_steps": warmup_steps,
             "mode": mode, "step_overhead_seconds": [e.fixed_seconds for e in estimates]}
    speeds = [e.speed for e in estimates]
    fresh = plan(speeds, **terms)
    if mode == "uniform":
        return Settled(fresh, False, "uniform bands", 0.0, 0.0)
    n = len(estimates)
    anchor_rows = tuple(anchor_rows) if anchor_rows is not None else uniform_band_rows(n, rows, align)
    anchor_strides = tuple(anchor_strides) if anchor_strides is not None else (1,) * n
    if mode != "full":
        anchor_strides = (1,) * n
    fresh_strides = tuple(r.stride for r in fresh.ranks)
    margin = noise_margin(estimates)
    if not confident_strides(estimates, fresh_strides, rows):
        fresh_strides = (1,) * n
        fresh = plan(speeds, strides=fresh_strides, **terms)
    if fresh_strides != anchor_strides:
        return Settled(fresh, True, f"strides {list(anchor_strides)} -> {list(fresh_strides)}", 0.0, margin)
    kept = plan(speeds, strides=anchor_strides, band_rows=anchor_rows, **terms)
    fresh_rows = tuple(r.num_rows for r in fresh.ranks)
    gain = 1.0 - _base_seconds(fresh) / _base_seconds(kept) if _base_seconds(kept) > 0 else 0.0
    if all(abs(a - b) <= align for a, b in zip(anchor_rows, fresh_rows)):
        return Settled(kept, False, "kept: bands within one unit", gain, margin)
    if gain <= margin:
        return Settled(kept, False, f"kept: gain {gain:.1%} within noise {margin:.1%}", gain, margin)
    return Settled(fresh, True, f"bands moved: gain {gain:.1%} > noise {margin:.1%}", gain, margin)
