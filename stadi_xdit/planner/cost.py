"""The planner's cost model: predicted wall-clock latency of one image for a given layout.

Per-step time of rank i is ``rows_i / v_i + step_overhead_i`` (linear in rows: every row attends to
the full image's K/V, so a row costs the same wherever it is; the overhead is what a forward costs
whatever its band: embeddings, text projections, launch and Python overhead). The overhead is one
number for every rank, or one per rank (a calibrated runtime measures both terms per rank). Warmup
steps run the warmup layout in lock-step with a sync and a synchronous K/V gather every step. After
warmup, each period between consecutive sync points lasts as long as its slowest rank's work, plus
one sync and one K/V exchange.

Kept free of planner internals so a cluster simulator can call ``predict_latency`` on any layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .strides import stride_period
from .validation import require_int, require_seconds, require_speeds, require_steps


@dataclass(frozen=True)
class LatencyBreakdown:
    """Predicted seconds for one image; ``busy`` is compute, ``idle = total - busy`` (waits + comms)."""

    total_seconds: float
    warmup_seconds: float
    busy_seconds: tuple[float, ...]
    idle_seconds: tuple[float, ...]


def predict_latency(
    band_rows: Sequence[int],
    strides: Sequence[int],
    speeds: Sequence[float],
    *,
    num_steps: int,
    warmup_steps: int,
    warmup_band_rows: Sequence[int] | None = None,
    sync_seconds: float = 0.0,
    exchange_seconds: float = 0.0,
    step_overhead_seconds: float | Sequence[float] = 0.0,
    warmup_exchange_seconds: float = 0.0,
) -> LatencyBreakdown:
    """Predict latency for bands (rows per rank, post-warmup), strides and speeds (rows/s).

    ``warmup_band_rows`` defaults to ``band_rows``. Rank i computes base steps 0, s_i, 2s_i, ... < T'
    with T' = num_steps - warmup_steps; sync points are the multiples of lcm(strides) and T'.
    ``step_overhead_seconds``: one number, or one per rank. ``warmup_exchange_seconds``: the
    synchronous K/V gathers of one warmup step.
    """
    speeds = require_speeds(speeds)
    num_steps, warmup_steps = require_steps(num_steps, warmup_steps)
    band_rows = _require_per_rank_ints("band_rows", band_rows, len(speeds), minimum=1)
    strides = _require_per_rank_ints("strides", strides, len(speeds), minimum=1)
    if warmup_band_rows is None:
        warmup_band_rows = band_rows
    warmup_band_rows = _require_per_rank_ints("warmup_band_rows", warmup_band_rows, len(speeds), minimum=1)
    return predict_latency_unchecked(
        band_rows,
        strides,
        speeds,
        num_steps=num_steps,
        warmup_steps=warmup_steps,
        warmup_band_rows=warmup_band_rows,
        sync_seconds=require_seconds("sync_seconds", sync_seconds),
        exchange_seconds=require_seconds("exchange_seconds", exchange_seconds),
        step_overhead_seconds=require_overheads(step_overhead_seconds, len(speeds)),
        warmup_exchange_seconds=require_seconds("warmup_exchange_seconds", warmup_exchange_seconds),
    )


def require_overheads(value: float | Sequence[float], num_ranks: int) -> tuple[float, ...]:
    """``step_overhead_seconds`` as one finite number >= 0 per rank (a single number applies to all)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != num_ranks:
            raise ValueError(f"step_overhead_seconds must be one number or {num_ranks} (one per rank), "
                             f"got {len(value)}")
        return tuple(require_seconds(f"step_overhead_seconds[{i}]", v) for i, v in enumerate(value))
    return (require_seconds("step_overhead_seconds", value),) * num_ranks


def predict_latency_unchecked(
    band_rows: Sequence[int],
    strides: Sequence[int],
    speeds: Sequence[float],
    *,
    num_steps: int,
    warmup_steps: int,
    warmup_band_rows: Sequence[int],
    sync_seconds: float,
    exchange_seconds: float,
    step_overhead_seconds: Sequence[float],
    warmup_exchange_seconds: float = 0.0,
) -> LatencyBreakdown:
    """``predict_latency`` without argument checks, for the planner's inner search loop. O(N).

    ``step_overhead_seconds`` is one number per rank here.
    """
    step_seconds = [
        rows / speed + overhead for rows, speed, overhead in zip(band_rows, speeds, step_overhead_seconds)
    ]
    warmup_step_seconds = [
        rows / speed + overhead for rows, speed, overhead in zip(warmup_band_rows, speeds, step_overhead_seconds)
    ]
    warmup_seconds = warmup_steps * (max(warmup_step_seconds) + sync_seconds + warmup_exchange_seconds)

    # Every full period looks the same (strides divide L), only a final truncated period differs.
    num_base_steps = num_steps - warmup_steps
    period = stride_period(strides)
    num_full_periods, tail_steps = divmod(num_base_steps, period)
    per_sync_seconds = sync_seconds + exchange_seconds
    full_period_seconds = max((period // s) * t for s, t in zip(strides, step_seconds)) + per_sync_seconds
    tail_seconds = 0.0
    if tail_steps:
        tail_seconds = (
            max(_ceil_div(tail_steps, s) * t for s, t in zip(strides, step_seconds)) + per_sync_seconds
        )
    total_seconds = warmup_seconds + num_full_periods * full_period_seconds + tail_seconds

    busy_seconds = tuple(
        warmup_steps * warm + _ceil_div(num_base_steps, s) * step
        for warm, s, step in zip(warmup_step_seconds, strides, step_seconds)
    )
    # max(0, .): with no sync costs the bottleneck rank's idle is 0, and rounding must not make it < 0.
    idle_seconds = tuple(max(0.0, total_seconds - busy) for busy in busy_seconds)
    return LatencyBreakdown(total_seconds, warmup_seconds, busy_seconds, idle_seconds)


def _require_per_rank_ints(
    name: str, values: Sequence[int], num_ranks: int, *, minimum: int
) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != num_ranks:
        raise ValueError(f"{name} must be a sequence of {num_ranks} integers (one per rank), got {values!r}")
    return tuple(
        require_int(f"{name}[{index}]", value, minimum=minimum) for index, value in enumerate(values)
    )


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)
