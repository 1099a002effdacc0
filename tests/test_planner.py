"""The STADI planner: properties over random inputs, hand-computed examples, and input validation."""

from __future__ import annotations

import ast
import itertools
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stadi_xdit.planner import MODES, Plan, plan, plan_warmup, predict_latency
from stadi_xdit.planner.bands import uniform_band_rows, water_fill_band_rows
from stadi_xdit.planner.strides import candidate_periods, nearest_divisor_strides

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def planner_inputs(draw, *, with_costs: bool = True) -> dict:
    """Keyword arguments for ``plan`` (without ``mode``): 1..64 ranks, any valid rows/align/steps."""
    num_ranks = draw(st.integers(1, 64))
    align = draw(st.sampled_from([1, 2, 4, 8]))
    num_steps = draw(st.integers(1, 60))
    seconds = st.floats(0, 5) if with_costs else st.just(0.0)
    return {
        "speeds": draw(st.lists(st.floats(0.01, 100), min_size=num_ranks, max_size=num_ranks)),
        # rows = latent height / patch size; any multiple of align with >= one unit per rank is valid
        "rows": align * draw(st.integers(num_ranks, num_ranks + 96)),
        "align": align,
        "num_steps": num_steps,
        "warmup_steps": draw(st.integers(0, num_steps - 1)),
        "max_stride": draw(st.integers(1, 4)),
        "tolerance": draw(st.sampled_from([0.0, 0.02, 0.1])),
        "sync_seconds": draw(seconds),
        "exchange_seconds": draw(seconds),
        "step_overhead_seconds": draw(seconds),
        "warmup_speeds_known": draw(st.booleans()),
    }


def strides_of(result: Plan) -> tuple[int, ...]:
    return tuple(rank.stride for rank in result.ranks)


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(planner_inputs(), st.sampled_from(MODES))
def test_bands_are_contiguous_aligned_and_cover_all_rows(inputs, mode):
    result = plan(**inputs, mode=mode)
    for bounds in (result.row_bounds(), list(result.warmup_row_bounds)):
        assert [start for start, _ in bounds] == [0] + [end for _, end in bounds[:-1]]
        assert bounds[-1][1] == inputs["rows"]
        for start, end in bounds:
            assert end - start >= inputs["align"]
            assert start % inputs["align"] == 0 and end % inputs["align"] == 0


@PROPERTY_SETTINGS
@given(planner_inputs(), st.sampled_from(MODES))
def test_strides_respect_the_cap_and_only_full_mode_strides(inputs, mode):
    strides = strides_of(plan(**inputs, mode=mode))
    assert all(1 <= stride <= inputs["max_stride"] for stride in strides)
    if mode != "full":
        assert set(strides) == {1}


@PROPERTY_SETTINGS
@given(planner_inputs(), st.sampled_from(MODES))
def test_every_rank_walks_the_whole_timeline_and_ends_at_the_last_base_step(inputs, mode):
    result = plan(**inputs, mode=mode)
    last_base_step = inputs["num_steps"] - inputs["warmup_steps"]
    for rank in result.ranks:
        segments = rank.segments()
        assert segments[0][0] == 0
        assert all(end == next_start for (_, end), (next_start, _) in itertools.pairwise(segments))
        assert segments[-1][1] == last_base_step
        assert rank.num_evals == inputs["warmup_steps"] + len(rank.steps)


@PROPERTY_SETTINGS
@given(planner_inputs(), st.sampled_from(MODES))
def test_sync_points_are_the_period_multiples_plus_the_end(inputs, mode):
    result = plan(**inputs, mode=mode)
    last_base_step = inputs["num_steps"] - inputs["warmup_steps"]
    assert result.period == math.lcm(*strides_of(result))
    multiples = [k for k in range(last_base_step) if k % result.period == 0]
    assert result.sync_points == (*multiples, last_base_step)
    # every rank computes at every sync point below T' (that is what makes it a sync point)
    assert all(set(multiples) <= set(rank.steps) for rank in result.ranks)


@PROPERTY_SETTINGS
@given(planner_inputs())
def test_predicted_latency_is_ordered_full_spatial_uniform(inputs):
    # Exact by construction, not up to rounding: water-filling is optimal for the very float expressions
    # the cost model evaluates, and the full search includes all-ones strides (= the spatial plan).
    totals = {mode: plan(**inputs, mode=mode).predicted.total_seconds for mode in MODES}
    assert totals["full"] <= totals["spatial"] <= totals["uniform"]
    assert plan(**inputs).predicted.uniform_total_seconds == totals["uniform"]


