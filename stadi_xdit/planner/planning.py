"""``plan()`` and ``plan_warmup()``: choose bands and strides for measured per-rank speeds.

Modes:
  * ``uniform``: equal bands, stride 1 (DistriFusion-style patch parallelism; the baseline).
  * ``spatial``: elastic bands sized to speed (water-filling), stride 1.
  * ``full``:    elastic bands *and* strides (slow ranks compute every s-th step), chosen by the
                 LCM-minimising quantisation below.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from .bands import row_bounds, uniform_band_rows, water_fill_band_rows
from .cost import LatencyBreakdown, predict_latency_unchecked, require_overheads
from .plan_types import MODES, Plan, Prediction, RankPlan
from .strides import candidate_periods, ideal_strides, nearest_divisor_strides, stride_period, sync_points
from .validation import (
    MAX_STRIDE_LIMIT,
    require_choice,
    require_int,
    require_layout,
    require_seconds,
    require_speeds,
    require_steps,
)


@dataclass(frozen=True)
class _Problem:
    """Validated inputs shared by every candidate layout."""

    speeds: tuple[float, ...]
    rows: int
    align: int
    num_steps: int
    warmup_steps: int
    sync_seconds: float
    exchange_seconds: float
    step_overhead_seconds: tuple[float, ...]  # one per rank
    warmup_exchange_seconds: float = 0.0

    @property
    def num_ranks(self) -> int:
        return len(self.speeds)

    def predict(
        self, band_rows: Sequence[int], strides: Sequence[int], warmup_band_rows: Sequence[int]
    ) -> LatencyBreakdown:
        return predict_latency_unchecked(
            band_rows,
            strides,
            self.speeds,
            num_steps=self.num_steps,
            warmup_steps=self.warmup_steps,
            warmup_band_rows=warmup_band_rows,
            sync_seconds=self.sync_seconds,
            exchange_seconds=self.exchange_seconds,
            step_overhead_seconds=self.step_overhead_seconds,
            warmup_exchange_seconds=self.warmup_exchange_seconds,
        )

    def step_speeds(self) -> tuple[float, ...]:
        return step_speeds(self.speeds, self.step_overhead_seconds, self.rows)

    def uniform_rows(self) -> tuple[int, ...]:
        return uniform_band_rows(self.num_ranks, self.rows, self.align)

    def elastic_rows(self, strides: Sequence[int]) -> tuple[int, ...]:
        if any(self.step_overhead_seconds):
            return water_fill_with_overheads(self.speeds, strides, self.step_overhead_seconds, self.rows, self.align)
        # Weight v_i * s_i: a rank computing every s-th step can afford s times the rows per step.
        weights = [speed * stride for speed, stride in zip(self.speeds, strides)]
        return water_fill_band_rows(weights, self.rows, self.align)


def water_fill_with_overheads(
    speeds: Sequence[float], strides: Sequence[int], overheads: Sequence[float], rows: int, align: int
) -> tuple[int, ...]:
    """Rows per rank minimising ``max_i (rows_i / v_i + o_i) / s_i``: the period's time per base step.

    The same greedy as ``water_fill_band_rows`` (each further unit to the rank whose cost after taking
    it is smallest; ties: lowest rank), on costs that include each rank's fixed per-step overhead
    ``o_i``, paid once per computed step, i.e. every ``s_i``-th base step. Each rank's cost sequence is
    still non-decreasing, so the greedy stays exact. With stride 1 the cost is the very float the cost
    model computes for a step, ``rows / v + o``, so ``spatial <= uniform`` stays exact in floating point.
    """
    def cost(rank: int, band_rows: int) -> float:
        step = band_rows / speeds[rank] + overheads[rank]
        return step if strides[rank] == 1 else step / strides[rank]

    band_rows = [align] * len(speeds)
    heap = [(cost(rank, align + align), rank) for rank in range(len(speeds))]
    heapq.heapify(heap)
    for _ in range(rows // align - len(speeds)):
        _, rank = heap[0]
        band_rows[rank] += align
        heapq.heapreplace(heap, (cost(rank, band_rows[rank] + align), rank))
    return tuple(band_rows)


def plan(
    speeds: Sequence[float],
    *,
    rows: int,
    align: int,
    num_steps: int,
    warmup_steps: int,
    mode: str = "full",
    max_stride: int = 2,
    tolerance: float = 0.02,
    sync_seconds: float = 0.0,
    exchange_seconds: float = 0.0,
    step_overhead_seconds: float | Sequence[float] = 0.0,
    warmup_speeds_known: bool = False,
    warmup_exchange_seconds: float = 0.0,
    warmup_rows: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
    band_rows: Sequence[int] | None = None,
) -> Plan:
    """Plan bands and strides for ranks with throughputs ``speeds`` (token rows per second).

    ``warmup_speeds_known``: the speeds were known before the run (profile cache, user), so the warmup
    steps already used elastic bands; otherwise warmup ran uniform bands. Only affects non-uniform modes.
    ``step_overhead_seconds``: a fixed cost per computed step, one number or one per rank (a calibrated
    runtime measures it per rank); elastic bands account for it. ``exchange_seconds``: the K/V exchange
    per sync period; ``warmup_exchange_seconds``: the synchronous K/V gathers of one warmup step.

    ``warmup_rows``: the warmup layout that ran (overrides ``warmup_speeds_known``). ``strides``: plan
    only the bands, for these strides; ``band_rows`` too: score this very layout (the noise floor in
    ``planner/anchor.py`` compares the plan it keeps with the plan it could move to).
    """
    speeds = require_speeds(speeds)
    rows, align = require_layout(len(speeds), rows, align)
    num_steps, warmup_steps = require_steps(num_steps, warmup_steps)
    mode = require_choice("mode", mode, MODES)
    max_stride = require_int("max_stride", max_stride, minimum=1, maximum=MAX_STRIDE_LIMIT)
    tolerance = require_seconds("tolerance", tolerance)
    problem = _Problem(
        speeds=speeds,
        rows=rows,
        align=align,
        num_steps=num_steps,
        warmup_steps=warmup_steps,
        sync_seconds=require_seconds("sync_seconds", sync_seconds),
        exchange_seconds=require_seconds("exchange_seconds", exchange_seconds),
        step_overhead_seconds=require_overheads(step_overhead_seconds, len(speeds)),
        warmup_exchange_seconds=require_seconds("warmup_exchange_seconds", warmup_exchange_seconds),
    )

    ones = (1,) * problem.num_ranks
    if warmup_rows is not None:
        warmup_rows = _require_bands("warmup_rows", warmup_rows, problem)
    elif warmup_speeds_known and mode != "uniform":
        warmup_rows = problem.elastic_rows(ones)
    else:
        warmup_rows = problem.uniform_rows()
    if strides is not None:
        strides = tuple(require_int(f"strides[{i}]", s, minimum=1, maximum=max_stride)
                        for i, s in enumerate(strides))
        if len(strides) != problem.num_ranks or (mode != "full" and any(s != 1 for s in strides)):
            raise ValueError(f"strides must be {problem.num_ranks} integers (all 1 unless mode is 'full'), "
                             f"got {strides!r}")
        band_rows = problem.elastic_rows(strides) if band_rows is None else _require_bands("band_rows", band_rows,
                                                                                            problem)
    elif band_rows is not None:
        raise ValueError("band_rows needs strides")
    elif mode == "uniform":
        strides, band_rows = ones, problem.uniform_rows()
    elif mode == "spatial":
        strides, band_rows = ones, problem.elastic_rows(ones)
    else:
        strides, band_rows = _search_strides(problem, warmup_rows, max_stride, tolerance)
    return _assemble_plan(problem, mode, max_stride, strides, band_rows, warmup_rows)


def _require_bands(name: str, band_rows: Sequence[int], problem: _Problem) -> tuple[int, ...]:
    """Rows per rank: multiples of align, at least one unit each, covering every row."""
    values = tuple(require_int(f"{name}[{i}]", r, minimum=problem.align) for i, r in enumerate(band_rows))
    if (len(values) != problem.num_ranks or sum(values) != problem.rows
            or any(r % problem.align for r in values)):
        raise ValueError(f"{name} must be {problem.num_ranks} multiples of align={problem.align} summing to "
                         f"rows={problem.rows}, got {values!r}")
    return values


def step_speeds(speeds: Sequence[float], overheads: Sequence[float], rows: int) -> tuple[float, ...]:
    """What ideal strides compare: the speeds, or with fixed step costs, 1 / (time of an equal band)."""
    if not any(overheads):
        return tuple(speeds)
    share = rows / len(speeds)
    return tuple(1.0 / (share / speed + overhead) for speed, overhead in zip(speeds, overheads))


def plan_warmup(
    num_ranks: int,
    *,
    rows: int,
    align: int,
    num_steps: int,
    warmup_steps: int,
    speeds: Sequence[float] | None = None,
) -> Plan:
    """The warmup layout (all strides 1): elastic bands when ``speeds`` are known, else uniform bands.

    Without speeds the prediction assumes equal speeds of 1 row/s (``Plan.speeds`` says so).
    """
    num_ranks = require_int("num_ranks", num_ranks, minimum=1)
    if speeds is None:
        return plan(
            (1.0,) * num_ranks,
            rows=rows,
            align=align,
            num_steps=num_steps,
            warmup_steps=warmup_steps,
            mode="uniform",
        )
    speeds = require_speeds(speeds)
    if len(speeds) != num_ranks:
        raise ValueError(f"speeds must have num_ranks={num_ranks} entries, got {len(speeds)}")
    return plan(
        speeds,
        rows=rows,
        align=align,
        num_steps=num_steps,
        warmup_steps=warmup_steps,
        mode="spatial",
        warmup_speeds_known=True,
    )


def _search_strides(
    problem: _Problem, warmup_rows: tuple[int, ...], max_stride: int, tolerance: float
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """LCM-minimising stride quantisation; returns (strides, band rows).

    For each candidate period L, every rank takes the divisor of L nearest its ideal stride; each
    distinct stride vector gets optimal bands and a predicted latency. Among vectors within
    ``tolerance`` of the fastest, the smallest period wins (fewer syncs, fresher K/V), then the smaller
    largest stride, then the lexicographically smallest vector.

    L = 1 always yields all-ones, i.e. exactly the ``spatial`` plan, so the result is never predicted
    slower than ``spatial``: either all-ones is within tolerance (and wins on L = 1), or it is not, and
    then the winner is within tolerance of a best that is faster than all-ones by more than tolerance.
    """
    ideal = ideal_strides(problem.step_speeds())
    candidates: dict[tuple[int, ...], tuple[tuple[int, ...], float]] = {}
    for period in candidate_periods(max_stride):
        strides = nearest_divisor_strides(ideal, period, max_stride)
        if strides not in candidates:
            band_rows = problem.elastic_rows(strides)
            candidates[strides] = (band_rows, problem.predict(band_rows, strides, warmup_rows).total_seconds)

    best_seconds = min(seconds for _, seconds in candidates.values())
    acceptable = [s for s, (_, seconds) in candidates.items() if seconds <= best_seconds * (1 + tolerance)]
    chosen = min(acceptable, key=lambda strides: (stride_period(strides), max(strides), strides))
    return chosen, candidates[chosen][0]


def _assemble_plan(
    problem: _Problem,
    mode: str,
    max_stride: int,
    strides: tuple[int, ...],
    band_rows: tuple[int, ...],
    warmup_rows: tuple[int, ...],
) -> Plan:
    num_base_steps = problem.num_steps - problem.warmup_steps
    period = stride_period(strides)
    ranks = tuple(
        _rank_plan(rank, bounds, stride, problem.warmup_steps, num_base_steps)
        for rank, (bounds, stride) in enumerate(zip(row_bounds(band_rows), strides))
    )
    latency = problem.predict(band_rows, strides, warmup_rows)
    uniform_rows = problem.uniform_rows()
    uniform_seconds = problem.predict(uniform_rows, (1,) * problem.num_ranks, uniform_rows).total_seconds
    predicted = Prediction(
        total_seconds=latency.total_seconds,
        warmup_seconds=latency.warmup_seconds,
        busy_seconds=latency.busy_seconds,
        idle_seconds=latency.idle_seconds,
        uniform_total_seconds=uniform_seconds,
        speedup_vs_uniform=uniform_seconds / latency.total_seconds,
    )
    return Plan(
        mode=mode,
        rows=problem.rows,
        align=problem.align,
        num_steps=problem.num_steps,
        warmup_steps=problem.warmup_steps,
        max_stride=max_stride,
        speeds=problem.speeds,
        ranks=ranks,
        period=period,
        sync_points=sync_points(num_base_steps, period),
        predicted=predicted,
        warmup_row_bounds=row_bounds(warmup_rows),
    )


def _rank_plan(
    rank: int, bounds: tuple[int, int], stride: int, warmup_steps: int, num_base_steps: int
) -> RankPlan:
    steps = tuple(range(0, num_base_steps, stride))
    return RankPlan(
        rank=rank,
        row_start=bounds[0],
        row_end=bounds[1],
        stride=stride,
        steps=steps,
        num_evals=warmup_steps + len(steps),
        num_base_steps=num_base_steps,
    )
