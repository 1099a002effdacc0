"""Attention over bands: the one place where a rank's band attends to the whole image.

A family's attention processor keeps what is its own (projections, norms, RoPE, output
projections) and hands this helper its band's projected queries, keys and values, plus an
optional replicated stream (the text of a joint-attention block) in its place in the joint
sequence. The keys and values of the whole image come from the displaced K/V store: the own band
fresh, the other bands from the latest exchange (or gathered fresh in synchronous steps). What is
added to attention under STADI lives here, once, not in each family:

- **Ulysses inside a STADI group** (`--ulysses_degree`, issue 23): the group's ranks split its band
  evenly (the loop gives each its part); an all-to-all trades tokens for heads before attention
  and back after it, so the store holds and exchanges one head shard of the whole image.
- **The compile boundary** is the store and the all-to-alls: under torch.compile the collectives,
  host timers and bookkeeping run eagerly between the compiled parts of each attention
  (`_full_kv`, `_all_to_all`), so only attention's own tensor work is traced.

Step caching is not here: whether a step is computed at all is a step-level decision, taken by the
loop, not inside attention.

Layouts: every tensor in is (batch, heads, tokens, head_dim), the store's and SDPA's layout; the
outputs are (batch, tokens, heads * head_dim), split back into the band's and the stream's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stadi_xdit.runtime.comm import BandComm
from stadi_xdit.runtime.kv import DisplacedKVStore
from stadi_xdit.runtime.layout import BandView


class BandAttentionProcessor:
    """Base of the families' processors: the store, this attention's layer id in it (the order in which the
    injection plan lists the displaced attention modules), and the band this rank computes (`band`, told by
    the injection with each layout: the rank's part of its group's band under Ulysses, where the store holds
    the group's)."""

    band: BandView | None = None

    def __init__(self, store: DisplacedKVStore, layer: int):
        super().__init__()  # cooperative: PixArt's processor is also diffusers' AttnProcessor2_0
        self.store = store
        self.layer = layer

    def set_band(self, band: BandView) -> None:
        self.band = band

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               stream: Stream | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return band_attention(self.store, self.layer, query, key, value, stream)


@dataclass(frozen=True)
class Stream:
    """A replicated stream's projected queries, keys and values, and where it sits in the joint sequence."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    first: bool  # before the image tokens (Flux, Qwen-Image) or after them (SD3)
    key_mask: torch.Tensor | None = None  # (batch, stream tokens) bool: False = padding, never attended

    def head_shard(self, index: int, parts: int) -> Stream:
        """The stream with the `index`-th of `parts` equal parts of its heads (its mask is every head's)."""
        query, key, value = (x.chunk(parts, dim=1)[index] for x in (self.query, self.key, self.value))
        return Stream(query, key, value, self.first, self.key_mask)


@torch.compiler.disable
def _full_kv(store: DisplacedKVStore, layer: int, key: torch.Tensor,
             value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return store.full_kv(layer, key, value)


@torch.compiler.disable
def _all_to_all(comm: BandComm, tensor: torch.Tensor, scatter_dim: int, gather_dim: int,
                scatter_sizes: tuple[int, ...] | None = None, gather_sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    return comm.all_to_all(tensor, scatter_dim, gather_dim, scatter_sizes, gather_sizes)


@torch.compiler.disable
def _gather_heads(comm: BandComm, tensor: torch.Tensor) -> torch.Tensor:
    return comm.gather_parts(tensor, dim=1)


def band_attention(store: DisplacedKVStore, layer: int, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, stream: Stream | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the band's queries (and the stream's) over the whole image's K/V (and the stream's).

    With Ulysses inside the rank's STADI group (`store.sequence`), this rank holds a part of the group's
    band (`BandLayout.split`) with every head: one all-to-all trades it for the whole band with heads / U of the
    heads (xDiT's USP order: a rank's heads are the U-th part at its group rank), attention runs over
    the store's K/V of that head shard, and one all-to-all trades back. The replicated stream takes its
    head shard, and its output is gathered over the heads.

    Returns the band's output and the stream's (None without a stream), (batch, tokens, heads * head_dim)."""
    sequence = store.sequence if store.sequence is not None and store.sequence.world_size > 1 else None
    if sequence is not None:
        parts = store.part_counts  # each group rank's tokens (a band of any length)
        query, key, value = (_all_to_all(sequence, x, 1, 2, gather_sizes=parts) for x in (query, key, value))
        if stream is not None:
            stream = stream.head_shard(sequence.rank, sequence.world_size)
    image_key, image_value = _full_kv(store, layer, key, value)
    if stream is None:
        out = F.scaled_dot_product_attention(query, image_key, image_value, dropout_p=0.0, is_causal=False)
    else:
        def joint(stream_part: torch.Tensor, image_part: torch.Tensor) -> torch.Tensor:
            return torch.cat([stream_part, image_part] if stream.first else [image_part, stream_part], dim=2)

        mask = None
        if stream.key_mask is not None:  # a key mask: the stream's padding off, every image token on
            image_on = torch.ones((query.shape[0], image_key.shape[2]), dtype=torch.bool, device=query.device)
            mask = joint(stream.key_mask[:, None, :], image_on[:, None, :])[:, None]
        out = F.scaled_dot_product_attention(joint(stream.query, query), joint(stream.key, image_key),
                                             joint(stream.value, image_value), attn_mask=mask, dropout_p=0.0,
                                             is_causal=False)
    if sequence is None:
        # Flattened first, then split, as one process does: the layers after attention then read the same
        # strides, and bf16 kernels round alike (a contiguous copy of the band measurably does not).
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return (out, None) if stream is None else _split_joint(out, stream, dim=1)
    image_out, stream_out = (out, None) if stream is None else _split_joint(out, stream, dim=2)
    image_out = _all_to_all(sequence, image_out, 2, 1, scatter_sizes=parts)
    if stream_out is not None:
        stream_out = _gather_heads(sequence, stream_out.contiguous()).transpose(1, 2).flatten(2, 3)
    return image_out.transpose(1, 2).flatten(2, 3).to(query.dtype), stream_out


def _split_joint(out: torch.Tensor, stream: Stream, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image part, stream part) of a joint attention output along its token dimension `dim`."""
    stream_tokens = stream.query.shape[2]
    if stream.first:
        stream_out, image_out = out.split_with_sizes([stream_tokens, out.shape[dim] - stream_tokens], dim=dim)
    else:
        image_out, stream_out = out.split_with_sizes([out.shape[dim] - stream_tokens, stream_tokens], dim=dim)
    return image_out, stream_out