@PROPERTY_SETTINGS
@given(planner_inputs(), st.floats(0.01, 100), st.sampled_from(MODES))
def test_equal_speeds_give_the_uniform_layout_with_stride_one(inputs, speed, mode):
    num_ranks = len(inputs["speeds"])
    result = plan(**{**inputs, "speeds": [speed] * num_ranks}, mode=mode)
    uniform_rows = uniform_band_rows(num_ranks, inputs["rows"], inputs["align"])
    assert [rank.num_rows for rank in result.ranks] == list(uniform_rows)
    assert set(strides_of(result)) == {1}


@PROPERTY_SETTINGS
@given(planner_inputs(with_costs=False), st.integers(-20, 20), st.sampled_from(MODES))
def test_scaling_all_speeds_keeps_bands_and_strides(inputs, exponent, mode):
    # Powers of two scale floats exactly, so this is an exact check. (Any other factor is the same in
    # exact arithmetic but may move a perfect tie between two layouts by one ulp.)
    scaled = {**inputs, "speeds": [speed * 2.0**exponent for speed in inputs["speeds"]]}
    original, rescaled = plan(**inputs, mode=mode), plan(**scaled, mode=mode)
    assert rescaled.row_bounds() == original.row_bounds()
    assert rescaled.warmup_row_bounds == original.warmup_row_bounds
    assert strides_of(rescaled) == strides_of(original)
    assert rescaled.predicted.speedup_vs_uniform == original.predicted.speedup_vs_uniform


@PROPERTY_SETTINGS
@given(planner_inputs(), st.sampled_from(MODES))
def test_json_round_trip_gives_an_equal_plan(inputs, mode):
    result = plan(**inputs, mode=mode)
    assert Plan.from_json(result.to_json()) == result


@PROPERTY_SETTINGS
@given(planner_inputs(), st.sampled_from(MODES))
def test_prediction_matches_a_period_by_period_walk_of_the_plan(inputs, mode):
    """The closed-form cost model equals simulating every period of the plan's timeline."""
    result = plan(**inputs, mode=mode)
    speeds, overhead = inputs["speeds"], inputs["step_overhead_seconds"]
    step_seconds = [rank.num_rows / speed + overhead for rank, speed in zip(result.ranks, speeds)]
    warmup_rows = [end - start for start, end in result.warmup_row_bounds]
    warmup_step = max(rows / speed + overhead for rows, speed in zip(warmup_rows, speeds))
    total = inputs["warmup_steps"] * (warmup_step + inputs["sync_seconds"])
    for period_index in range(result.num_periods):
        slowest = max(
            len(result.steps_in_period(rank, period_index)) * step_seconds[rank]
            for rank in range(len(speeds))
        )
        total += slowest + inputs["sync_seconds"] + inputs["exchange_seconds"]
    assert math.isclose(result.predicted.total_seconds, total, rel_tol=1e-9)
    for rank, busy, idle in zip(result.ranks, result.predicted.busy_seconds, result.predicted.idle_seconds):
        warmup_busy = inputs["warmup_steps"] * (warmup_rows[rank.rank] / speeds[rank.rank] + overhead)
        assert math.isclose(busy, warmup_busy + len(rank.steps) * step_seconds[rank.rank], rel_tol=1e-9)
        assert idle >= 0 and math.isclose(busy + idle, total, rel_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.1, 10), min_size=1, max_size=3),
    st.integers(0, 6),
    st.sampled_from([1, 2, 3]),
)
def test_water_filling_minimises_the_slowest_band_exactly(weights, spare_units, align):
    units = len(weights) + spare_units
    band_rows = water_fill_band_rows(weights, units * align, align)
    assert sum(band_rows) == units * align
    achieved = max(rows / weight for rows, weight in zip(band_rows, weights))
    # brute force over every split with >= 1 unit per rank
    best = min(
        max(unit * align / weight for unit, weight in zip(split, weights))
        for split in itertools.product(range(1, units + 1), repeat=len(weights))
        if sum(split) == units
    )
    assert achieved == best


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(1, 20), min_size=1, max_size=8), st.integers(1, 6))
def test_each_rank_takes_the_divisor_nearest_its_ideal_stride_in_log_space(ideal, max_stride):
    for period in candidate_periods(max_stride):
        divisors = [d for d in range(1, max_stride + 1) if period % d == 0]
        for target, chosen in zip(ideal, nearest_divisor_strides(ideal, period, max_stride)):
            assert chosen in divisors
            distance = abs(math.log(chosen / target))
            assert all(distance <= abs(math.log(d / target)) + 1e-12 for d in divisors)


