"""When to re-plan mid-run: a pure decision from the speeds every rank measured in the last period.

At a sync point all ranks are aligned at base step k and hold the same gathered speeds, so each
derives the same decision here (no broadcast, no disagreement). The rule: predict the remaining
latency of the current layout at the new speeds, and of a fresh plan for the remaining steps (plus
one re-band, the cost of a transition); re-plan when the fresh plan is faster by more than
`threshold` at `confirmations` consecutive sync points. The threshold keeps measurement noise from
re-banding; the confirmations keep one noisy period from doing it (hysteresis).

A fresh plan also counts as promising when it restores skipped steps at no real cost: the image
area denoised with skipped steps (`skipped_row_steps`) drops by more than `threshold` while the
predicted latency rises by at most `tolerance`. That is what helps when a load lifts: the plan made
for a slow rank (stride 2) is then no slower than stride 1 everywhere, only worse in quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .anchor import settle_plan
from .cost import predict_latency
from .evidence import CostEstimate
from .plan_types import Plan
from .validation import require_int, require_seconds, require_speeds

REPLAN_MODES = ("off", "calls", "sync")


@dataclass(frozen=True)
class ReplanPolicy:
    threshold: float = 0.10  # relative gain a re-plan must promise
    confirmations: int = 2  # consecutive sync points that must agree

    def __post_init__(self) -> None:
        require_seconds("threshold", self.threshold)
        require_int("confirmations", self.confirmations, minimum=1)


@dataclass(frozen=True)
class ReplanDecision:
    replan: bool
    confirmations: int  # consecutive sync points so far that promised the gain (carry to the next call)
    current_seconds: float  # predicted remaining latency of the current layout at the new speeds
    replanned_seconds: float  # ... of a fresh plan, transition included
    new_plan: Plan | None  # the plan for the remaining steps (relative base steps), when replan
    reason: str = ""  # "faster" | "fewer skipped steps" (when promising)

    @property
    def gain(self) -> float:
        return 1.0 - self.replanned_seconds / self.current_seconds if self.current_seconds > 0 else 0.0


def skipped_row_steps(rows: Sequence[int], strides: Sequence[int]) -> float:
    """Token rows x the fraction of steps each rank skips: how much of the image a plan denoises coarsely."""
    return sum(r * (1.0 - 1.0 / s) for r, s in zip(rows, strides))


def decide_replan(current: Plan, *, next_base_step: int, confirmations: int, policy: ReplanPolicy,
                  speeds: Sequence[float] | None = None, estimates: Sequence[CostEstimate] | None = None,
                  tolerance: float = 0.02, transition_seconds: float = 0.0) -> ReplanDecision:
    """The decision at the sync point before base step `next_base_step` of `current`.

    `estimates`: every rank's cost model from the evidence so far (the same list on every rank), or
    `speeds`: rows/s taken as exact. `confirmations` is the previous decision's count. The new plan
    covers base steps `next_base_step .. T'` as its own steps 0 .. T' - k, with no warmup (all ranks
    are aligned). It is settled against the current plan (`planner/anchor.py`): a fresh plan that
    the noise could explain is no fresh plan.
    """
    if estimates is None:
        estimates = [CostEstimate.given(v) for v in require_speeds(speeds if speeds is not None else ())]
    speeds = [e.speed for e in estimates]
    remaining = current.num_steps - current.warmup_steps - require_int("next_base_step", next_base_step, minimum=0)
    if len(speeds) != len(current.ranks) or remaining < 2:
        return ReplanDecision(False, 0, 0.0, 0.0, None)
    rows = [rank.num_rows for rank in current.ranks]
    strides = [rank.stride for rank in current.ranks]
    overheads = [e.fixed_seconds for e in estimates]
    now = predict_latency(rows, strides, speeds, num_steps=remaining, warmup_steps=0,
                          step_overhead_seconds=overheads).total_seconds
    settled = settle_plan(estimates, anchor_rows=rows, anchor_strides=strides, rows=current.rows,
                          align=current.align, num_steps=remaining, warmup_steps=0, mode=current.mode,
                          max_stride=current.max_stride, tolerance=tolerance)
    if not settled.moved:
        return ReplanDecision(False, 0, now, now, None)
    fresh = settled.plan
    replanned = fresh.predicted.total_seconds + transition_seconds
    faster = replanned < (1.0 - policy.threshold) * now
    skipped = skipped_row_steps(rows, strides)
    finer = (skipped_row_steps([r.num_rows for r in fresh.ranks], [r.stride for r in fresh.ranks])
             < (1.0 - policy.threshold) * skipped and replanned <= (1.0 + tolerance) * now)
    count = confirmations + 1 if faster or finer else 0
    replan = count >= policy.confirmations
    reason = "faster" if faster else ("fewer skipped steps" if finer else "")
    return ReplanDecision(replan, 0 if replan else count, now, replanned, fresh if replan else None, reason)
