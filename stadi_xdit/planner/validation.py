"""Argument checks for the planner.

Every check raises ``ValueError`` (also for wrong types: callers catch one exception type) with a
one-line message that starts with the argument's name, so a caller (the CLI, the runtime) can point
at the flag or config key that is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

# lcm(1..16) = 720720 has 240 divisors; beyond that the period search grows too fast to be useful, and a
# rank skipping 16+ steps in a row is far outside the regime where step reuse keeps image quality.
MAX_STRIDE_LIMIT = 16

# Size limits that keep one plan() (plus Plan.to_json) under ~1 s in pure Python, far beyond any real
# run (a 16384 px image with an 8x VAE and patch 2 has 1024 token rows). Measured worst cases
# (max_stride 16, speeds spread so all 240 candidate periods give distinct stride vectors): 256 ranks x
# 4096 rows ~0.5 s; 256 ranks x 1000 steps (all strides 1) ~0.3 s, mostly to_json. Planning time grows
# with rows x candidates (water-filling per candidate) and ranks x steps (per-rank step lists).
MAX_RANKS = 256
MAX_ROWS = 4096
# Slowest rank vs the fastest that --speeds may give (stadi-plan, stadi-bench --simulate): below it,
# predicted times overflow to inf.
MIN_RELATIVE_SPEED = 1e-6
MAX_STEPS = 1000


def require_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; bools are rejected (True is not a row count)."""
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")  # noqa: TRY004
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {bound}, got {value}")
    return value


def require_supported(name: str, value: int, limit: int, what: str) -> int:
    """``value`` if <= ``limit``, the planner's size limit for ``what`` (e.g. "token rows")."""
    if value > limit:
        raise ValueError(f"{name} must be <= {limit} (at most {limit} {what} are supported), got {value}")
    return value


def require_seconds(name: str, value: object) -> float:
    """``value`` as a finite float >= 0 (a cost term or a tolerance)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def require_speeds(speeds: Sequence[float], *, name: str = "speeds") -> tuple[float, ...]:
    """Speeds as a non-empty tuple of finite floats > 0."""
    if isinstance(speeds, (str, bytes)) or not isinstance(speeds, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(speeds).__name__}")  # noqa: TRY004
    if len(speeds) == 0:
        raise ValueError(f"{name} must contain one speed per rank, got an empty sequence")
    if len(speeds) > MAX_RANKS:
        raise ValueError(
            f"{name} must have <= {MAX_RANKS} entries (at most {MAX_RANKS} ranks are supported), "
            f"got {len(speeds)}"
        )
    for index, speed in enumerate(speeds):
        if isinstance(speed, bool) or not isinstance(speed, Real) or not math.isfinite(speed) or speed <= 0:
            raise ValueError(f"{name}[{index}] must be a finite number > 0, got {speed!r}")
    return tuple(float(speed) for speed in speeds)


def require_layout(num_ranks: int, rows: object, align: object) -> tuple[int, int]:
    """``rows`` and ``align`` such that every one of ``num_ranks`` bands can get >= 1 align unit."""
    rows = require_supported("rows", require_int("rows", rows, minimum=1), MAX_ROWS, "token rows")
    align = require_int("align", align, minimum=1)
    if rows % align != 0:
        raise ValueError(f"rows must be a multiple of align={align}, got {rows}")
    if rows < num_ranks * align:
        raise ValueError(f"rows must be >= num_ranks*align = {num_ranks}*{align}, got {rows}")
    return rows, align


def require_steps(num_steps: object, warmup_steps: object) -> tuple[int, int]:
    """``num_steps`` T >= 1 and ``warmup_steps`` W with 0 <= W < T (at least one base step)."""
    num_steps = require_supported(
        "num_steps", require_int("num_steps", num_steps, minimum=1), MAX_STEPS, "denoising steps"
    )
    warmup_steps = require_int("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps >= num_steps:
        raise ValueError(f"warmup_steps must be < num_steps={num_steps}, got {warmup_steps}")
    return num_steps, warmup_steps


def require_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        options = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]
