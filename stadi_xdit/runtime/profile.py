"""Measuring each rank's speed during warmup and emulating slow ranks (the cache: profile_cache)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from stadi_xdit.runtime.profile_cache import ProfileCache  # noqa: F401  (moved; re-exported until callers switch)


@dataclass
class StepRecord:
    """One model evaluation of one rank, in seconds since the run started."""

    phase: str  # "warmup" or "stadi"
    base_step: int  # scheduler index for warmup, base step k after it
    start: float
    end: float
    wait: float  # blocked in collectives inside the forward
    emulated: float  # sleep added by --stadi_emulate_slowdown
    rows: int | None = None  # token rows of the band this forward computed

    @property
    def compute(self) -> float:
        """Time the device was busy: the forward minus its communication waits."""
        return self.end - self.start - self.wait


@dataclass
class RankTimeline:
    """Everything a rank did, for busy/idle accounting and Gantt plots."""

    origin: float = field(default_factory=time.perf_counter)
    steps: list[StepRecord] = field(default_factory=list)
    # (label, start, end) for communication outside forwards: transition and final gather.
    phases: list[tuple[str, float, float]] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def busy_seconds(self) -> float:
        return sum(record.compute for record in self.steps)


def measured_step_seconds(records: Sequence[StepRecord]) -> float:
    """Median compute time of warmup forwards; the first carries one-time costs and is skipped."""
    warmup = [r.compute for r in records if r.phase == "warmup"]
    if not warmup:
        raise ValueError("no warmup step was timed; speeds need --warmup_steps >= 1 or --stadi_speeds")
    usable = warmup[1:] if len(warmup) > 1 else warmup
    return statistics.median(usable)


@dataclass(frozen=True)
class StepCost:
    """One rank's calibrated cost of a forward: ``fixed_seconds + rows * row_seconds``."""

    fixed_seconds: float
    row_seconds: float
    sizes: tuple[int, ...]  # band sizes (token rows) the fit saw
    fitted: bool  # False: one band size only, the fixed cost is folded into the row cost

    @property
    def speed(self) -> float:
        """Token rows per second of the per-row part (the planner's speed)."""
        return 1.0 / self.row_seconds

    def seconds(self, rows: int) -> float:
        return self.fixed_seconds + rows * self.row_seconds


def timed_warmup(records: Sequence[StepRecord]) -> list[StepRecord]:
    """Warmup forwards usable for timing: all but the first (one-time costs: allocation, caches)."""
    warmup = [r for r in records if r.phase == "warmup"]
    if not warmup:
        raise ValueError("no warmup step was timed; speeds need --warmup_steps >= 1 or --stadi_speeds")
    return warmup[1:] if len(warmup) > 1 else warmup


# Smallest spread of band sizes, relative to the largest, that a fixed-cost fit is trusted with.
MIN_FIT_SPREAD = 0.2


def fit_step_cost(records: Sequence[StepRecord]) -> StepCost:
    """Fixed and per-row cost of one rank's forward from its timed warmup forwards.

    A line through the median compute time at each band size the warmup ran (least squares over
    those medians when there are more than two sizes). It needs two sizes; with one, or when the
    fit is not physical (a slope <= 0 or a negative fixed cost, i.e. timing noise larger than the
    size effect), the fixed cost is 0 and the row cost is the median seconds per row, as before.
    So it is when the sizes span less than `MIN_FIT_SPREAD` of the largest: two nearly equal bands
    (an elastic warmup on remembered speeds re-bands by a row or so) put noise into the intercept.
    """
    usable = timed_warmup(records)
    by_size: dict[int, list[float]] = {}
    for record in usable:
        if record.rows is None or record.rows <= 0:
            raise ValueError("warmup records need the band size (rows) to be calibrated")
        by_size.setdefault(record.rows, []).append(record.compute)
    sizes = sorted(by_size)
    points = [(float(size), statistics.median(by_size[size])) for size in sizes]
    fallback = statistics.median(r.compute / r.rows for r in usable)
    if len(points) < 2 or sizes[-1] - sizes[0] < MIN_FIT_SPREAD * sizes[-1]:
        return StepCost(0.0, fallback, tuple(sizes), False)
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
             / sum((x - mean_x) ** 2 for x, _ in points))
    fixed = mean_y - slope * mean_x
    if not (slope > 0 and fixed >= 0):
        return StepCost(0.0, fallback, tuple(sizes), False)
    return StepCost(fixed, slope, tuple(sizes), True)


def last_size_seconds(records: Sequence[StepRecord]) -> tuple[int, float]:
    """(rows, median compute seconds) of the timed warmup forwards at the last band size."""
    usable = timed_warmup(records)
    rows = usable[-1].rows
    return rows, statistics.median(r.compute for r in usable if r.rows == rows)


def complete_step_costs(fits: Sequence[StepCost], points: Sequence[tuple[int, float]],
                        max_fixed_rows: float) -> list[StepCost]:
    """Every rank's cost: the fixed cost in rows pooled over the ranks, anchored at each rank's time.

    A fitted line's intercept over its slope is the fixed cost in token rows. Its median over the
    ranks that fitted one (capped at `max_fixed_rows`, the image's rows: a slope near zero from
    timing noise would otherwise claim that rows cost nothing) is applied to every rank, through
    its median time at its last band size, ``points[i] = (rows, seconds)``:
    ``row = seconds / (fixed_rows + rows)``, ``fixed = fixed_rows * row``. So each rank's cost is
    exact at the size it last ran, and a slower device is slower at the fixed part too (exactly so
    for the slowdown emulation). One number pooled over ranks is steadier than one line per rank
    from one timed step per size, and it never reorders the ranks' speeds at their measured sizes.
    Without any fitted rank the costs stay as they are (no fixed cost).
    """
    ratios = [fit.fixed_seconds / fit.row_seconds for fit in fits if fit.fitted]
    if not ratios:
        return list(fits)
    fixed_rows = min(statistics.median(ratios), max_fixed_rows)
    out = []
    for fit, (rows, seconds) in zip(fits, points):
        row = seconds / (fixed_rows + rows)
        out.append(StepCost(fixed_rows * row, row, fit.sizes, fit.fitted))
    return out


def work_clock(device: torch.device) -> Callable[[], float]:
    """A clock of this rank's own device work, for the slowdown emulation.

    On CPU it is the compute thread's CPU time: ranks run single-threaded, a blocked collective
    burns none of it, and gloo's transfer threads and other tenants are not counted (emulating
    them again would slow the rank twice). On CUDA it is wall time after a device synchronize.
    """
    if device.type == "cuda":
        def cuda_clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return cuda_clock
    return time.thread_time


def emulate_slowdown(factor: float, compute_seconds: float) -> float:
    """Duty-cycle a rank: after a forward of `c` seconds, sleep `(factor - 1) * c`. Returns the sleep."""
    extra = max(0.0, (factor - 1.0) * compute_seconds)
    if extra > 0:
        time.sleep(extra)
    return extra
