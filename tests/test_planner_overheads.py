"""The planner with per-rank fixed costs (the cost fit's output): overhead water filling, plans, latency.

Pure planner, single process. (Split from test_exchange.py; the measured side: test_calibration.py.)
"""

from __future__ import annotations

import itertools

import pytest

from stadi_xdit.planner import plan, predict_latency
from stadi_xdit.planner.bands import water_fill_band_rows
from stadi_xdit.planner.planning import water_fill_with_overheads


@pytest.mark.parametrize("speeds,overheads,strides", [
    ((1.0, 0.5), (0.05, 0.1), (1, 1)),
    ((1.0, 0.5, 0.25), (0.3, 0.0, 1.0), (1, 2, 4)),
    ((2.0, 2.0), (0.0, 3.0), (1, 1)),
])
def test_overhead_water_filling_is_exact(speeds, overheads, strides):
    rows, align = 12, 1
    band_rows = water_fill_with_overheads(speeds, strides, overheads, rows, align)

    def worst(bands):
        return max((r / v + o) / s for r, v, o, s in zip(bands, speeds, overheads, strides))

    best = min(worst(b) for b in itertools.product(range(1, rows), repeat=len(speeds)) if sum(b) == rows)
    assert sum(band_rows) == rows and worst(band_rows) == pytest.approx(best)


def test_zero_overheads_plan_exactly_as_before_and_fixed_costs_move_rows():
    speeds = [1.0, 0.5]
    assert water_fill_with_overheads(speeds, (1, 1), (0.0, 0.0), 32, 1) == water_fill_band_rows(speeds, 32, 1)
    base = plan(speeds, rows=32, align=1, num_steps=20, warmup_steps=2, mode="spatial")
    # A fixed cost per forward that scales with the device (the slow rank pays twice as much) makes
    # the slow rank's band smaller still: it pays its larger fixed cost whatever its band.
    calibrated = plan(speeds, rows=32, align=1, num_steps=20, warmup_steps=2, mode="spatial",
                      step_overhead_seconds=[4.0, 8.0])
    assert calibrated.ranks[1].num_rows < base.ranks[1].num_rows
    # Ideal strides compare the time of an equal band, fixed costs included.
    fixed_heavy = plan([1.0, 1.0], rows=32, align=1, num_steps=20, warmup_steps=2, mode="full",
                       step_overhead_seconds=[0.0, 40.0])
    assert [r.stride for r in fixed_heavy.ranks] == [1, 2]


def test_predict_latency_takes_per_rank_overheads_and_warmup_exchange():
    latency = predict_latency([4, 4], [1, 1], [2.0, 1.0], num_steps=4, warmup_steps=1,
                              step_overhead_seconds=[0.5, 1.0], warmup_exchange_seconds=0.25, exchange_seconds=0.1)
    # warmup: max(2 + 0.5, 4 + 1) + 0.25; 3 periods of max(2.5, 5) + 0.1
    assert latency.total_seconds == pytest.approx(5.25 + 3 * 5.1)
    assert latency.busy_seconds == pytest.approx((4 * 2.5, 4 * 5.0))
    with pytest.raises(ValueError, match=r"^step_overhead_seconds\[1\] "):
        predict_latency([4, 4], [1, 1], [2.0, 1.0], num_steps=4, warmup_steps=1, step_overhead_seconds=[0.5, -1])
    with pytest.raises(ValueError, match="one per rank"):
        predict_latency([4, 4], [1, 1], [2.0, 1.0], num_steps=4, warmup_steps=1, step_overhead_seconds=[0.5])