def test_candidate_periods_are_the_divisors_of_lcm_up_to_max_stride():
    assert candidate_periods(1) == (1,)
    assert candidate_periods(2) == (1, 2)
    assert candidate_periods(4) == (1, 2, 3, 4, 6, 12)


# ---------------------------------------------------------------------------------------------------
# Worked examples (computed by hand; 1 "second" = 1 row at speed 1)
# ---------------------------------------------------------------------------------------------------


def test_half_speed_rank_gets_stride_two_and_an_equal_band():
    # speeds (1, 0.5): s* = (1, 2); cap 2 -> L = 2 gives strides (1, 2), weights w = v*s = (1, 1)
    # -> equal bands 32/32. T' = 20 - 2 = 18 base steps = 9 periods of max(2*32/1, 1*32/0.5) = 64.
    # Warmup (speeds unknown -> uniform 32/32): 2 * max(32, 64) = 128. Full total = 128 + 9*64 = 704.
    # Spatial (stride 1, w = (1, 0.5)): 43/21 -> max(43, 42) = 43 per step -> 128 + 18*43 = 902.
    # Uniform: 128 + 18 * 64 = 1280 -> speedup 1280 / 704.
    result = plan((1, 0.5), rows=64, align=1, num_steps=20, warmup_steps=2)
    assert strides_of(result) == (1, 2)
    assert result.period == 2
    assert result.row_bounds() == [(0, 32), (32, 64)]
    assert result.sync_points == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18)
    assert result.ranks[1].steps == (0, 2, 4, 6, 8, 10, 12, 14, 16)
    assert result.ranks[1].num_evals == 2 + 9
    assert result.ranks[1].segments()[-1] == (16, 18)
    assert result.steps_in_period(0, 3) == (6, 7)
    assert result.steps_in_period(1, 3) == (6,)
    assert result.predicted.total_seconds == 704
    assert result.predicted.warmup_seconds == 128
    assert result.predicted.uniform_total_seconds == 1280
    assert result.predicted.speedup_vs_uniform == pytest.approx(1280 / 704)
    # busy: rank 0 = 2*32 + 18*32 = 640; rank 1 = 2*64 + 9*64 = 704 (the bottleneck, never idle)
    assert result.predicted.busy_seconds == (640, 704)
    assert result.predicted.idle_seconds == (64, 0)
    spatial = plan((1, 0.5), rows=64, align=1, num_steps=20, warmup_steps=2, mode="spatial")
    assert spatial.row_bounds() == [(0, 43), (43, 64)]
    assert spatial.predicted.total_seconds == 902


def test_stride_two_bands_follow_speed_times_stride():
    # speeds (1, 0.4): s* = 2.5, cap 2 -> strides (1, 2); w = (1, 0.8) -> rows 90 split 50/40
    # (50/1 == 40/0.8 == 50). Spatial (w = (1, 0.4)): 64/26 -> max(64, 65); 65/25 -> max(65, 62.5):
    # both 65, and the tie on the last unit goes to the lower rank -> 65/25.
    result = plan((1, 0.4), rows=90, align=1, num_steps=20, warmup_steps=2)
    assert strides_of(result) == (1, 2)
    assert result.row_bounds() == [(0, 50), (50, 90)]
    spatial = plan((1, 0.4), rows=90, align=1, num_steps=20, warmup_steps=2, mode="spatial")
    assert spatial.row_bounds() == [(0, 65), (65, 90)]


def test_tolerance_prefers_the_shorter_period_when_it_is_close_enough():
    # speeds (1, 0.7), 120 rows, T = 2, W = 0. s* = 1.43; 1.43^2 > 1*2 so L = 2 rounds it up to 2.
    # L = 2: w = (1, 1.4) -> 50/70, one period of max(2*50, 70/0.7) = 100.
    # L = 1: w = (1, 0.7) -> 71/49, 2 steps of max(71, 70) = 142 -> 1.42x the best.
    common = {"rows": 120, "align": 1, "num_steps": 2, "warmup_steps": 0}
    assert strides_of(plan((1, 0.7), **common, tolerance=0.4)) == (1, 2)
    relaxed = plan((1, 0.7), **common, tolerance=0.5)
    assert strides_of(relaxed) == (1, 1)
    assert relaxed.row_bounds() == [(0, 71), (71, 120)]
    assert relaxed.predicted.total_seconds == 142


