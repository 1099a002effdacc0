"""Adaptive STADI: the timing evidence of a call, the memory between calls, and the mid-run re-plan.

Every forward is already timed (`StepRecord`: compute net of collective waits, emulated slowdown
included, band rows). Each is one sample ``(rows, seconds)`` of the rank's cost model; the first
forward of a call carries one-time costs and is left out. Ranks exchange their evidence (summaries
per band size, `planner.evidence.RankEvidence`) so that every rank holds the same numbers and takes
the same decisions with no broadcast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stadi_xdit.planner import Plan
from stadi_xdit.planner.calls import Evidence, with_step_cache
from stadi_xdit.planner.evidence import CostEstimate, RankEvidence
from stadi_xdit.planner.replan import ReplanDecision, ReplanPolicy, decide_replan
from stadi_xdit.runtime.groups import StadiGroups
from stadi_xdit.runtime.profile import StepRecord
from stadi_xdit.runtime.schedule import restrict_to_indices


def rank_evidence(records: Sequence[StepRecord]) -> RankEvidence:
    """This rank's samples ``(band rows, compute seconds)`` from `records`. A forward a step cache served
    is left out: it ran a few of the blocks, and the cost model is that of a computed forward."""
    return RankEvidence.of((r.rows, r.compute) for r in records if r.rows and not r.cached)


def call_records(records: Sequence[StepRecord]) -> Sequence[StepRecord]:
    """The forwards of a call usable for timing: all but its first (one-time costs: allocation, caches)."""
    return records[1:] if len(records) > 1 else records


def gather_evidence(groups: StadiGroups, mine: RankEvidence, device: torch.device, phase: str) -> Evidence:
    """Every rank's evidence on every rank (one list per CFG branch, in band-rank order)."""
    texts = groups.gather_text(json.dumps(mine.to_json()), device, phase=phase)
    return Evidence(tuple(tuple(RankEvidence.from_json(json.loads(t)) for t in branch) for branch in texts))


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
    """`--stadi_replan sync`: at each sync point the ranks gather their evidence of the period that just
    ended; merged into what the call knew (`planner.evidence.combine_evidence`: a change of load must
    contradict it in consecutive periods with `MIN_CHANGE_SAMPLES` samples, so no single period can)
    it gives every rank the same cost models, and the remaining steps are re-planned when
    `decide_replan` promises the gain at enough consecutive sync points."""

    def __init__(self, groups: StadiGroups, tolerance: float, evidence: Evidence | None, max_fixed_rows: float,
                 policy: ReplanPolicy | None = None, served: Sequence[tuple[float, float]] = ()):
        self.groups = groups
        self.tolerance = tolerance
        self.policy = policy or ReplanPolicy()
        self.evidence = evidence  # what the call knows (memory or warmup, then every period); None: speeds given
        self.pending: Evidence | None = None
        self.max_fixed_rows = max_fixed_rows
        self.confirmations = 0
        self.log: list[ReplanEvent] = []
        self.served = tuple(served)  # the step cache's record the call planned with (planner.calls.with_step_cache)

    def period_estimates(self, records: Sequence[StepRecord], device: torch.device) -> list[CostEstimate]:
        period = gather_evidence(self.groups, rank_evidence(records), device, phase="replan")
        self.evidence, self.pending, _ = period.combined_with(self.evidence, self.max_fixed_rows, self.pending)
        return with_step_cache(self.evidence.estimates(self.max_fixed_rows), self.served)

    def decide(self, current: Plan, next_base_step: int, estimates: list[CostEstimate],
               transition_seconds: float) -> ReplanDecision:
        decision = decide_replan(current, next_base_step=next_base_step, estimates=estimates,
                                 confirmations=self.confirmations, policy=self.policy, tolerance=self.tolerance,
                                 transition_seconds=transition_seconds)
        self.confirmations = decision.confirmations
        return decision


@dataclass(frozen=True)
class ReplanEvent:
    """One mid-run re-plan: where it starts (absolute base step), what changed and why."""

    offset: int
    old_speeds: list[float]
    new_speeds: list[float]
    old_rows: list[int]
    new_rows: list[int]
    old_strides: list[int]
    new_strides: list[int]
    predicted_gain: float
    reason: str
    plan: Plan

    @classmethod
    def of(cls, current: Plan, decision: ReplanDecision, offset: int) -> ReplanEvent:
        new = decision.new_plan
        return cls(offset, list(current.speeds), list(new.speeds), [r.num_rows for r in current.ranks],
                   [r.num_rows for r in new.ranks], [r.stride for r in current.ranks],
                   [r.stride for r in new.ranks], decision.gain, decision.reason, new)

    def to_json(self) -> dict:
        """Everything but the plan (for logs and the benchmark)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "plan"}


def executed_evals(final: Plan, replans: Sequence[ReplanEvent], rank: int) -> int:
    """Model evaluations `rank` runs under `final` and the re-plans that followed it (absolute base
    steps: each re-plan covers the steps from its `offset` on)."""
    evals, plan, offset = final.warmup_steps, final, 0
    for event in replans:
        stop = event.offset
        evals += sum(1 for k in plan.ranks[rank].steps if offset + k < stop)
        plan, offset = event.plan, stop
    return evals + len(plan.ranks[rank].steps)
