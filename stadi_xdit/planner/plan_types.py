"""The plan the runtime executes: who owns which rows and which base steps each rank computes.

``Plan`` validates itself on construction (like torchtitan's ``ParallelDims``), so a plan read back
from JSON or built by hand is as trustworthy as one from ``plan()``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .strides import stride_period, sync_points
from .validation import (
    MAX_STRIDE_LIMIT,
    require_choice,
    require_int,
    require_layout,
    require_speeds,
    require_steps,
)

MODES = ("uniform", "spatial", "full")


@dataclass(frozen=True)
class RankPlan:
    """One rank's share: rows ``[row_start, row_end)`` and the base steps ``k`` it computes.

    ``num_base_steps`` is T' = num_steps - warmup_steps (needed to truncate the last segment).
    """

    rank: int
    row_start: int
    row_end: int
    stride: int
    steps: tuple[int, ...]
    num_evals: int
    num_base_steps: int

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    def segments(self) -> tuple[tuple[int, int], ...]:
        """``(k, k_next)`` per computed step: the band moves from t[W+k] to t[W+k_next]."""
        return tuple((k, min(k + self.stride, self.num_base_steps)) for k in self.steps)


@dataclass(frozen=True)
class Prediction:
    """Cost-model prediction for one image (seconds if speeds are rows/s)."""

    total_seconds: float
    warmup_seconds: float
    busy_seconds: tuple[float, ...]
    idle_seconds: tuple[float, ...]
    uniform_total_seconds: float
    speedup_vs_uniform: float


@dataclass(frozen=True)
class Plan:
    """A complete STADI layout. ``ranks`` is the post-warmup layout; ``warmup_row_bounds`` the warmup one."""

    mode: str
    rows: int
    align: int
    num_steps: int
    warmup_steps: int
    max_stride: int
    speeds: tuple[float, ...]
    ranks: tuple[RankPlan, ...]
    period: int
    sync_points: tuple[int, ...]
    predicted: Prediction
    warmup_row_bounds: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        require_choice("mode", self.mode, MODES)
        require_speeds(self.speeds)
        require_layout(len(self.speeds), self.rows, self.align)
        require_steps(self.num_steps, self.warmup_steps)
        require_int("max_stride", self.max_stride, minimum=1, maximum=MAX_STRIDE_LIMIT)
        if len(self.ranks) != len(self.speeds) or not self.ranks:
            raise ValueError(
                f"ranks must have one entry per speed ({len(self.speeds)}), got {len(self.ranks)}"
            )
        self._check_bands("ranks", self.row_bounds())
        self._check_bands("warmup_row_bounds", list(self.warmup_row_bounds))
        for index, rank in enumerate(self.ranks):
            self._check_rank_timeline(index, rank)
        strides = [rank.stride for rank in self.ranks]
        if self.period != stride_period(strides):
            raise ValueError(f"period must be lcm(strides) = {stride_period(strides)}, got {self.period}")
        if self.sync_points != sync_points(self.num_base_steps, self.period):
            raise ValueError(f"sync_points must be the multiples of period={self.period} below T' plus T'")

    @property
    def num_base_steps(self) -> int:
        """T': the base steps after warmup."""
        return self.num_steps - self.warmup_steps

    @property
    def num_periods(self) -> int:
        return len(self.sync_points) - 1

    def row_bounds(self) -> list[tuple[int, int]]:
        return [(rank.row_start, rank.row_end) for rank in self.ranks]

    def steps_in_period(self, rank: int, period_index: int) -> tuple[int, ...]:
        """Base steps ``rank`` computes in ``[sync_points[p], sync_points[p+1])``."""
        if not 0 <= rank < len(self.ranks):
            raise ValueError(f"rank must be in [0, {len(self.ranks)}), got {rank}")
        if not 0 <= period_index < self.num_periods:
            raise ValueError(f"period_index must be in [0, {self.num_periods}), got {period_index}")
        # Periods start at multiples of L and strides divide L, so a rank's steps restart on the boundary.
        start, end = self.sync_points[period_index], self.sync_points[period_index + 1]
        return tuple(range(start, end, self.ranks[rank].stride))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            fields = json.loads(text)
            ranks = tuple(RankPlan(**{**rank, "steps": tuple(rank["steps"])}) for rank in fields.pop("ranks"))
            predicted = fields.pop("predicted")
            for key in ("busy_seconds", "idle_seconds"):
                predicted[key] = tuple(predicted[key])
            return cls(
                **{
                    **fields,
                    "speeds": tuple(fields["speeds"]),
                    "sync_points": tuple(fields["sync_points"]),
                    "warmup_row_bounds": tuple(tuple(bounds) for bounds in fields["warmup_row_bounds"]),
                },
                ranks=ranks,
                predicted=Prediction(**predicted),
            )
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, RecursionError) as error:
            raise ValueError(f"text is not a STADI plan JSON document: {type(error).__name__}: "
                             f"{str(error)[:200]}") from None

    def explain(self) -> str:
        """A human-readable table of the plan and its predicted latency."""
        from .explain import format_plan  # local: rendering is only needed when asked for

        return format_plan(self)

    def _check_bands(self, name: str, bounds: list[tuple[int, int]]) -> None:
        if len(bounds) != len(self.speeds):
            raise ValueError(f"{name} must have one band per rank ({len(self.speeds)}), got {len(bounds)}")
        expected_start = 0
        for index, (start, end) in enumerate(bounds):
            size = end - start
            if start != expected_start or size < self.align or size % self.align:
                raise ValueError(
                    f"{name}[{index}] must be [{expected_start}, ...) with a size that is a positive "
                    f"multiple of align={self.align}, got [{start}, {end})"
                )
            expected_start = end
        if expected_start != self.rows:
            raise ValueError(f"{name} must cover rows [0, {self.rows}), but end at {expected_start}")

    def _check_rank_timeline(self, index: int, rank: RankPlan) -> None:
        stride_cap = self.max_stride if self.mode == "full" else 1
        if rank.rank != index:
            raise ValueError(f"ranks[{index}].rank must be {index}, got {rank.rank}")
        if not 1 <= rank.stride <= stride_cap:
            raise ValueError(f"ranks[{index}].stride must be in [1, {stride_cap}] for mode={self.mode!r}")
        if rank.num_base_steps != self.num_base_steps:
            raise ValueError(f"ranks[{index}].num_base_steps must be T'={self.num_base_steps}")
        if rank.steps != tuple(range(0, self.num_base_steps, rank.stride)):
            raise ValueError(
                f"ranks[{index}].steps must be 0, stride, 2*stride, ... < T'={self.num_base_steps}"
            )
        if rank.num_evals != self.warmup_steps + len(rank.steps):
            raise ValueError(f"ranks[{index}].num_evals must be warmup_steps + len(steps)")
