"""Adaptive STADI's policy across calls: what a pipeline remembers, and what each call plans from it.

Pure Python; `runtime/loop.py` executes it (gathering the evidence, so every rank holds the same
numbers and takes the same decisions). One call, read in order:

1. `warmup_layout`: with a memory, the settled spatial bands of its estimates (anchored at the last
   call's warmup bands); else uniform bands, or spatial bands of known speeds.
2. `plan_call`: the plan after warmup, settled (`planner/anchor.py`) against the plan that ran last
   (with a memory) or against equal bands at stride 1.
3. `remember_call`: the call's displaced forwards merged into the memory (`combine_evidence`), with
   the plan that ran and the measured exchange.

The memory keeps displaced forwards only: they are the workload the plan is for, and warmup forwards
also pay the synchronous K/V gathers. So with a memory the warmup's samples are not mixed in: a change
of load shows in the call's displaced steps, and the next call moves (``--stadi_replan sync`` moves
within the call).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .anchor import Settled, settle_plan
from .evidence import CostEstimate, RankEvidence, combine_evidence, estimate_costs, paired
from .plan_types import Plan
from .planning import plan_warmup

# Calls whose measured warmup exchange a memory keeps (their median is planned on).
EXCHANGE_MEMORY_CALLS = 5


@dataclass(frozen=True)
class Evidence:
    """Every rank's evidence, the same on every rank: one list per CFG branch, in band-rank order."""

    branches: tuple[tuple[RankEvidence, ...], ...]

    def combined_with(self, memory: Evidence | None, max_fixed_rows: float, pending: Evidence | None = None
                      ) -> tuple[Evidence, Evidence, list[str]]:
        """Memory and this evidence merged per rank (`planner.evidence.combine_evidence`): the
        evidence, what is set aside as pending, and what happened per band rank (the first branch's)."""
        if memory is None or len(memory.branches) != len(self.branches):
            empty = tuple(RankEvidence() for _ in self.branches[0])
            return self, Evidence(tuple(empty for _ in self.branches)), ["new"] * len(self.branches[0])
        out, held, words = [], [], None
        for index, (old, new) in enumerate(zip(memory.branches, self.branches)):
            suspect = pending.branches[index] if pending is not None and len(pending.branches) > index else None
            merged, aside, how = combine_evidence(old, new, max_fixed_rows, suspect)
            out.append(tuple(merged))
            held.append(tuple(aside))
            words = words or how
        return Evidence(tuple(out)), Evidence(tuple(held)), words

    def estimates(self, max_fixed_rows: float) -> list[CostEstimate]:
        """One cost model per band rank (the slower of each CFG pair)."""
        return paired([estimate_costs(branch, max_fixed_rows) for branch in self.branches])


@dataclass(frozen=True)
class CallMemory:
    """What a pipeline remembers of its last calls of one image size (``--stadi_replan calls|sync``).

    The same on every rank: everything in it was gathered. The next call warms up on the settled
    spatial bands of its estimates, and its plan is settled against the plan that ran last.
    """

    evidence: Evidence
    warmup_rows: tuple[int, ...]
    plan_rows: tuple[int, ...]
    plan_strides: tuple[int, ...]
    exchange_seconds: tuple[float, ...] = field(default=())  # the last calls' exchange of one warmup step
    pending: Evidence | None = None  # evidence that contradicted the memory once (combine_evidence)

    def to_json(self) -> dict:
        return {"evidence": [[rank.to_json() for rank in branch] for branch in self.evidence.branches],
                "warmup_rows": list(self.warmup_rows), "plan_rows": list(self.plan_rows),
                "plan_strides": list(self.plan_strides), "exchange_seconds": list(self.exchange_seconds),
                "pending": None if self.pending is None else [[rank.to_json() for rank in branch]
                                                              for branch in self.pending.branches]}

    @classmethod
    def from_json(cls, data: object, num_ranks: int, num_branches: int) -> CallMemory:
        """A memory read back (the profile cache); ValueError when it does not fit this launch."""
        if not isinstance(data, dict):
            raise ValueError(f"memory must be an object, got {type(data).__name__}")  # noqa: TRY004
        try:
            branches = tuple(tuple(RankEvidence.from_json(rank) for rank in branch) for branch in data["evidence"])
            lists = [tuple(int(v) for v in data[name]) for name in ("warmup_rows", "plan_rows", "plan_strides")]
            exchange = tuple(float(v) for v in data.get("exchange_seconds", ()))
            pending = data.get("pending")
            pending = None if pending is None else Evidence(tuple(tuple(RankEvidence.from_json(rank) for rank in b)
                                                                  for b in pending))
        except (KeyError, TypeError) as error:
            raise ValueError(f"memory is missing or mistypes {error}") from None
        if (len(branches) != num_branches or any(len(b) != num_ranks or not all(r.sizes for r in b) for b in branches)
                or any(len(values) != num_ranks for values in lists)
                or not all(math.isfinite(v) and v >= 0 for v in exchange)):
            raise ValueError(f"memory is not for {num_branches} CFG branch(es) of {num_ranks} ranks")
        return cls(Evidence(branches), *lists, exchange_seconds=exchange[-EXCHANGE_MEMORY_CALLS:], pending=pending)

    def with_exchange(self, measured: float) -> tuple[float, ...]:
        return (*self.exchange_seconds, measured)[-EXCHANGE_MEMORY_CALLS:]

    def typical_exchange_seconds(self, measured: float) -> float:
        """This call's measured warmup exchange, or the median with the remembered calls' (one
        disturbed warmup must not decide the plan)."""
        return statistics.median(self.with_exchange(measured))


def warmup_layout(memory: CallMemory | None, *, num_ranks: int, rows: int, align: int, num_steps: int,
                  warmup_steps: int, known_speeds: Sequence[float] | None = None) -> tuple[Plan, str]:
    """The warmup's bands (a `spatial` or `uniform` plan) and why."""
    if memory is None:
        return plan_warmup(num_ranks, rows=rows, align=align, num_steps=num_steps, warmup_steps=warmup_steps,
                           speeds=known_speeds), "no memory"
    settled = settle_plan(memory.evidence.estimates(rows), anchor_rows=memory.warmup_rows, rows=rows, align=align,
                          num_steps=num_steps, warmup_steps=warmup_steps, mode="spatial")
    return settled.plan, settled.reason


def plan_call(estimates: Sequence[CostEstimate], memory: CallMemory | None, **plan_terms) -> Settled:
    """The plan after warmup (`settle_plan` keywords in `plan_terms`), anchored at the memory's plan."""
    if memory is not None:
        plan_terms.update(anchor_rows=memory.plan_rows, anchor_strides=memory.plan_strides)
    return settle_plan(estimates, **plan_terms)


def remember_call(memory: CallMemory | None, displaced: Evidence, *, rows: int, warmup_rows: Sequence[int],
                  ran: Plan, exchange_seconds: float) -> tuple[CallMemory, list[str]]:
    """The memory after a call whose displaced forwards gave `displaced` and whose last plan was `ran`."""
    evidence, pending, how = displaced.combined_with(memory.evidence if memory else None, rows,
                                                     memory.pending if memory else None)
    exchange = memory.with_exchange(exchange_seconds) if memory else (exchange_seconds,)
    return CallMemory(evidence, tuple(warmup_rows), tuple(r.num_rows for r in ran.ranks),
                      tuple(r.stride for r in ran.ranks), exchange, pending), how