def test_larger_cap_lets_a_quarter_speed_rank_compute_every_fourth_step():
    # speeds (1, 0.25), s* = 4, cap 4: periods 1, 2, 3, 4, 6, 12; 64 rows, T = 8, W = 0.
    # (1, 1): 52/12 -> 8 * 52 = 416.   (1, 2): 43/21 -> 4 periods * max(2*43, 21/0.25) = 344.
    # (1, 3): 37/27 -> 2 * max(3*37, 27/0.25) + tail max(2*37, 108) = 222 + 108 = 330.
    # (1, 4): 32/32 -> 2 periods * max(4*32, 32/0.25) = 256: the best, alone within 2%.
    result = plan((1, 0.25), rows=64, align=1, num_steps=8, warmup_steps=0, max_stride=4)
    assert strides_of(result) == (1, 4)
    assert result.period == 4
    assert result.row_bounds() == [(0, 32), (32, 64)]
    assert result.predicted.total_seconds == 256
    capped = plan((1, 0.25), rows=64, align=1, num_steps=8, warmup_steps=0, max_stride=2)
    assert strides_of(capped) == (1, 2)
    assert capped.predicted.total_seconds == 344


def test_nearly_equal_speeds_are_not_strided():
    # s* = 1/0.9 = 1.11 is nearer to 1 than to 2 in log space, so no rank skips steps.
    result = plan((1, 0.9, 1, 0.95), rows=64, align=2, num_steps=20, warmup_steps=2)
    assert set(strides_of(result)) == {1}


def test_known_speeds_make_warmup_elastic():
    common = {"rows": 64, "align": 1, "num_steps": 20, "warmup_steps": 2}
    known = plan((1, 0.5), **common, warmup_speeds_known=True)
    # warmup runs the spatial bands 43/21: 2 * max(43, 42) = 86 instead of 128 uniform
    assert known.warmup_row_bounds == ((0, 43), (43, 64))
    assert known.predicted.warmup_seconds == 86
    assert plan((1, 0.5), **common).warmup_row_bounds == ((0, 32), (32, 64))
    baseline = plan((1, 0.5), **common, mode="uniform", warmup_speeds_known=True)
    assert baseline.warmup_row_bounds == ((0, 32), (32, 64))


def test_plan_warmup_uses_uniform_bands_without_speeds_and_elastic_bands_with_them():
    common = {"rows": 14, "align": 2, "num_steps": 5, "warmup_steps": 1}
    blind = plan_warmup(3, **common)
    # 7 units over 3 ranks: 3/2/2 units, earlier ranks take the extra unit
    assert blind.mode == "uniform"
    assert blind.row_bounds() == [(0, 6), (6, 10), (10, 14)]
    assert blind.speeds == (1.0, 1.0, 1.0)
    informed = plan_warmup(3, **common, speeds=[1, 2, 4])
    # w = (1, 2, 4), 7 units: 1/2/4 units -> every band costs 2 rows per unit speed
    assert informed.mode == "spatial"
    assert informed.row_bounds() == [(0, 2), (2, 6), (6, 14)]
    assert informed.warmup_row_bounds == tuple(informed.row_bounds())
    assert set(strides_of(informed)) == {1}


def test_single_rank_owns_everything():
    result = plan([3.0], rows=8, align=2, num_steps=4, warmup_steps=1, max_stride=4)
    assert result.row_bounds() == [(0, 8)]
    assert strides_of(result) == (1,)
    assert result.predicted.speedup_vs_uniform == 1


def test_predict_latency_is_usable_on_its_own():
    # 2 ranks, strides (1, 2), T' = 3: periods [0, 2) and a truncated [2, 3).
    latency = predict_latency([4, 4], [1, 2], [2.0, 1.0], num_steps=4, warmup_steps=1, sync_seconds=0.5)
    # warmup: 1 * (max(2, 4) + 0.5) = 4.5; period: max(2*2, 1*4) + 0.5 = 4.5; tail: max(2, 4) + 0.5
    assert latency.total_seconds == 4.5 + 4.5 + 4.5
    assert latency.busy_seconds == (2 + 3 * 2, 4 + 2 * 4)


