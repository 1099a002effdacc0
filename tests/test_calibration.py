"""The calibrated cost model from measured runs: a fixed cost per forward fitted on two band sizes.

Tiny PixArt on 2 gloo ranks, rank 1 under an emulated slowdown; the planner is never told the speeds.
No timing assertions. (Split from test_exchange.py; the planner's side: test_planner_overheads.py.)
"""

from __future__ import annotations


def test_measured_runs_calibrate_a_fixed_cost_on_two_band_sizes(tiny_pixart):
    steps, size = 6, 128
    # Rank 1 is made 8x slower so that the measured order survives a contended CI machine: the
    # evidence is wall time net of waits, and another tenant can stretch rank 0's forwards ~4x.
    runs = [{"stadi_mode": "spatial", "stadi_emulate_slowdown": "1,8", "warmup_steps": 3,
             "stadi_timing": "work"}]
    results = tiny_pixart.run(2, "alpha", size, steps, runs)
    (first,), (second,) = results
    costs = first["costs"]
    assert costs is not None and costs == second["costs"], "every rank must plan on the same costs"
    assert first["plan"] == second["plan"]
    assert list(first["plan"].speeds) == first["measured_speeds"]
    assert len(costs.warmup_rows) == 3 and costs.warmup_rows[0] == [4, 4]
    # Step 1 found rank 1 slower, so steps 2.. ran on provisional spatial bands: two sizes per rank.
    assert costs.warmup_rows[2][1] < 4 and first["rows"][:3] == [4, 4, costs.warmup_rows[2][0]]
    # The result's warmup plan (the log's "re-band after warmup: rows ...", the bench report) is the layout
    # the displaced phase re-bands from, the calibrated one; it used to be the first, [4, 4] (issue 35).
    assert [end - start for start, end in first["warmup_plan"].row_bounds()] == costs.warmup_rows[-1]
    assert all(o >= 0 for o in costs.step_overhead_seconds)
    assert costs.exchange_seconds >= 0 and costs.warmup_exchange_seconds >= 0
