"""The batched K/V exchange's pieces: the layer registry, the flat buffer and the method rule.

Buffer layout. Displaced layers are registered on first use, in the order they run, and cut into
groups of `group_layers` consecutive layers. Every layer's K/V over the *full image* live in one
flat tensor per rank; group g is one contiguous block of shape ``(tokens, width_g)``, token-major,
where a token row holds the K and V of every layer of the group for that token
(``width_g = sum over its layers of 2 * batch * heads * head_dim``)::

    flat = [ group 0: tokens x (layer 0 | layer 1 | ...) ][ group 1: tokens x (...) ] ...

Because the block is token-major, the rows of one band, for all layers of a group, are one
contiguous range: one collective per source rank (or one all-gather) moves a whole group, straight
into place, with no packing and no copy. A layer's K (or V) is a strided view
``block[:, columns].view(tokens, 2, batch, heads, head_dim)[:, 0]`` permuted to
``(batch, heads, tokens, head_dim)``, the layout attention takes.

This rank's own band rows double as its send buffer, the other bands' rows as its receive buffers:
the same memory is reused period after period, and nothing is allocated while the layout and batch
stay the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Layers per published group (measured on the `small` preset, 2 ranks, CPU/gloo: docs/method.md).
DEFAULT_GROUP_LAYERS = 4

METHODS = ("all_gather", "broadcast")


def choose_method(token_counts: Sequence[int], in_place_all_gather: bool = True) -> str:
    """How bands are exchanged: whichever moves fewer bytes.

    One broadcast per source delivers every band at its own size: ``sum(bands)`` tokens reach each
    rank. An all-gather pads every band to the largest: ``N * max(bands)``. Since
    ``N * max >= sum`` with equality only for equal bands, the all-gather can only tie, exactly
    when the bands are equal (and then it needs no padding). A tie goes to the all-gather (one
    collective instead of N) where it runs in place (NCCL); gloo's all-gather stages the whole
    output in a temporary and copies it back (measured 2-4x the CPU time and ~3x the wall time of
    the broadcasts for 12.5 MB per rank on 2 ranks), so there (``in_place_all_gather=False``) the
    broadcasts win the tie.
    """
    counts = list(token_counts)
    if not counts or min(counts) <= 0:
        raise ValueError(f"token_counts must be positive, got {counts}")
    padded, exact = len(counts) * max(counts), sum(counts)
    return "all_gather" if padded < exact or (padded == exact and in_place_all_gather) else "broadcast"


def method_bytes(token_counts: Sequence[int], bytes_per_token: int) -> dict[str, int]:
    """Bytes that reach one rank per exchanged set of layers, for either method (the rule's input)."""
    counts = list(token_counts)
    return {"broadcast": sum(counts) * bytes_per_token, "all_gather": len(counts) * max(counts) * bytes_per_token}


@dataclass(frozen=True)
class LayerSlot:
    """Where one layer's K/V live in the flat buffer."""

    layer: int
    group: int
    column: int  # first element of the layer inside a token row of its group block
    shape: tuple[int, int, int]  # (batch, heads, head_dim) of K (and V)

    @property
    def width(self) -> int:
        batch, heads, head_dim = self.shape
        return 2 * batch * heads * head_dim


class LayerRegistry:
    """Layers in order of first use; `close()` fixes their groups (one full forward has run)."""

    def __init__(self) -> None:
        self._shapes: dict[int, tuple[int, int, int]] = {}
        self.closed = False
        self.slots: dict[int, LayerSlot] = {}
        self.group_sizes: list[int] = []
        self.group_widths: list[int] = []

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, layer: int) -> bool:
        return layer in self._shapes

    @property
    def layers(self) -> list[int]:
        return list(self._shapes)

    def shape(self, layer: int) -> tuple[int, int, int] | None:
        return self._shapes.get(layer)

    def register(self, layer: int, shape: tuple[int, int, int]) -> None:
        if self.closed:
            raise RuntimeError("the layer registry is closed; clear() it to register again")
        if layer in self._shapes:
            raise RuntimeError(f"layer {layer} is already registered")
        self._shapes[layer] = shape

    def close(self, group_layers: int) -> None:
        """Cut the registered layers, in order, into groups of `group_layers`."""
        if group_layers < 1:
            raise ValueError(f"group_layers must be >= 1, got {group_layers}")
        self.slots, self.group_sizes, self.group_widths = {}, [], []
        for position, (layer, shape) in enumerate(self._shapes.items()):
            group = position // group_layers
            if group == len(self.group_sizes):
                self.group_sizes.append(0)
                self.group_widths.append(0)
            slot = LayerSlot(layer, group, self.group_widths[group], shape)
            self.slots[layer] = slot
            self.group_sizes[group] += 1
            self.group_widths[group] += slot.width
        self.closed = True

    def clear(self) -> None:
        self.__init__()


class FlatKVBuffer:
    """One flat tensor with every registered layer's full-image K/V, grouped as the module says."""

    def __init__(self, registry: LayerRegistry, tokens: int, dtype: torch.dtype, device: torch.device):
        if not registry.closed:
            raise RuntimeError("close the layer registry before allocating the buffer")
        self.tokens = tokens
        self.dtype = dtype
        self.slots = dict(registry.slots)
        self.group_sizes = list(registry.group_sizes)
        self.group_widths = list(registry.group_widths)
        self.flat = torch.empty(tokens * sum(self.group_widths), dtype=dtype, device=device)
        self.blocks: list[torch.Tensor] = []
        offset = 0
        for width in self.group_widths:
            self.blocks.append(self.flat[offset:offset + tokens * width].view(tokens, width))
            offset += tokens * width

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @property
    def num_groups(self) -> int:
        return len(self.blocks)

    def fits(self, registry: LayerRegistry, tokens: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.tokens == tokens and self.dtype == dtype and self.flat.device == torch.device(device)
                and self.slots == registry.slots)

    def layer_view(self, layer: int) -> torch.Tensor:
        """``(tokens, 2, batch, heads, head_dim)`` view of one layer (index 0: K, 1: V)."""
        slot = self.slots[layer]
        block = self.blocks[slot.group]
        return block[:, slot.column:slot.column + slot.width].view(self.tokens, 2, *slot.shape)

    def bytes_per_token(self) -> int:
        """Bytes of one token row over every layer (what one band row costs to send)."""
        return sum(self.group_widths) * self.flat.element_size()


def heads_view(kv: torch.Tensor, index: int) -> torch.Tensor:
    """K (index 0) or V (1) of a ``(tokens, 2, batch, heads, head_dim)`` view, as attention takes it:
    ``(batch, heads, tokens, head_dim)``."""
    return kv[:, index].permute(1, 2, 0, 3)


def write_band(kv: torch.Tensor, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this rank's fresh ``(batch, heads, band tokens, head_dim)`` K/V into rows ``start...``
    of a ``(tokens, 2, batch, heads, head_dim)`` view (casting to its dtype); no temporaries."""
    end = start + key.shape[2]
    kv[start:end, 0].copy_(key.permute(2, 0, 1, 3))
    kv[start:end, 1].copy_(value.permute(2, 0, 1, 3))
