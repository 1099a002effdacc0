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

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .anchor import Settled, settle_plan
from .evidence import (
    MAX_FORWARD_SECONDS,
    CostEstimate,
    RankEvidence,
    combine_evidence,
    estimate_costs,
    paired,
)
from .plan_types import Plan
from .planning import plan_warmup
from .validation import MAX_ROWS, MAX_STRIDE_LIMIT, require_int

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
    # With a step cache (--cache_method), per band rank: the share of the last call's displaced forwards it
    # served and a served forward's seconds (`with_step_cache`); empty without one.
    served: tuple[tuple[float, float], ...] = field(default=())

    def to_json(self) -> dict:
        return {"evidence": [[rank.to_json() for rank in branch] for branch in self.evidence.branches],
                "warmup_rows": list(self.warmup_rows), "plan_rows": list(self.plan_rows),
                "plan_strides": list(self.plan_strides), "exchange_seconds": list(self.exchange_seconds),
                "pending": None if self.pending is None else [[rank.to_json() for rank in branch]
                                                              for branch in self.pending.branches],
                "served": [list(entry) for entry in self.served]}

    @classmethod
    def from_json(cls, data: object, num_ranks: int | None = None, num_branches: int | None = None,
                  max_stride: int = MAX_STRIDE_LIMIT) -> CallMemory:
        """A memory read back (the profile cache), every field checked: a ValueError (one line) when it is
        malformed, out of range, or not for `num_ranks` ranks in `num_branches` CFG branches (None: any)."""
        try:
            return cls._from_json(data, num_ranks, num_branches, max_stride)
        except (KeyError, TypeError, OverflowError, RecursionError) as error:
            raise ValueError(f"memory is malformed ({type(error).__name__}: {str(error)[:200]})") from None

    @classmethod
    def _from_json(cls, data: object, num_ranks: int | None, num_branches: int | None, max_stride: int
                   ) -> CallMemory:
        if not isinstance(data, dict):
            raise ValueError(f"memory must be an object, got {type(data).__name__}")  # noqa: TRY004
        unknown = set(data) - {"evidence", "warmup_rows", "plan_rows", "plan_strides", "exchange_seconds", "pending",
                               "served"}
        if unknown:
            raise ValueError(f"memory has unknown fields {sorted(map(str, unknown))[:5]}")

        def evidence(value: object, name: str) -> Evidence:
            if not isinstance(value, list) or not value or not all(isinstance(branch, list) for branch in value):
                raise ValueError(f"memory {name} must be a non-empty list of CFG branches")
            return Evidence(tuple(tuple(RankEvidence.from_json(rank) for rank in branch) for branch in value))

        def integers(name: str, minimum: int, maximum: int) -> tuple[int, ...]:
            values = data[name]
            if not isinstance(values, list):
                raise ValueError(f"memory {name} must be a list")  # noqa: TRY004
            return tuple(require_int(f"memory {name}[{i}]", v, minimum=minimum, maximum=maximum)
                         for i, v in enumerate(values))

        branches = evidence(data["evidence"], "evidence")
        lists = [integers("warmup_rows", 1, MAX_ROWS), integers("plan_rows", 1, MAX_ROWS),
                 integers("plan_strides", 1, max_stride)]
        exchange = data.get("exchange_seconds", [])
        if not isinstance(exchange, list) or not all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v <= MAX_FORWARD_SECONDS
                for v in exchange):
            raise ValueError(f"memory exchange_seconds must be a list of seconds in [0, {MAX_FORWARD_SECONDS:g}]")
        pending = None if data.get("pending") is None else evidence(data["pending"], "pending")
        served = data.get("served", [])
        if not isinstance(served, list) or not all(
                isinstance(entry, list) and len(entry) == 2 and all(not isinstance(v, bool) and isinstance(v, (int, float))
                                                                   for v in entry)
                and 0 <= entry[0] <= 1 and 0 <= entry[1] <= MAX_FORWARD_SECONDS for entry in served):
            raise ValueError("memory served must be a list of [share in [0, 1], seconds] per rank")
        ranks = num_ranks if num_ranks is not None else len(lists[0])
        count = num_branches if num_branches is not None else len(branches.branches)
        if (len(branches.branches) != count or any(len(b) != ranks or not all(r.sizes for r in b)
                                                   for b in branches.branches)
                or any(len(values) != ranks for values in lists)
                or (pending is not None and any(len(b) != ranks for b in pending.branches))
                or (served and len(served) != ranks)):
            raise ValueError(f"memory is not for {count} CFG branch(es) of {ranks} ranks")
        return cls(branches, *lists, exchange_seconds=tuple(float(v) for v in exchange[-EXCHANGE_MEMORY_CALLS:]),
                   pending=pending, served=tuple((float(a), float(b)) for a, b in served))

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


def with_step_cache(estimates: Sequence[CostEstimate], served: Sequence[tuple[float, float]]) -> list[CostEstimate]:
    """Each rank's expected cost of a forward when a step cache serves the share of them it served in the last
    call (`CostEstimate.with_served`); unchanged without that record. Caches serve ranks unequally (a stride-2
    rank compares inputs two steps apart, which differ more), so a plan of computed forwards alone leaves the
    rank the cache helps most waiting at every sync point."""
    if not served:
        return list(estimates)
    return [estimate.with_served(share, seconds) for estimate, (share, seconds) in zip(estimates, served)]


def remember_call(memory: CallMemory | None, displaced: Evidence, *, rows: int, warmup_rows: Sequence[int],
                  ran: Plan, exchange_seconds: float, served: Sequence[tuple[float, float]] = ()
                  ) -> tuple[CallMemory, list[str]]:
    """The memory after a call whose displaced forwards gave `displaced` and whose last plan was `ran`;
    `served`: the call's step-cache record per band rank (`CallMemory.served`)."""
    evidence, pending, how = displaced.combined_with(memory.evidence if memory else None, rows,
                                                     memory.pending if memory else None)
    exchange = memory.with_exchange(exchange_seconds) if memory else (exchange_seconds,)
    return CallMemory(evidence, tuple(warmup_rows), tuple(r.num_rows for r in ran.ranks),
                      tuple(r.stride for r in ran.ranks), exchange, pending,
                      tuple((float(share), float(seconds)) for share, seconds in served)), how