def test_explain_lists_every_rank_and_the_speedup():
    text = plan((1, 0.5), rows=64, align=1, num_steps=20, warmup_steps=2).explain()
    assert "period L = 2" in text
    assert "speedup 1.818x" in text
    assert len([line for line in text.splitlines() if line.startswith(("   0", "   1"))]) == 2


def test_planner_package_uses_only_the_standard_library():
    package = Path(__file__).resolve().parents[1] / "stadi_xdit" / "planner"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert all(root in sys.stdlib_module_names or root == "__future__" for root in roots), source


# ---------------------------------------------------------------------------------------------------
# Bad input: one-line ValueError naming the argument
# ---------------------------------------------------------------------------------------------------

GOOD = {"speeds": (1.0, 0.5), "rows": 64, "align": 1, "num_steps": 20, "warmup_steps": 2}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"speeds": (1.0, 0.0)}, r"^speeds\[1\] must be a finite number > 0, got 0\.0$"),
        ({"speeds": (1.0, float("nan"))}, r"^speeds\[1\] must be a finite number > 0, got nan$"),
        ({"speeds": (float("inf"),)}, r"^speeds\[0\] "),
        ({"speeds": (-2,)}, r"^speeds\[0\] "),
        ({"speeds": ()}, r"^speeds must contain one speed per rank"),
        ({"speeds": "1,2"}, r"^speeds must be a sequence"),
        ({"rows": 65, "align": 2}, r"^rows must be a multiple of align=2, got 65$"),
        ({"rows": 1}, r"^rows must be >= num_ranks\*align"),
        ({"rows": 64.0}, r"^rows must be an integer"),
        ({"align": 0}, r"^align must be an integer >= 1"),
        ({"num_steps": 0, "warmup_steps": 0}, r"^num_steps must be an integer >= 1"),
        ({"warmup_steps": 20}, r"^warmup_steps must be < num_steps=20, got 20$"),
        ({"warmup_steps": -1}, r"^warmup_steps must be an integer >= 0"),
        ({"mode": "fast"}, r"^mode must be one of 'uniform', 'spatial', 'full', got 'fast'$"),
        ({"max_stride": 0}, r"^max_stride must be an integer in \[1, 16\], got 0$"),
        ({"max_stride": 17}, r"^max_stride "),
        ({"tolerance": -0.1}, r"^tolerance must be a finite number >= 0"),
        ({"sync_seconds": float("nan")}, r"^sync_seconds "),
        ({"exchange_seconds": -1}, r"^exchange_seconds "),
        ({"step_overhead_seconds": float("inf")}, r"^step_overhead_seconds "),
    ],
)
def test_plan_rejects_bad_input_with_a_one_line_error(override, message):
    with pytest.raises(ValueError, match=message) as error:
        plan(**{**GOOD, **override})
    assert "\n" not in str(error.value)


def test_other_entry_points_name_the_bad_argument():
    with pytest.raises(ValueError, match=r"^speeds must have num_ranks=3 entries, got 2$"):
        plan_warmup(3, rows=64, align=1, num_steps=20, warmup_steps=2, speeds=[1, 2])
    with pytest.raises(ValueError, match=r"^num_ranks must be an integer >= 1"):
        plan_warmup(0, rows=64, align=1, num_steps=20, warmup_steps=2)
    with pytest.raises(ValueError, match=r"^band_rows must be a sequence of 2 integers"):
        predict_latency([64], [1, 1], [1.0, 1.0], num_steps=2, warmup_steps=0)
    with pytest.raises(ValueError, match=r"^strides\[1\] must be an integer >= 1"):
        predict_latency([32, 32], [1, 0], [1.0, 1.0], num_steps=2, warmup_steps=0)
    result = plan(**GOOD)
    with pytest.raises(ValueError, match=r"^period_index must be in \[0, 9\), got 9$"):
        result.steps_in_period(0, 9)
    with pytest.raises(ValueError, match=r"^text is not a STADI plan JSON document"):
        Plan.from_json('{"mode": "full"}')


def test_a_tampered_plan_fails_its_own_validation():
    document = plan(**GOOD).to_json().replace('"row_end": 32', '"row_end": 31', 1)
    with pytest.raises(ValueError, match=r"^ranks\[1\] must be \[31, \.\.\.\)"):
        Plan.from_json(document)
