"""Cost models from timings, the noise floor, and adaptive STADI's convergence over calls (pure, injected timings)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from stadi_xdit.planner import plan, predict_latency
from stadi_xdit.planner.anchor import settle_plan
from stadi_xdit.planner.calls import (
    CallMemory,
    Evidence,
    plan_call,
    remember_call,
    warmup_layout,
    with_step_cache,
)
from stadi_xdit.planner.evidence import (
    PRIOR_NOISE,
    CostEstimate,
    RankEvidence,
    combine_evidence,
    estimate_costs,
)

# --------------------------------------------------------------------------------------------------
# evidence and cost models


def test_a_line_through_two_band_sizes_recovers_fixed_and_row_cost():
    samples = [(10, 9.9), (10, 0.2 + 10 * 0.03), (21, 0.2 + 21 * 0.03), (21, 0.2 + 21 * 0.03)]
    evidence = RankEvidence.of(samples)
    assert [s.rows for s in evidence.sizes] == [10, 21]
    # The lower median: one disturbed forward (9.9 s) among two never decides a size's time.
    assert evidence.sizes[0].seconds == pytest.approx(0.2 + 10 * 0.03)
    (cost,) = estimate_costs([evidence], max_fixed_rows=64)
    assert cost.fitted and cost.fixed_seconds == pytest.approx(0.2) and cost.row_seconds == pytest.approx(0.03)
    assert cost.seconds(16) == pytest.approx(0.68)


@pytest.mark.parametrize("samples", [
    [(16, 1.0), (16, 0.5), (16, 0.7)],  # one size: the fixed cost cannot be separated
    [(20, 0.7), (19, 0.6)],  # 19 vs 20 rows: noise, not a line
    [(16, 1.0), (16, 0.5), (8, 0.6)],  # the bigger band faster: not physical
    # 8 vs 10 rows at ~9 % noise: the line's intercept (0.3 ms) is well within its error (~1.6 ms), and
    # believing it swung a 2:1 launch's plan between calls
    [(8, 0.0050), (8, 0.0044), (8, 0.0047), (10, 0.0055), (10, 0.0061), (10, 0.0058)],
])
def test_without_a_trustworthy_line_the_fixed_cost_is_zero(samples):
    (cost,) = estimate_costs([RankEvidence.of(samples)], max_fixed_rows=64)
    assert not cost.fitted and cost.fixed_seconds == 0.0
    # ... and the row cost is exact at the sizes seen (least squares through the origin)
    evidence = RankEvidence.of(samples)
    assert cost.row_seconds == pytest.approx(sum(s.weight * s.seconds * s.rows for s in evidence.sizes)
                                             / sum(s.weight * s.rows ** 2 for s in evidence.sizes))


def test_the_fixed_cost_in_rows_is_pooled_over_the_ranks_that_fitted_one():
    line = RankEvidence.of([(4, 0.05 + 4 * 0.01), (6, 0.05 + 6 * 0.01)])  # 5 rows of fixed cost
    one_size = RankEvidence.of([(4, 0.27)])
    steep = RankEvidence.of([(2, 0.3 + 2 * 0.02), (3, 0.3 + 3 * 0.02)])  # 15 rows
    costs = estimate_costs([line, one_size, steep], max_fixed_rows=64)
    for cost in costs:
        assert cost.fitted and cost.fixed_seconds == pytest.approx(10 * cost.row_seconds)  # median of 5 and 15
    assert costs[1].seconds(4) == pytest.approx(0.27)  # exact where it ran
    capped = estimate_costs([line, one_size, steep], max_fixed_rows=8)
    assert capped[1].fixed_seconds == pytest.approx(8 * capped[1].row_seconds)


def test_noise_shrinks_from_the_prior_towards_the_measured_spread():
    assert RankEvidence.of([(8, 1.0)]).noise == pytest.approx(PRIOR_NOISE)
    steady = RankEvidence.of([(8, 1.0 + 0.001 * (i % 3)) for i in range(40)])
    assert steady.noise < PRIOR_NOISE / 3
    wild = RankEvidence.of([(8, 1.0 + 0.5 * (i % 2)) for i in range(40)])
    assert wild.noise > 2 * PRIOR_NOISE
    one = estimate_costs([RankEvidence.of([(8, 1.0)])], 16)[0]
    many = estimate_costs([steady], 16)[0]
    assert many.relative_error < one.relative_error / 10


def test_new_evidence_merges_replaces_or_is_set_aside():
    memory = [RankEvidence.of([(8, 1.0 + 0.01 * (i % 3)) for i in range(20)])]
    same, _, how = combine_evidence(memory, [RankEvidence.of([(8, 1.01), (8, 1.0), (8, 1.02)])], 16)
    assert how == ["merged"] and same[0].weight > 20 * 0.8
    slower = [RankEvidence.of([(8, 2.0), (8, 2.02), (8, 1.98)])]
    kept, pending, how = combine_evidence(memory, slower, 16)
    assert how == ["suspect"] and kept[0] == memory[0]  # once: set aside
    changed, _, how = combine_evidence(memory, slower, 16, pending)
    assert how == ["changed"] and changed[0].sizes[0].seconds == pytest.approx(2.0)  # twice: the load changed
    spike, pending, how = combine_evidence(memory, [RankEvidence.of([(8, 10.0)])], 16)
    assert how == ["suspect"] and spike[0] == memory[0]
    _, _, how = combine_evidence(memory, [RankEvidence.of([(8, 1.0)] * 3)], 16, pending)
    assert how == ["merged"]  # the disturbance is forgotten


def test_a_memory_round_trips_through_json_and_refuses_another_launch():
    evidence = Evidence(((RankEvidence.of([(8, 0.5), (8, 0.6)]), RankEvidence.of([(8, 1.0)])),))
    memory = CallMemory(evidence, (9, 7), (8, 8), (1, 2), (0.01,))
    assert CallMemory.from_json(memory.to_json(), num_ranks=2, num_branches=1) == memory
    cached = CallMemory(evidence, (9, 7), (8, 8), (1, 2), (0.01,), served=((0.6, 0.002), (0.25, 0.004)))
    assert CallMemory.from_json(cached.to_json(), num_ranks=2, num_branches=1) == cached
    assert CallMemory.from_json({**memory.to_json(), "served": []}, num_ranks=2).served == ()  # no step cache
    with pytest.raises(ValueError, match="2 CFG branch"):
        CallMemory.from_json(memory.to_json(), num_ranks=2, num_branches=2)
    broken = memory.to_json()
    broken["evidence"][0][0][0][2] = -1.0
    with pytest.raises(ValueError, match=r"seconds in \[1e-07, 100000\]"):
        CallMemory.from_json(broken, num_ranks=2, num_branches=1)


def _damaged(path: tuple, value) -> dict:
    memory = CallMemory(Evidence(((RankEvidence.of([(8, 0.5), (8, 0.6)]), RankEvidence.of([(8, 1.0)])),)),
                        (9, 7), (8, 8), (1, 2), (0.01,)).to_json()
    target = memory
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return memory


@pytest.mark.parametrize("path,value,needle", [
    (("evidence", 0, 0, 0, 0), float("inf"), "rows in [1, 4096]"),  # an infinite row count (was OverflowError)
    (("evidence", 0, 0, 0, 0), 2.5, "rows in [1, 4096]"),
    (("evidence", 0, 0, 0, 1), 1e300, "weight in (0, 1e+06]"),  # a huge evidence weight
    (("evidence", 0, 0, 0, 2), 1e-301, "seconds in [1e-07"),  # a row cost of 1e-298 ms
    (("evidence", 0, 0, 0), "8,1,1,0,0", "not a list|must be"),
    (("exchange_seconds", 0), 1e308, "exchange_seconds"),
    (("plan_strides", 1), 0, "plan_strides[1] must be an integer in [1, 16]"),
    (("plan_strides", 1), 10**9, "plan_strides[1]"),
    (("plan_rows", 0), -3, "plan_rows[0]"),
    (("warmup_rows",), None, "warmup_rows must be a list"),
    (("evidence",), [], "non-empty list"),
    (("pending",), [[[[8, 1, 1, 0, 0]]]], "not for 1 CFG branch(es) of 2 ranks"),
    (("plan_strides",), [1, 2, 3], "not for 1 CFG branch(es) of 2 ranks"),
    (("served",), [[0.5, 0.01]], "not for 1 CFG branch(es) of 2 ranks"),
    (("served",), [[1.5, 0.01], [0.5, 0.01]], "memory served must be"),
    (("served",), [[float("nan"), 0.01], [0.5, 0.01]], "memory served must be"),
    (("served",), [[0.5, -1.0], [0.5, 0.01]], "memory served must be"),
    (("served",), "0.5", "memory served must be"),
])
def test_a_damaged_memory_is_one_value_error_never_another_exception(path, value, needle):
    with pytest.raises(ValueError) as info:
        CallMemory.from_json(_damaged(path, value), num_ranks=2, num_branches=1)
    message = str(info.value)
    assert "\n" not in message and any(part in message for part in needle.split("|")), message


def test_a_step_cache_record_moves_rows_to_the_rank_it_serves_more():
    """Equal ranks, one served 60 % of its forwards by the cache, the other 20 %: the first is cheaper per forward,
    so it takes more rows; without the record the bands stay equal. The served cost counts, capped shares too."""
    estimates = _estimates([1.0, 1.0], error=0.001)
    plain = plan_call(estimates, None, **{**TERMS, "mode": "spatial"}).plan
    cached = plan_call(with_step_cache(estimates, [(0.6, 0.0), (0.2, 0.0)]), None, **{**TERMS, "mode": "spatial"}).plan
    assert [r.num_rows for r in plain.ranks] == [8, 8]
    rows = [r.num_rows for r in cached.ranks]
    assert rows[0] > rows[1] and rows == [11, 5]  # cost per row 0.4 : 0.8
    assert with_step_cache(estimates, []) == estimates
    served = estimates[0].with_served(0.5, 0.25)
    assert (served.fixed_seconds, served.row_seconds) == (0.125, 0.5)
    assert estimates[0].with_served(1.0, 0.0).row_seconds == pytest.approx(0.1)  # capped at 90 %
    with pytest.raises(ValueError):
        estimates[0].with_served(1.5, 0.0)


def test_strides_past_this_launchs_max_stride_are_refused():
    memory = _damaged(("plan_strides", 1), 3)
    assert CallMemory.from_json(memory, num_ranks=2).plan_strides == (1, 3)
    with pytest.raises(ValueError, match=r"plan_strides\[1\] must be an integer in \[1, 2\]"):
        CallMemory.from_json(memory, num_ranks=2, max_stride=2)


# --------------------------------------------------------------------------------------------------
# the noise floor


def _estimates(speeds, error=0.02, fixed=0.0):
    return [CostEstimate(fixed / speed, 1.0 / speed, error, 1.0, False) for speed in speeds]


TERMS = {"rows": 16, "align": 1, "num_steps": 10, "warmup_steps": 2, "mode": "full", "max_stride": 2, "tolerance": 0.02}


def test_estimates_within_the_noise_keep_equal_bands_at_stride_one():
    settled = settle_plan(_estimates([1.0, 0.93], error=0.05), **TERMS)
    assert not settled.moved and [r.num_rows for r in settled.plan.ranks] == [8, 8]
    # A real imbalance measured precisely does move the bands.
    precise = settle_plan(_estimates([1.0, 0.6], error=0.001), **{**TERMS, "mode": "spatial"})
    assert precise.moved and [r.num_rows for r in precise.plan.ranks] == [10, 6]


def test_a_stride_needs_more_evidence_than_a_band():
    # Ideal stride 1.6 (> sqrt 2, nearest rounding says 2), but only 0.12 of log distance from the boundary.
    fast_slow = [1.0, 1 / 1.6]
    loose = settle_plan(_estimates(fast_slow, error=0.05), **TERMS)
    assert [r.stride for r in loose.plan.ranks] == [1, 1] and loose.moved  # the bands still move
    tight = settle_plan(_estimates(fast_slow, error=0.01), **TERMS)
    assert [r.stride for r in tight.plan.ranks] == [1, 2]


def test_a_move_of_one_unit_is_never_made():
    anchor = settle_plan(_estimates([1.0, 0.5], error=0.0), **TERMS).plan
    rows = [r.num_rows for r in anchor.ranks]
    nudged = settle_plan(_estimates([1.0, 0.47], error=0.0), anchor_rows=rows, anchor_strides=[1, 2], **TERMS)
    assert not nudged.moved and [r.num_rows for r in nudged.plan.ranks] == rows


# --------------------------------------------------------------------------------------------------
# convergence over calls: the runtime's policy (planner/calls.py) fed with simulated timings


def _simulate(costs, noise, calls, *, seed, rows=16, steps=10, warmup=2, disturb=None):
    """Run `calls` calls of the policy; rank i's forward at r rows takes (o_i + r c_i)(1 + U(-noise, noise)).

    `disturb(call, rank, step)` -> a factor for one warmup forward (a stall)."""
    rng = random.Random(seed)
    n = len(costs)

    def seconds(rank, band_rows):
        fixed, row = costs[rank]
        return (fixed + band_rows * row) * (1 + rng.uniform(-noise, noise))

    memory, plans = None, []
    for call in range(calls):
        warm, _ = warmup_layout(memory, num_ranks=n, rows=rows, align=1, num_steps=steps, warmup_steps=warmup)
        warmup_rows = [r.num_rows for r in warm.ranks]
        if memory is None:
            timed = range(1, warmup) if warmup > 1 else range(1)  # the first forward is left out
            evidence = Evidence((tuple(
                RankEvidence.of([(warmup_rows[i], seconds(i, warmup_rows[i]) * (disturb(call, i, k) if disturb else 1))
                                 for k in timed]) for i in range(n)),))
            estimates = evidence.estimates(rows)
        else:
            estimates = memory.evidence.estimates(rows)
        ran = plan_call(estimates, memory, rows=rows, align=1, num_steps=steps, warmup_steps=warmup, mode="full",
                        max_stride=2, tolerance=0.02, warmup_rows=warmup_rows).plan
        displaced = Evidence((tuple(RankEvidence.of([(r.num_rows, seconds(i, r.num_rows)) for _ in r.steps])
                                    for i, r in enumerate(ran.ranks)),))
        memory, _ = remember_call(memory, displaced, rows=rows, warmup_rows=warmup_rows, ran=ran,
                                  exchange_seconds=0.0)
        plans.append(ran)
    return plans


def _layout(p):
    return [r.num_rows for r in p.ranks], [r.stride for r in p.ranks]


def _true_seconds(p, costs):
    """The displaced phase of `p` under the true costs."""
    return _layout_seconds(*_layout(p), p, costs)


def _neighbours(p, units):
    """The layouts within `units` rows of `p`'s: up to `units` rows moved between ranks, strides kept."""
    rows, strides = _layout(p)
    near = {tuple(rows)}
    for _ in range(units):
        near |= {tuple(r - (i == giver) + (i == taker) for i, r in enumerate(layout))
                 for layout in near for giver in range(len(rows)) for taker in range(len(rows))
                 if giver != taker and layout[giver] > 1}
    return [(list(layout), strides) for layout in sorted(near)]


