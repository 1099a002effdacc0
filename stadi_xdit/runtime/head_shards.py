"""STADI groups of unequal Ulysses degrees (issue 23, nodes of different sizes): who holds which heads, and
the K/V exchange between ranks that hold different head shards.

With groups of equal degree U, rank p of every group holds the same heads (p-th of U shards), so the
displaced K/V move between those equal peers as whole bands (`DisplacedKVStore`'s `comm`). A mixed cluster
has nodes of different sizes: a group of 4 next to a group of 2 or of 1. Rank p of a group of U holds heads
[p H/U, (p+1) H/U); a receiver in another group needs each sender's band for the heads that both hold,
which is a different head range for every pair. So one exchange moves, from every rank to every rank of
another group, the sender's band rows with the columns of the heads they share (`ShardRoutes`): one
all-to-all per layer group, of uneven sizes, over all ranks of the CFG branch. A rank's store still holds
the whole image for its own heads only, and each rank receives exactly the heads it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stadi_xdit.runtime.comm import BandComm, PendingWorks
from stadi_xdit.runtime.exchange import LayerSlot


@dataclass(frozen=True)
class HeadShards:
    """The ranks of one CFG branch as STADI members: `group_sizes[m]` consecutive ranks form member m, a
    Ulysses group of that degree over the model's `heads` attention heads."""

    group_sizes: tuple[int, ...]
    heads: int

    def __post_init__(self) -> None:
        if not self.group_sizes or any(isinstance(size, bool) or not isinstance(size, int) or size < 1
                                       for size in self.group_sizes):
            raise ValueError(f"group sizes must be integers >= 1, got {list(self.group_sizes)}")
        for size in self.group_sizes:
            if self.heads % size:
                raise ValueError(f"a group of {size} ranks cannot split {self.heads} attention heads evenly")

    @property
    def world_size(self) -> int:
        return sum(self.group_sizes)

    @property
    def members(self) -> int:
        return len(self.group_sizes)

    def member_of(self, rank: int) -> tuple[int, int]:
        """(member, rank inside the member's group) of branch rank `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not one of the {self.world_size} ranks of {list(self.group_sizes)}")
        for member, size in enumerate(self.group_sizes):
            if rank < size:
                return member, rank
            rank -= size
        raise AssertionError("unreachable")

    def ranks_of(self, member: int) -> range:
        start = sum(self.group_sizes[:member])
        return range(start, start + self.group_sizes[member])

    def head_range(self, rank: int) -> tuple[int, int]:
        member, part = self.member_of(rank)
        width = self.heads // self.group_sizes[member]
        return part * width, (part + 1) * width

    def shared_heads(self, sender: int, receiver: int) -> tuple[int, int]:
        """The heads of `sender`'s band that `receiver` needs: those both hold; none (an empty range) inside one
        group, whose ranks compute the same band."""
        if self.member_of(sender)[0] == self.member_of(receiver)[0]:
            return 0, 0
        (a, b), (c, d) = self.head_range(sender), self.head_range(receiver)
        return max(a, c), max(max(a, c), min(b, d))


def shard_columns(slots: Sequence[LayerSlot], held: tuple[int, int], wanted: tuple[int, int]) -> torch.Tensor:
    """Columns of a token row of a group block (its layers' `slots`, each laid out (2, batch, heads, head_dim)
    over the `held` heads) that hold the `wanted` heads, in the order both ends of an exchange enumerate them:
    layer, K/V, batch, head, channel."""
    first, count = wanted[0] - held[0], wanted[1] - wanted[0]
    pieces = []
    for slot in slots:
        batch, heads, head_dim = slot.shape
        if heads != held[1] - held[0]:
            raise ValueError(f"layer {slot.layer} holds {heads} heads, its rank's shard is {held}")
        for kv_batch in range(2 * batch):
            start = slot.column + (kv_batch * heads + first) * head_dim
            pieces.append(torch.arange(start, start + count * head_dim))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


@dataclass
class PendingShards(PendingWorks):
    """An exchange of head shards in flight; once it has landed, the received pieces are written into place
    (exactly once, although a wait may be repeated while a peer still works)."""

    unpack: Callable[[], None] | None = None

    def wait(self) -> None:
        super().wait()
        if self.unpack is not None:
            unpack, self.unpack = self.unpack, None
            unpack()


class ShardRoutes:
    """What one rank sends to and receives from every branch rank in one exchange of a group block: the
    columns of the heads each pair shares (`shard_columns`), for the sender's band rows."""

    def __init__(self, shards: HeadShards, rank: int, slots: Sequence[LayerSlot]):
        self.shards, self.rank = shards, rank
        held = shards.head_range(rank)
        self.send = [shard_columns(slots, held, shards.shared_heads(rank, peer)) for peer in range(shards.world_size)]
        self.receive = [shard_columns(slots, held, shards.shared_heads(peer, rank))
                        for peer in range(shards.world_size)]
        self._on_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def _columns(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The column indices where the block lives (moved once per device, not per exchange)."""
        if device not in self._on_device:
            self._on_device[device] = ([c.to(device) for c in self.send], [c.to(device) for c in self.receive])
        return self._on_device[device]

    def launch(self, comm: BandComm, block: torch.Tensor, band_rows: Callable[[int], tuple[int, int]],
               timeout: timedelta | None) -> PendingShards:
        """Start the exchange of `block` (tokens, width): this rank's band rows out, each other member's band rows
        (`band_rows(member)`) in, for the heads they share; written into `block` when the wait returns."""
        shards = self.shards
        own = band_rows(shards.member_of(self.rank)[0])
        send_columns, receive_columns = self._columns(block.device)
        outgoing = [block[own[0]:own[1]].index_select(1, columns) for columns in send_columns]
        sources = [band_rows(shards.member_of(peer)[0]) for peer in range(shards.world_size)]
        counts = [(end - start) * len(columns) for (start, end), columns in zip(sources, receive_columns)]
        send = torch.cat([piece.reshape(-1) for piece in outgoing])
        received = send.new_empty(sum(counts))
        comm.collectives += 1
        work = dist.all_to_all_single(received, send, output_split_sizes=counts,
                                      input_split_sizes=[piece.numel() for piece in outgoing], group=comm.group,
                                      async_op=True)

        def unpack() -> None:
            for (start, end), columns, piece in zip(sources, receive_columns, received.split(counts)):
                if len(columns):
                    block[start:end].index_copy_(1, columns, piece.view(end - start, len(columns)))

        return PendingShards([work], timeout, unpack)
