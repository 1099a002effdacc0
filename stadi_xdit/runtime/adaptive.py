"""Adaptive STADI: what a rank measured over a call or a sync period, and the mid-run re-plan.

Every forward is already timed (`StepRecord`: compute net of collective waits, emulated slowdown
included, band rows). The speed of a rank over a span of forwards is the rows it computed per
second of its own compute; the first forward of a call carries one-time costs and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stadi_xdit.planner import Plan
from stadi_xdit.planner.replan import ReplanDecision, ReplanPolicy, decide_replan
from stadi_xdit.runtime.groups import StadiGroups
from stadi_xdit.runtime.profile import StepRecord
from stadi_xdit.runtime.schedule import restrict_to_indices


def row_speed(steps: Sequence[StepRecord]) -> float | None:
    """Token rows per second over `steps` (None when nothing usable was timed)."""
    usable = [step for step in steps if step.rows]
    seconds = sum(step.compute for step in usable)
    return sum(step.rows for step in usable) / seconds if seconds > 0 else None


def call_row_speed(steps: Sequence[StepRecord]) -> float | None:
    """This rank's speed over a whole call, its first (warm-up of caches) forward left out."""
    return row_speed(steps[1:])


@dataclass
class ScheduleSnapshot:
    """A scheduler's full timestep grid, kept before the first per-rank restriction, so a re-plan
    can pick a new sub-sequence (a slowed rank's stride 1 -> 2, or back) from the whole grid."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None

    @classmethod
    def of(cls, scheduler: object) -> ScheduleSnapshot:
        sigmas = getattr(scheduler, "sigmas", None)
        return cls(scheduler.timesteps.clone(), None if sigmas is None else sigmas.clone())

    def retime(self, scheduler: object, indices: Sequence[int]) -> None:
        """Visit `indices` of the full grid. The steps already taken stay a prefix of `indices`, so the
        step index and a multistep solver's history (its last outputs at the sigmas just before the
        step index) stay valid: DPM-Solver's formulas take non-uniform steps as they come."""
        scheduler.timesteps = self.timesteps
        if self.sigmas is not None:
            scheduler.sigmas = self.sigmas
        restrict_to_indices(scheduler, indices)


class SyncReplanner:
    """`--stadi_replan sync`: at each sync point every rank's speed over the last period is gathered
    (the same list everywhere, so every rank takes the same decision), and the remaining steps are
    re-planned when `decide_replan` promises the gain at enough consecutive sync points."""

    def __init__(self, groups: StadiGroups, tolerance: float, policy: ReplanPolicy | None = None):
        self.groups = groups
        self.tolerance = tolerance
        self.policy = policy or ReplanPolicy()
        self.confirmations = 0
        self.log: list[dict] = []  # one entry per re-plan, for logs and the benchmark

    def period_speeds(self, records: Sequence[StepRecord], device: torch.device) -> list[float] | None:
        mine = row_speed(records) or 0.0
        speeds = self.groups.band.all_gather_floats(mine, device)
        if not all(speed > 0 for speed in speeds):
            return None  # a rank computed nothing timed this period: no evidence
        return self.groups.shared_speeds(speeds, device)

    def decide(self, current: Plan, next_base_step: int, speeds: list[float] | None,
               transition_seconds: float) -> ReplanDecision | None:
        if speeds is None:
            return None
        decision = decide_replan(current, next_base_step=next_base_step, speeds=speeds,
                                 confirmations=self.confirmations, policy=self.policy, tolerance=self.tolerance,
                                 transition_seconds=transition_seconds)
        self.confirmations = decision.confirmations
        if decision.replan:
            self.log.append({"base_step": next_base_step, "old_speeds": list(current.speeds), "new_speeds": speeds,
                             "old_rows": [r.num_rows for r in current.ranks],
                             "new_rows": [r.num_rows for r in decision.new_plan.ranks],
                             "old_strides": [r.stride for r in current.ranks],
                             "new_strides": [r.stride for r in decision.new_plan.ranks],
                             "predicted_gain": decision.gain, "reason": decision.reason, "plan": decision.new_plan})
        return decision


def executed_evals(final: Plan, replans: Sequence[dict], rank: int) -> int:
    """Model evaluations `rank` runs under `final` and the re-plans that followed it (absolute base
    steps: each re-plan covers the steps from its `offset` on)."""
    evals, plan, offset = final.warmup_steps, final, 0
    for entry in replans:
        stop = entry["offset"]
        evals += sum(1 for k in plan.ranks[rank].steps if offset + k < stop)
        plan, offset = entry["plan"], stop
    return evals + len(plan.ranks[rank].steps)
