"""How long does ``plan()`` take? Prints the median planning time for 8, 64 and 256 ranks.

Speeds are seeded uniform draws in [0.25, 1] (up to 4x heterogeneity). Rows are realistic latents:
a 4096 px image with an 8x VAE and patch size 2 has 4096 / 8 / 2 = 256 token rows, enough for 8 and 64
ranks; 256 ranks need more rows to be meaningful, so they get 1024 rows (a 16384 px image). 50 steps,
5 warmup, align 1. No assertions: the target (< 10 ms for 64 ranks) is for a human to read.

    python scripts/bench_planner.py
"""

from __future__ import annotations

import random
import statistics
import time

from stadi_xdit.planner import plan

RANK_COUNTS = (8, 64, 256)
MAX_STRIDES = (2, 4)
REPEATS = 21


def rows_for(num_ranks: int) -> int:
    return max(256, 4 * num_ranks)


def median_plan_ms(speeds: list[float], rows: int, max_stride: int) -> float:
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        plan(speeds, rows=rows, align=1, num_steps=50, warmup_steps=5, mode="full", max_stride=max_stride)
        timings.append((time.perf_counter() - start) * 1e3)
    return statistics.median(timings)


def main() -> None:
    rng = random.Random(0)
    print(f"{'ranks':>5} {'rows':>5} {'max_stride':>10} {'median ms':>10}")
    for num_ranks in RANK_COUNTS:
        speeds = [rng.uniform(0.25, 1.0) for _ in range(num_ranks)]
        for max_stride in MAX_STRIDES:
            milliseconds = median_plan_ms(speeds, rows_for(num_ranks), max_stride)
            print(f"{num_ranks:>5} {rows_for(num_ranks):>5} {max_stride:>10} {milliseconds:>10.2f}")


if __name__ == "__main__":
    main()
