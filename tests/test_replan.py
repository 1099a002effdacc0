"""The mid-run re-plan decision: pure, deterministic, with a threshold and hysteresis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stadi_xdit.planner import plan
from stadi_xdit.planner.replan import ReplanPolicy, decide_replan, skipped_row_steps

POLICY = ReplanPolicy(threshold=0.10, confirmations=2)


def _plan(speeds, steps=20, warmup=2, mode="full"):
    return plan(speeds, rows=32, align=1, num_steps=steps, warmup_steps=warmup, mode=mode, max_stride=2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.2, 5.0), min_size=2, max_size=6), st.integers(0, 17), st.integers(0, 3))
def test_same_inputs_same_decision(speeds, step, count):
    current = _plan([1.0] * len(speeds))
    first = decide_replan(current, next_base_step=step, speeds=speeds, confirmations=count, policy=POLICY)
    second = decide_replan(current, next_base_step=step, speeds=list(speeds), confirmations=count, policy=POLICY)
    assert first == second


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.97, 1.03), min_size=2, max_size=6), st.integers(0, 10))
def test_noise_below_the_threshold_never_replans(noisy, step):
    """Speeds within +-3 % of the planned ones cannot promise a 10 % gain."""
    current = _plan([1.0] * len(noisy))
    count = 0
    for _ in range(5):
        decision = decide_replan(current, next_base_step=step, speeds=noisy, confirmations=count, policy=POLICY)
        assert not decision.replan
        count = decision.confirmations


@settings(max_examples=100, deadline=None)
@given(st.floats(0.97, 1.03), st.floats(0.97, 1.03), st.integers(0, 10))
def test_noise_around_a_stride_plan_never_replans(fast, slow, step):
    """Planned for 2:1 (the slow rank at stride 2): +-3 % noise promises neither speed nor fewer skipped steps."""
    current = _plan([1.0, 0.5])
    assert [r.stride for r in current.ranks] == [1, 2]
    count = 0
    for _ in range(5):
        decision = decide_replan(current, next_base_step=step, speeds=[fast, 0.5 * slow], confirmations=count,
                                 policy=POLICY)
        assert not decision.replan
        count = decision.confirmations


def test_a_lifted_load_restores_the_skipped_steps():
    """Planned for 2:1; the slow rank is fast again: no faster plan exists (the fast rank bounds both),
    but stride 1 everywhere costs nothing, so the re-plan restores the skipped steps."""
    current = _plan([1.0, 0.5])
    assert skipped_row_steps([r.num_rows for r in current.ranks], [r.stride for r in current.ranks]) > 0
    first = decide_replan(current, next_base_step=2, speeds=[1.0, 1.0], confirmations=0, policy=POLICY)
    assert first.reason == "fewer skipped steps" and not first.replan
    second = decide_replan(current, next_base_step=4, speeds=[1.0, 1.0], confirmations=1, policy=POLICY)
    assert second.replan and [r.stride for r in second.new_plan.ranks] == [1, 1]
    assert second.replanned_seconds <= 1.02 * second.current_seconds


def test_a_lasting_slowdown_replans_after_the_confirmations():
    current = _plan([1.0, 1.0])  # planned for equal ranks
    slowed = [1.0, 0.4]  # rank 1 got a background job
    first = decide_replan(current, next_base_step=4, speeds=slowed, confirmations=0, policy=POLICY)
    assert not first.replan and first.confirmations == 1 and first.gain > POLICY.threshold
    second = decide_replan(current, next_base_step=5, speeds=slowed, confirmations=first.confirmations, policy=POLICY)
    assert second.replan and second.new_plan is not None
    rows = [r.num_rows for r in second.new_plan.ranks]
    assert rows[1] < rows[0]  # the slowed rank now holds fewer rows
    assert second.new_plan.num_steps == 18 - 5 and second.new_plan.warmup_steps == 0


def test_one_noisy_period_resets_the_count():
    current = _plan([1.0, 1.0])
    spike = decide_replan(current, next_base_step=4, speeds=[1.0, 0.4], confirmations=0, policy=POLICY)
    calm = decide_replan(current, next_base_step=5, speeds=[1.0, 1.0], confirmations=spike.confirmations,
                         policy=POLICY)
    assert spike.confirmations == 1 and not calm.replan and calm.confirmations == 0


def test_transition_cost_can_veto_a_small_gain():
    current = _plan([1.0, 1.0])
    cheap = decide_replan(current, next_base_step=4, speeds=[1.0, 0.4], confirmations=1, policy=POLICY)
    assert cheap.replan
    costly = decide_replan(current, next_base_step=4, speeds=[1.0, 0.4], confirmations=1, policy=POLICY,
                           transition_seconds=cheap.current_seconds)
    assert not costly.replan


def test_no_replan_near_the_end_or_on_a_rank_count_mismatch():
    current = _plan([1.0, 1.0])
    assert not decide_replan(current, next_base_step=17, speeds=[1.0, 0.2], confirmations=5, policy=POLICY).replan
    assert not decide_replan(current, next_base_step=3, speeds=[1.0, 0.2, 1.0], confirmations=5,
                             policy=POLICY).replan


@pytest.mark.parametrize("kwargs", [{"threshold": -0.1}, {"threshold": float("nan")}, {"confirmations": 0}])
def test_policy_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ReplanPolicy(**kwargs)
