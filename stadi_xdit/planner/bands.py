"""Spatial allocation: how many token rows each rank's band gets.

Bands are contiguous, in rank order, and made of whole ``align``-row units (the runtime needs bands that
are multiples of e.g. the VAE or attention tile). Inputs are assumed valid (see ``validation``).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def uniform_band_rows(num_ranks: int, rows: int, align: int) -> tuple[int, ...]:
    """Equal bands +- one align unit; the first ``units % num_ranks`` ranks get the extra unit."""
    units_each, extra_units = divmod(rows // align, num_ranks)
    return tuple((units_each + (rank < extra_units)) * align for rank in range(num_ranks))


def water_fill_band_rows(weights: Sequence[float], rows: int, align: int) -> tuple[int, ...]:
    """Rows per rank minimising ``max_i rows_i / weights_i`` with every band >= one align unit.

    Greedy water-filling: start every rank at one unit, then give each further unit to the rank whose
    band would be cheapest *after* taking it, ``(rows_i + align) / weights_i`` (ties: lowest rank).
    The greedy takes the globally smallest increments first, and any allocation must take as many
    increments from the same sorted per-rank sequences, so its maximum can never be lower: exact.
    O(units * log N) with a heap.
    """
    band_rows = [align] * len(weights)
    # (band cost after one more unit, rank): the tuple order gives the lowest-rank tie-break for free.
    heap = [((align + align) / weight, rank) for rank, weight in enumerate(weights)]
    heapq.heapify(heap)
    for _ in range(rows // align - len(weights)):
        _, rank = heap[0]
        band_rows[rank] += align
        heapq.heapreplace(heap, ((band_rows[rank] + align) / weights[rank], rank))
    return tuple(band_rows)


def row_bounds(band_rows: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Contiguous ``[start, end)`` bounds, in rank order, for bands of the given sizes."""
    bounds = []
    start = 0
    for size in band_rows:
        bounds.append((start, start + size))
        start += size
    return tuple(bounds)
