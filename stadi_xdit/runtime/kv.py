"""Displaced K/V: each attention layer sees the full image, its own band fresh and the rest stale.

Per layer we keep one full-image tensor holding K and V stacked on a leading dim (so each is a
contiguous view for attention), indexed by global token position, so a change of band layout at
the end of warmup needs no re-shuffling.

Two ways a layer's foreign K/V are refreshed:
- synchronous (warmup and `--stadi_exact`): every call all-gathers the fresh K/V of all bands,
  so attention is exactly that of one process;
- displaced (after warmup): the rank's *last* step of a sync period publishes its fresh K/V with
  an asynchronous all-gather; the result is waited for on the layer's first use in the next
  period. The schedule of publications is fixed by the plan, never by timing, so runs repeat
  bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stadi_xdit.runtime.comm import BandComm, PendingGather

# K/V reach the store as (batch, heads, tokens, head_dim); stacked they are (2, batch, heads, tokens, head_dim).
TOKEN_DIM = 3


class DisplacedKVStore:
    """Full-image K/V of every displaced attention layer of one rank."""

    def __init__(self, comm: BandComm):
        self.comm = comm
        self.token_counts: tuple[int, ...] = ()
        self.own_range: tuple[int, int] = (0, 0)
        self.synchronous = True
        self.publish = False
        self._full: dict[int, torch.Tensor] = {}
        self._pending: dict[int, PendingGather] = {}

    def set_layout(self, token_counts: Sequence[int], own_range: tuple[int, int]) -> None:
        if self._pending:
            raise RuntimeError("cannot change the band layout while a K/V exchange is in flight")
        self.token_counts = tuple(token_counts)
        self.own_range = own_range

    def set_phase(self, synchronous: bool, publish: bool = False) -> None:
        """`synchronous`: gather fresh K/V every call. `publish`: this step's K/V go out to the others."""
        self.synchronous = synchronous
        self.publish = publish and not synchronous

    def full_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V over the full image for this layer, given this rank's fresh band K/V."""
        own_kv = torch.stack([key, value])
        if layer in self._pending:
            self._full[layer] = self.comm.wait(self._pending.pop(layer))
        if self.synchronous:
            full = self.comm.all_gather(own_kv, self.token_counts, TOKEN_DIM)
            self._full[layer] = full
        else:
            full = self._full.get(layer)
            if full is None:
                raise RuntimeError("displaced attention needs at least one synchronous (warmup) step first")
            if full.shape[1] != own_kv.shape[1]:
                raise RuntimeError("batch size changed between exchanges; K/V buffers no longer match")
            start, end = self.own_range
            # In place: the buffer is this rank's own copy (a finished gather), never in flight.
            full[:, :, :, start:end] = own_kv
            if self.publish:
                self._pending[layer] = self.comm.all_gather_async(own_kv, self.token_counts, TOKEN_DIM)
        return full[0], full[1]

    def drain(self) -> None:
        """Finish every exchange in flight (end of run, or before a layout change)."""
        for layer in list(self._pending):
            self._full[layer] = self.comm.wait(self._pending.pop(layer))

    def reset(self) -> None:
        self.drain()
        self._full.clear()
