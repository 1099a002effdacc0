"""Comparisons and fault injection shared by the multi-process STADI tests."""

from __future__ import annotations

import torch

from stadi_xdit.runtime.kv import DisplacedKVStore


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """||test - reference|| / ||reference||."""
    return ((test - reference).norm() / reference.norm()).item()


def ignore_foreign_bands(store: DisplacedKVStore) -> None:
    """Fault injection: displaced attention sees zeros instead of the other bands' K/V.

    Synchronous steps stay exact, so the damage is exactly what a broken exchange would do.
    """
    exact = store.full_kv

    def own_band_only(layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full_key, full_value = exact(layer, key, value)
        if store.synchronous:
            return full_key, full_value
        start, end = store.own_range
        masked = [torch.zeros_like(t) for t in (full_key, full_value)]
        for dst, src in zip(masked, (full_key, full_value)):
            dst[:, :, start:end] = src[:, :, start:end]
        return masked[0], masked[1]

    store.full_kv = own_band_only
