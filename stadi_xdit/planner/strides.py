"""Temporal allocation: how many base steps each rank advances per denoising evaluation.

A rank with stride s computes at base steps 0, s, 2s, ... and reuses its band in between, so a rank that
is 2x slower than the fastest one keeps pace by computing every other step. Inputs are assumed valid.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def ideal_strides(speeds: Sequence[float]) -> tuple[float, ...]:
    """``s*_i = v_max / v_i``: the stride at which rank i would keep pace with the fastest rank."""
    fastest = max(speeds)
    return tuple(fastest / speed for speed in speeds)


def candidate_periods(max_stride: int) -> tuple[int, ...]:
    """The periods L worth trying, ascending: the divisors of lcm(1..max_stride).

    Any other L in 1..lcm(1..max_stride) offers the same usable strides (its divisors <= max_stride) as
    the lcm of those strides, which is one of these, so trying only the divisors loses nothing.
    """
    period_limit = math.lcm(*range(1, max_stride + 1))
    small = [d for d in range(1, math.isqrt(period_limit) + 1) if period_limit % d == 0]
    return tuple(sorted(set(small) | {period_limit // d for d in small}))


def nearest_divisor_strides(ideal: Sequence[float], period: int, max_stride: int) -> tuple[int, ...]:
    """Per rank, the divisor of ``period`` (<= max_stride) nearest to its ideal stride in log space.

    Only the two neighbours of s*_i (largest divisor <= s*_i, smallest >= s*_i) can be nearest; the
    geometric midpoint sqrt(below * above) separates them, and a tie goes to the smaller stride (less
    step reuse, better quality). Each rank decides independently: O(N log #divisors), not 2^N vectors.
    """
    divisors = [d for d in range(1, min(period, max_stride) + 1) if period % d == 0]
    return tuple(_nearest_in_log_space(target, divisors) for target in ideal)


def _nearest_in_log_space(target: float, divisors: list[int]) -> int:
    # target >= 1 and divisors[0] == 1, so a divisor <= target always exists.
    above_index = bisect.bisect_left(divisors, target)
    if above_index < len(divisors) and divisors[above_index] == target:
        return divisors[above_index]
    below = divisors[above_index - 1]
    if above_index == len(divisors):  # target beyond the cap: clamp
        return below
    above = divisors[above_index]
    return below if target * target <= below * above else above


def stride_period(strides: Sequence[int]) -> int:
    """Period L = lcm(strides): every L base steps all ranks have just computed together."""
    return math.lcm(*strides)


def sync_points(num_base_steps: int, period: int) -> tuple[int, ...]:
    """Base steps where all ranks exchange fresh K/V: multiples of the period, plus the end T'."""
    return (*range(0, num_base_steps, period), num_base_steps)
