"""What the timings say: each rank's cost model ``t(rows) = fixed + rows * row`` with its uncertainty.

Pure Python. The runtime turns every timed forward of a rank into a sample ``(band rows, seconds)``;
this module summarises samples per band size (`RankEvidence`), merges a new call's evidence into the
memory of earlier calls, and fits each rank's cost model (`CostEstimate`).

Why it looks like this:

* **A cost model, not a rate.** Rows per second measured at one band size mix the fixed cost of a
  forward (embeddings, launches) into the per-row cost, so a rank given fewer rows looks slower per
  row, gets fewer rows again, and the plan runs away to a one-row band (issue 19). A line through the
  sizes a rank has run at separates the two; a rank's speed is then a function of its band.
* **Robust per size.** A size's time is the *lower* median of its samples: one disturbed forward
  (a stall, a page fault) only ever makes a forward slower, and with two samples the lower median is
  the undisturbed one. A forward more than `STALL_FACTOR` times that is a stall and is dropped. The
  spread is 1.4826 x the median absolute deviation of the rest (a standard deviation for Gaussian
  noise, unmoved by one outlier among three).
* **A noise floor.** A rank's relative noise shrinks from a prior (`PRIOR_NOISE`, worth
  `PRIOR_WEIGHT` samples) towards its measured spread as samples accumulate; the relative error of
  its estimate is noise / sqrt(samples). Plans move only on gains beyond that (`planner/anchor.py`).
* **Memory with forgetting.** Older evidence keeps `DECAY` of its weight each time a newer call's is
  merged, so a steady load converges and a past load fades. Evidence that contradicts the memory
  (more than `CHANGE_CONFIDENCE` standard errors off its prediction) is set aside; only when the next
  evidence contradicts it too (and the two hold `MIN_CHANGE_SAMPLES` samples) do they replace it: the
  load changed. One disturbed call (a burst of contention) never moves a plan.
* **One fixed cost, pooled.** The fixed cost in token rows (intercept / slope of a rank's line) is
  pooled over the ranks that fitted one (median, capped at the image's rows) and each rank's row cost
  is refitted through all its sizes with it: steadier than one line per rank, and a slower device is
  slower at the fixed part too (exactly so for the slowdown emulation).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .validation import MAX_ROWS

PRIOR_NOISE = 0.05  # relative spread of one forward assumed before any spread is measured
PRIOR_WEIGHT = 2.0  # ... worth this many samples of measured spread
DECAY = 0.8  # weight older evidence keeps each time a newer call's evidence is merged
CHANGE_CONFIDENCE = 3.0  # standard errors by which new evidence must contradict the memory to replace it
MIN_CHANGE_SAMPLES = 3  # fewer contradicting samples are outliers, not a change of load
FIT_CONFIDENCE = 2.0  # standard errors by which a fitted fixed cost must exceed zero to be believed
MIN_FIT_SPREAD = 0.2  # smallest spread of band sizes, relative to the largest, a fixed-cost fit is trusted with
MIN_WEIGHT = 0.05  # evidence decayed below this many samples is dropped
MAD_TO_SIGMA = 1.4826
STALL_FACTOR = 2.0  # a forward this many times its size's lower median is a stall: dropped, not noise
# What evidence read back (the profile cache) may hold: a forward of 100 ns to ~1 day, at most a million
# samples' weight, a spread of at most 100x. Beyond them a number is damage, not a measurement, and
# planning on it would overflow or starve a rank (a 1e-298 ms row cost).
MIN_FORWARD_SECONDS = 1e-7
MAX_FORWARD_SECONDS = 1e5
MAX_EVIDENCE_WEIGHT = 1e6
MAX_SPREAD = 100.0
# A step cache never serves every forward (a rank's last computes); planning on a share near 1 would
# promise a rank nearly free rows.
MAX_SERVED_SHARE = 0.9


@dataclass(frozen=True)
class SizeStats:
    """The forwards of one rank at one band size."""

    rows: int
    weight: float  # samples behind it (decayed in memory)
    seconds: float  # typical forward time: the lower median of the samples
    spread: float  # relative spread of one forward (1.4826 MAD / median); 0 with one sample
    dof: float  # samples behind the spread (samples - 1, decayed)

    def to_json(self) -> list[float]:
        return [self.rows, self.weight, self.seconds, self.spread, self.dof]

    @classmethod
    def from_json(cls, item: Sequence[float]) -> SizeStats:
        """One size's stats read back; a ValueError for anything a measurement cannot be."""
        def number(value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{value!r} is not a number")  # noqa: TRY004 (callers catch one type)
            return float(value)

        expected = (f"[rows in [1, {MAX_ROWS}], weight in (0, {MAX_EVIDENCE_WEIGHT:g}], seconds in "
                    f"[{MIN_FORWARD_SECONDS:g}, {MAX_FORWARD_SECONDS:g}], spread in [0, {MAX_SPREAD:g}], dof in "
                    f"[0, {MAX_EVIDENCE_WEIGHT:g}]]")
        try:
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 5:
                raise ValueError("not a list of five numbers")
            rows, weight, seconds, spread, dof = (number(value) for value in item)
        except (ValueError, OverflowError):
            raise ValueError(f"evidence entry must be {expected}, got {item!r:.200}") from None
        if not (rows.is_integer() and 1 <= rows <= MAX_ROWS and 0 < weight <= MAX_EVIDENCE_WEIGHT
                and MIN_FORWARD_SECONDS <= seconds <= MAX_FORWARD_SECONDS and 0 <= spread <= MAX_SPREAD
                and 0 <= dof <= MAX_EVIDENCE_WEIGHT):
            raise ValueError(f"evidence entry must be {expected}, got {list(item)!r:.200}")
        return cls(int(rows), weight, seconds, spread, dof)


@dataclass(frozen=True)
class CostEstimate:
    """One rank's fitted cost of a forward: ``fixed_seconds + rows * row_seconds``."""

    fixed_seconds: float
    row_seconds: float
    noise: float  # relative spread of one forward
    weight: float  # samples behind the estimate
    fitted: bool  # the fixed cost came from a line through two or more band sizes (this rank's or pooled)

    @property
    def speed(self) -> float:
        """Token rows per second of the per-row part (the planner's speed)."""
        return 1.0 / self.row_seconds

    @property
    def relative_error(self) -> float:
        """Relative standard error of a predicted forward time."""
        return self.noise / math.sqrt(max(self.weight, 1.0))

    def seconds(self, rows: float) -> float:
        return self.fixed_seconds + rows * self.row_seconds

    @classmethod
    def given(cls, speed: float) -> CostEstimate:
        """A speed the user gave (or a test injects): trusted exactly, no fixed cost."""
        return cls(0.0, 1.0 / speed, 0.0, math.inf, False)

    def with_served(self, share: float, served_seconds: float) -> CostEstimate:
        """The expected cost of a forward when a step cache serves `share` of them (at most
        `MAX_SERVED_SHARE`) in `served_seconds` each and computes the rest: what a plan balances under
        caching. The served cost is taken as fixed: it runs a block or two's worth, not the band's rows."""
        if not 0.0 <= share <= 1.0 or not 0.0 <= served_seconds <= MAX_FORWARD_SECONDS:
            raise ValueError(f"a served share in [0, 1] and seconds in [0, {MAX_FORWARD_SECONDS:g}], "
                             f"got {share!r}, {served_seconds!r}")
        share = min(share, MAX_SERVED_SHARE)
        return CostEstimate((1.0 - share) * self.fixed_seconds + share * served_seconds,
                            (1.0 - share) * self.row_seconds, self.noise, self.weight, self.fitted)


@dataclass(frozen=True)
class RankEvidence:
    """A rank's timed forwards, summarised per band size (sorted by rows)."""

    sizes: tuple[SizeStats, ...] = ()

    @classmethod
    def of(cls, samples: Iterable[tuple[int, float]]) -> RankEvidence:
        """Summarise ``(rows, seconds)`` samples; non-positive times (clock granularity) are skipped."""
        by_rows: dict[int, list[float]] = {}
        for rows, seconds in samples:
            if rows >= 1 and seconds > 0 and math.isfinite(seconds):
                by_rows.setdefault(int(rows), []).append(float(seconds))
        sizes = []
        for rows in sorted(by_rows):
            typical = statistics.median_low(by_rows[rows])
            times = [t for t in by_rows[rows] if t <= STALL_FACTOR * typical]  # a stall is no sample of noise
            middle = statistics.median(times)
            spread = MAD_TO_SIGMA * statistics.median(abs(t - middle) for t in times) / middle
            sizes.append(SizeStats(rows, float(len(times)), statistics.median_low(times), spread, len(times) - 1.0))
        return cls(tuple(sizes))

    @property
    def weight(self) -> float:
        return sum(size.weight for size in self.sizes)

    @property
    def noise(self) -> float:
        """Relative spread of one forward: the prior, shrunk towards the measured spread."""
        dof = sum(size.dof for size in self.sizes)
        measured = sum(size.dof * size.spread ** 2 for size in self.sizes)
        return math.sqrt((PRIOR_WEIGHT * PRIOR_NOISE ** 2 + measured) / (PRIOR_WEIGHT + dof))

    def decayed(self, factor: float = DECAY) -> RankEvidence:
        kept = (SizeStats(s.rows, s.weight * factor, s.seconds, s.spread, s.dof * factor) for s in self.sizes)
        return RankEvidence(tuple(s for s in kept if s.weight >= MIN_WEIGHT))

    def merged(self, newer: RankEvidence) -> RankEvidence:
        """This (older) evidence, decayed, with ``newer`` added; one entry per band size."""
        by_rows = {s.rows: s for s in self.decayed().sizes}
        for new in newer.sizes:
            old = by_rows.get(new.rows)
            if old is None:
                by_rows[new.rows] = new
                continue
            weight = old.weight + new.weight
            dof = old.dof + new.dof
            spread = math.sqrt((old.dof * old.spread ** 2 + new.dof * new.spread ** 2) / dof) if dof > 0 else 0.0
            seconds = (old.weight * old.seconds + new.weight * new.seconds) / weight
            by_rows[new.rows] = SizeStats(new.rows, weight, seconds, spread, dof)
        return RankEvidence(tuple(by_rows[rows] for rows in sorted(by_rows)))

    def fixed_rows(self) -> float | None:
        """Intercept over slope of a weighted line through the sizes (the fixed cost in token rows),
        or None without two sizes spread by `MIN_FIT_SPREAD`, without a physical fit, or where the
        intercept is within `FIT_CONFIDENCE` standard errors of zero (noise, not a fixed cost)."""
        if len(self.sizes) < 2 or self.sizes[-1].rows - self.sizes[0].rows < MIN_FIT_SPREAD * self.sizes[-1].rows:
            return None
        total = self.weight
        mean_x = sum(s.weight * s.rows for s in self.sizes) / total
        mean_y = sum(s.weight * s.seconds for s in self.sizes) / total
        spread_x = sum(s.weight * (s.rows - mean_x) ** 2 for s in self.sizes)
        slope = sum(s.weight * (s.rows - mean_x) * (s.seconds - mean_y) for s in self.sizes) / spread_x
        fixed = mean_y - slope * mean_x
        # A line through nearby sizes extrapolates its noise: at 14 % per forward, sizes 8 and 10 rows
        # fit anything from no fixed cost to most of a forward, and the plan would follow each new fit.
        fixed_error = self.noise * mean_y * math.sqrt(1.0 / total + mean_x ** 2 / spread_x)
        if slope <= 0 or fixed <= FIT_CONFIDENCE * fixed_error:
            return None
        return fixed / slope

    def estimate(self, fixed_rows: float, fitted: bool) -> CostEstimate:
        """The cost model through every size with ``fixed_rows`` given: ``t = row * (fixed_rows + rows)``,
        weighted least squares for ``row``."""
        row = (sum(s.weight * s.seconds * (fixed_rows + s.rows) for s in self.sizes)
               / sum(s.weight * (fixed_rows + s.rows) ** 2 for s in self.sizes))
        return CostEstimate(fixed_rows * row, row, self.noise, self.weight, fitted)

    def deviation(self, model: CostEstimate) -> float:
        """How far these times are from ``model``'s predictions: weighted mean of seconds / predicted - 1."""
        return sum(s.weight * (s.seconds / model.seconds(s.rows)) for s in self.sizes) / self.weight - 1.0

    def to_json(self) -> list[list[float]]:
        return [size.to_json() for size in self.sizes]

    @classmethod
    def from_json(cls, items: Sequence[Sequence[float]]) -> RankEvidence:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ValueError(f"evidence must be a list of size entries, got {type(items).__name__}")  # noqa: TRY004
        if len(items) > MAX_ROWS:
            raise ValueError(f"evidence lists {len(items)} band sizes, more than {MAX_ROWS} rows can have")
        sizes = sorted((SizeStats.from_json(item) for item in items), key=lambda s: s.rows)
        if len({s.rows for s in sizes}) != len(sizes):
            raise ValueError("evidence lists a band size twice")
        return cls(tuple(sizes))


def estimate_costs(evidence: Sequence[RankEvidence], max_fixed_rows: float) -> list[CostEstimate]:
    """Every rank's cost model, with the fixed cost in rows pooled over the ranks that fitted one."""
    if any(not rank.sizes for rank in evidence):
        raise ValueError("every rank needs at least one timed forward to be estimated")
    ratios = [r for r in (rank.fixed_rows() for rank in evidence) if r is not None]
    fixed_rows = min(statistics.median(ratios), max_fixed_rows) if ratios else 0.0
    return [rank.estimate(fixed_rows, bool(ratios)) for rank in evidence]


def combine_evidence(memory: Sequence[RankEvidence] | None, new: Sequence[RankEvidence], max_fixed_rows: float,
                     pending: Sequence[RankEvidence] | None = None
                     ) -> tuple[list[RankEvidence], list[RankEvidence], list[str]]:
    """Per rank, the evidence to estimate from: memory and ``new`` merged when they agree.

    A change of load must show twice: ``new`` that contradicts the memory is set aside as
    ``pending``; when the next evidence contradicts it too, the pending and the new evidence replace
    the memory (if they hold `MIN_CHANGE_SAMPLES`), and when it agrees again the pending is dropped.
    Returns (evidence, pending, what happened per rank: "new" with no memory, "merged",
    "suspect" (set aside once) or "changed").
    """
    empty = RankEvidence()
    if memory is None or len(memory) != len(new) or any(not rank.sizes for rank in memory):
        return list(new), [empty] * len(new), ["new"] * len(new)
    pending = list(pending) if pending is not None and len(pending) == len(new) else [empty] * len(new)
    models = estimate_costs(memory, max_fixed_rows)
    out, held, how = [], [], []
    for old, fresh, model, suspect in zip(memory, new, models, pending):
        if not fresh.sizes:
            out.append(old)
            held.append(suspect)
            how.append("merged")
            continue
        error = math.hypot(model.relative_error, fresh.noise / math.sqrt(fresh.weight))
        if abs(fresh.deviation(model)) <= CHANGE_CONFIDENCE * error:
            out.append(old.merged(fresh))
            held.append(empty)
            how.append("merged")
            continue
        both = suspect.merged(fresh) if suspect.sizes else fresh
        if suspect.sizes and both.weight >= MIN_CHANGE_SAMPLES:
            out.append(both)
            held.append(empty)
            how.append("changed")
        else:
            out.append(old)
            held.append(both)
            how.append("suspect")
    return out, held, how


def paired(estimates: Sequence[Sequence[CostEstimate]]) -> list[CostEstimate]:
    """One estimate per band rank from one list per CFG branch: the slower of each pair.

    Guidance mixes both branches of a band every step, so neither may run ahead.
    """
    if len(estimates) == 1:
        return list(estimates[0])
    return [CostEstimate(max(e.fixed_seconds for e in pair), max(e.row_seconds for e in pair),
                         max(e.noise for e in pair), min(e.weight for e in pair), all(e.fitted for e in pair))
            for pair in zip(*estimates)]