def _layout_seconds(rows, strides, p, costs):
    return predict_latency(rows, strides, [1 / c for _, c in costs], num_steps=p.num_base_steps, warmup_steps=0,
                           step_overhead_seconds=[o for o, _ in costs]).total_seconds


def _truth(costs, rows=16, steps=10, warmup=2):
    return plan([1 / c for _, c in costs], rows=rows, align=1, num_steps=steps, warmup_steps=warmup, mode="full",
                max_stride=2, tolerance=0.02, step_overhead_seconds=[o for o, _ in costs])


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 0.4), st.lists(st.sampled_from([1.0, 1.1, 1.8, 2.0, 2.5, 3.0]), min_size=2, max_size=2),
       st.integers(0, 2 ** 31))
@example(share=0.1875, slowdowns=[3.0, 1.0], seed=1)  # kept one row off the true plan by the hysteresis
@example(share=0.375, slowdowns=[1.0, 3.0], seed=415)  # two rows off: noise in call 1, then a rate model
def test_repeated_calls_converge_to_the_plan_of_the_true_costs_and_stay(share, slowdowns, seed):
    """Rank i is `slow` times slower at every band size, the fixed part too (the model's pooled fixed cost
    in rows; a fixed cost whose share differs per rank cannot be told apart at a fixed point, where every
    rank keeps one band size). Fixed cost = `share` of a forward of 8 rows."""
    costs = [(share * 8 * 0.001 / (1 - share) * slow, 0.001 * slow) for slow in slowdowns]
    truth = _truth(costs)
    speeds = [1 / (o + 8 * c) for o, c in costs]
    ideal = [max(speeds) / v for v in speeds]
    assume(all(abs(math.log(s) - 0.5 * math.log(2)) > 0.2 for s in ideal))  # no rank on a rounding boundary
    plans = _simulate(costs, 0.05, 10, seed=seed)
    true_rows, true_strides = _layout(truth)
    best = _true_seconds(truth, costs)
    # Two units off the true plan's layout is as good as it must be. The first call plans from one timed
    # warmup forward per rank, so noise may put it a unit off. After that every rank runs one band size, so
    # its fixed cost cannot be told from its row cost. The rate model that remains may want the last unit
    # back, and the hysteresis never moves one unit.
    kept = max(_layout_seconds(rows, strides, truth, costs) for rows, strides in _neighbours(truth, 2))
    for later in plans[3:]:
        rows, strides = _layout(later)
        # As fast as the plan of the true costs (within those two units and a 16-row granularity) ...
        assert _true_seconds(later, costs) <= max(1.12 * best, kept), (rows, strides, true_rows, true_strides)
        # ... and the same plan wherever strides are clear-cut and fixed costs do not decide a tie.
        if share == 0.0:
            assert strides == true_strides and max(abs(a - b) for a, b in zip(rows, true_rows)) <= 1
    assert len({tuple(map(tuple, _layout(p))) for p in plans[5:]}) == 1, "the plan must stay put"


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.floats(0.0, 0.4), st.integers(0, 2 ** 31))
def test_identical_ranks_plan_identical_work_on_every_call(n, share, seed):
    costs = [(share * 0.008 / (1 - share), 0.001)] * n
    uniform = plan([1.0] * n, rows=16, align=1, num_steps=10, warmup_steps=2, mode="uniform")
    for p in _simulate(costs, 0.05, 10, seed=seed):
        assert _layout(p) == _layout(uniform)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31))
def test_a_two_to_one_truth_with_a_large_fixed_cost_converges_to_balanced_strides(seed):
    """o = 30 % of a forward: a rows/s memory shrank the slow band to one row; a cost model does not."""
    fixed = 0.3 / 0.7 * 8 * 0.001
    plans = _simulate([(fixed, 0.001), (2 * fixed, 0.002)], 0.05, 10, seed=seed)
    for later in plans[2:]:
        rows, strides = _layout(later)
        assert strides == [1, 2] and abs(rows[0] - rows[1]) <= 2, rows


def test_a_load_change_moves_to_the_new_fixed_point_without_oscillating():
    slow, fast = [(0.0, 0.001), (0.0, 0.002)], [(0.0, 0.001), (0.0, 0.001)]
    rng_seed = 7
    before = _simulate(slow, 0.05, 6, seed=rng_seed)
    assert _layout(before[-1]) == ([8, 8], [1, 2])

    # continue from the same memory under the lifted load: replay by simulating both phases in one run
    def costs_at(call):
        return slow if call < 6 else fast

    layouts = []
    memory = None
    rng = random.Random(rng_seed)
    for call in range(14):
        costs = costs_at(call)
        warm, _ = warmup_layout(memory, num_ranks=2, rows=16, align=1, num_steps=10, warmup_steps=2)
        warmup_rows = [r.num_rows for r in warm.ranks]
        if memory is None:
            estimates = Evidence(((RankEvidence.of([(8, 0.008)]), RankEvidence.of([(8, 0.016)])),)).estimates(16)
        else:
            estimates = memory.evidence.estimates(16)
        ran = plan_call(estimates, memory, rows=16, align=1, num_steps=10, warmup_steps=2, mode="full",
                        max_stride=2, tolerance=0.02, warmup_rows=warmup_rows).plan
        displaced = Evidence((tuple(RankEvidence.of([(r.num_rows, (costs[i][0] + r.num_rows * costs[i][1])
                                                      * (1 + rng.uniform(-0.05, 0.05))) for _ in r.steps])
                                    for i, r in enumerate(ran.ranks)),))
        memory, _ = remember_call(memory, displaced, rows=16, warmup_rows=warmup_rows, ran=ran, exchange_seconds=0.0)
        layouts.append(_layout(ran))
    assert layouts[5] == ([8, 8], [1, 2])
    assert layouts[-1] == ([8, 8], [1, 1])
    changes = sum(1 for a, b in itertools.pairwise(layouts) if a != b)
    assert changes <= 2, layouts  # uniform -> (1, 2) once, back to stride 1 once: no oscillation


def test_one_disturbed_warmup_step_does_not_change_the_strides():
    """4 warmup steps (3 timed); one of the fast rank's is stalled 10x: the lower median ignores it."""
    costs = [(0.0, 0.001), (0.0, 0.003)]
    calm = _simulate(costs, 0.02, 1, seed=3, warmup=4)
    stalled = _simulate(costs, 0.02, 1, seed=3, warmup=4,
                        disturb=lambda call, rank, step: 10.0 if (rank, step) == (0, 2) else 1.0)
    assert _layout(calm[0])[1] == _layout(stalled[0])[1] == [1, 2]
