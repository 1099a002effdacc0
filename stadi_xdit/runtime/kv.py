"""Displaced K/V: each attention layer sees the full image, its own band fresh and the rest stale.

Every displaced layer's full-image K/V live in one flat buffer per rank (`runtime/exchange.py`:
layers registered on first use, cut into groups, each group one token-major block), indexed by
global token position, so a change of band layout needs no re-shuffling and nothing is allocated
from one period to the next.

Two ways a layer's foreign K/V are refreshed:

- synchronous steps (warmup and `--stadi_exact`): each layer gathers the fresh K/V of every band
  before its attention (on CUDA one in-place all-gather for equal bands; otherwise, and always on
  gloo, one broadcast per source: `exchange.choose_method`) into a
  one-layer staging buffer, so attention is exactly that of one process. The step flagged
  `publish` (the last warmup step) also copies them into the flat buffer: they are the stale K/V
  the first displaced period starts from. Exact mode never publishes, so it never allocates the
  flat buffer.
- displaced steps (after warmup): a layer writes its fresh band into the flat buffer and attends
  over the buffer. On a rank's *last* step of a sync period (`publish`), each group of layers is
  sent as one collective per source (or one all-gather) as soon as every layer of the group has
  run its attention, so the exchange overlaps the rest of the forward; the receive lands in
  place, and the layer's first use in the next period waits for it. The schedule of publications
  is fixed by the plan, never by timing, so runs repeat bit for bit.

`kv_dtype` (e.g. bfloat16) stores the stale K/V in a narrower type: the flat buffer and the bytes
exchanged shrink, and attention casts them back, with this rank's own band always fresh at full
precision. Synchronous steps always attend over full-precision K/V.
"""

from __future__ import annotations

import logging

import torch

from stadi_xdit.config import KV_DTYPES
from stadi_xdit.planner.memory import StoreFit, fit_kv_store
from stadi_xdit.runtime.comm import BandComm, PendingWorks
from stadi_xdit.runtime.exchange import (
    DEFAULT_GROUP_LAYERS,
    FlatKVBuffer,
    LayerRegistry,
    LayerSlot,
    choose_method,
    heads_view,
    method_bytes,
    write_band,
)
from stadi_xdit.runtime.head_shards import HeadShards, ShardRoutes
from stadi_xdit.runtime.layout import BandView

logger = logging.getLogger(__name__)

# K/V reach the store as (batch, heads, tokens, head_dim).
TOKEN_DIM = 2

_UNSET = object()

def kv_storage_dtype(name: str) -> torch.dtype | None:
    """The dtype a --stadi_kv_dtype choice (config.KV_DTYPES) stores and exchanges stale K/V in; None: as computed."""
    if name not in KV_DTYPES:
        raise ValueError(f"--stadi_kv_dtype must be one of {', '.join(KV_DTYPES)}, got {name!r}")
    return None if name == "auto" else getattr(torch, name)


class DisplacedKVStore:
    """Full-image K/V of every displaced attention layer of one rank, and their exchange."""

    def __init__(self, comm: BandComm, *, group_layers: int = DEFAULT_GROUP_LAYERS,
                 kv_dtype: torch.dtype | None = None, sequence: BandComm | None = None,
                 shards: HeadShards | None = None):
        self.comm = comm
        # With Ulysses inside a STADI group (`sequence`, the group's ranks): the band is the group's, this
        # rank holds every band token for heads / U of the heads, and `comm` joins the ranks of the other
        # groups that hold the same head shard. None, or one rank: the band is this rank's alone.
        self.sequence = sequence
        # Groups of unequal degrees (`runtime/head_shards.py`): `comm` joins every rank of the CFG branch, and
        # each exchange moves to each rank the heads it holds of every other group's band.
        self.shards = shards
        self._routes: dict[tuple[LayerSlot, ...], ShardRoutes] = {}
        self.group_layers = _check_group_layers(group_layers)
        self.kv_dtype = kv_dtype  # None: store K/V in the dtype attention computes in
        # Plans that fit (planner/memory.py): the bytes each band rank may give the store (None: unchecked),
        # where they came from, the flags besides a narrower dtype that would shrink it, and the layers the
        # injection routes here (the store's size is known at the first layer of a registration).
        self.memory_budgets: tuple[float | None, ...] | None = None
        self.budget_source = "--stadi_memory_budget"
        self.budget_remedies: tuple[str, ...] = ()
        self.expected_layers: int | None = None
        self.fit: StoreFit | None = None  # the last registration's choice
        self._fitted_dtype: torch.dtype | None = None  # a narrower dtype the fit chose under kv_dtype None
        self.band: BandView | None = None  # this rank's band of the current layout (set_band)
        # With Ulysses: the tokens of each group rank's part of the band (`BandView.part_counts`), once per layout.
        self.part_counts: tuple[int, ...] = ()
        self.method = "broadcast"
        # A fresh store keeps what synchronous steps gather (the loop says which step seeds).
        self.synchronous = True
        self.publish = True
        # A step cache (FBCache, TeaCache) may skip a suffix of the layers in a displaced step; without one a
        # layer that did not run in a publishing step is a bug, and an error.
        self.layers_may_skip = False
        self._registry = LayerRegistry()
        self._buffer: FlatKVBuffer | None = None
        self._staging: torch.Tensor | None = None  # one layer's full-image K/V, synchronous steps
        self._scratch: torch.Tensor | None = None  # one layer's K/V laid out for attention (CPU)
        self._seed: dict[int, torch.Tensor] = {}  # K/V of a seeding step that ran while registering
        self._valid = False  # the flat buffer holds the K/V of a finished seeding step
        self._pending: dict[int, PendingWorks] = {}  # group -> receive in flight
        self._ready: list[int] = []  # groups complete in this publishing step, not yet sent
        self._ran: list[int] = []  # layers of each group run in this publishing step
        self._next_ready = 0  # groups go out in group order: every rank issues the same exchanges
        self._step_kind: str | None = None  # "synchronous" / "publish" / "displaced" while a step runs
        self._step_collectives = 0
        self._method_device: torch.device | None = None
        self._logged_layouts: set[tuple[tuple[int, ...], str]] = set()
        self.counts = {"synchronous_steps": 0, "synchronous_collectives": 0, "sync_points": 0,
                       "sync_point_collectives": 0, "max_sync_point_collectives": 0,
                       "last_sync_point_collectives": 0, "last_synchronous_step_collectives": 0,
                       "skipped_layer_publishes": 0}

    # --- configuration -------------------------------------------------------------------------
    def configure(self, *, group_layers: int | None = None, kv_dtype: object = _UNSET) -> None:
        """Change the group size or the stale K/V dtype (between runs; buffers follow lazily)."""
        if self._pending or self._ready:
            raise RuntimeError("cannot reconfigure the K/V store while an exchange is in flight")
        changed = False
        if group_layers is not None and _check_group_layers(group_layers) != self.group_layers:
            self.group_layers = group_layers
            changed = True
        if kv_dtype is not _UNSET and kv_dtype != self.kv_dtype:
            self.kv_dtype = kv_dtype
            changed = True
        if changed:
            self._valid = False
            self._buffer = None
            if self._registry.closed:
                self._registry.close(self.group_layers)

    def set_band(self, band: BandView) -> None:
        """`band` is this rank's band of the new layout; the store reads its range and counts from it."""
        if self._pending or self._ready:
            raise RuntimeError("cannot change the band layout while a K/V exchange is in flight")
        member, members = self.member
        if band.rank != member or band.world_size != members:
            raise ValueError(f"band {band.rank} of {band.world_size} is not this store's rank {member} "
                             f"of {members}")
        if sum(band.token_counts) != sum(self.token_counts):
            self._valid = False  # another image size: the stored K/V mean nothing now
        self.band = band
        self.part_counts = band.part_counts(self.sequence.world_size) if self.sequence is not None else ()
        self.method = ("head_shards" if self.shards is not None  # final at the first exchange
                       else choose_method(band.token_counts, in_place_all_gather=False))
        self._method_device = None  # chosen at the first exchange, when the device is known

    @property
    def member(self) -> tuple[int, int]:
        """(this rank's band, bands): its STADI member among the members, whose bands the store holds."""
        if self.shards is not None:
            return self.shards.member_of(self.comm.rank)[0], self.shards.members
        return self.comm.rank, self.comm.world_size

    @property
    def token_counts(self) -> tuple[int, ...]:
        """Tokens of every rank's band (none before the first layout)."""
        return self.band.token_counts if self.band is not None else ()

    @property
    def own_range(self) -> tuple[int, int]:
        """[start, end) of this rank's band among the image's tokens (the band's, read through)."""
        return self.band.token_range if self.band is not None else (0, 0)

    def _choose_method(self, tensor: torch.Tensor) -> str:
        """The layout's exchange method (`exchange.choose_method`), logged once per layout; between unequal
        groups, the all-to-all of head shards."""
        if self.shards is not None:
            self.method = "head_shards"
            return self.method
        if self._method_device != tensor.device:
            self._method_device = tensor.device
            self.method = choose_method(self.token_counts, in_place_all_gather=tensor.is_cuda)
            key = (self.token_counts, self.method)
            if key not in self._logged_layouts and self.comm.world_size > 1:
                self._logged_layouts.add(key)
                sizes = method_bytes(self.token_counts, 1)
                logger.info("STADI K/V exchange for bands of %s tokens: %s (one broadcast per source delivers "
                            "%d token rows to each rank, a padded all-gather %d)", list(self.token_counts),
                            self.method, sizes["broadcast"], sizes["all_gather"])
        return self.method

    def set_phase(self, synchronous: bool, publish: bool = False) -> None:
        """The next step's kind. `synchronous`: gather fresh K/V before every attention.
        `publish`: synchronous, keep this step's K/V for the displaced steps that follow;
        displaced, send this step's K/V to the other ranks."""
        self._end_step()
        self.synchronous = synchronous
        self.publish = publish
        if self.layers_may_skip and not synchronous and publish and self._buffer is not None:
            # Begun now, not at the first layer: a step cache may skip every layer (TeaCache), and the step
            # must still publish at its end, as its peers do.
            self._begin_step()

    # --- the attention processors' entry point -------------------------------------------------
    def full_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V over the full image for this layer, given this rank's fresh band K/V."""
        batch, heads, tokens, head_dim = key.shape
        start, end = self.own_range
        if tokens != end - start or value.shape != key.shape:
            raise ValueError(f"layer {layer}: K/V of shape {tuple(key.shape)}/{tuple(value.shape)} do not match "
                             f"this rank's band of {end - start} tokens")
        if not self._registry.closed and layer in self._registry:
            self._end_step(forward_only=True)  # a layer seen again: the previous forward is over
        if not self._registry.closed and not len(self._registry):  # the first layer of a registration
            width = 2 * batch * heads * head_dim  # K and V of one token of this layer
            self._fit(key.dtype, sum(self.token_counts) * width * (self.expected_layers or 1))
        if self._step_kind is None:
            self._begin_step()
        self._flush()  # groups completed by earlier layers: their attention has run, send them now
        shape = (batch, heads, head_dim)
        if self.synchronous:
            return self._synchronous(layer, shape, key, value)
        return self._displaced(layer, shape, key, value)

    def _synchronous(self, layer: int, shape: tuple[int, int, int], key: torch.Tensor,
                     value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        registry = self._registry
        if registry.closed and registry.shape(layer) != shape:
            self._forget()  # a new layer or a new batch: register from scratch
        if not registry.closed:
            registry.register(layer, shape)
        staging = self._staging_view(key)
        write_band(staging, self.own_range[0], key, value)
        self.comm.wait_works(self._launch(staging.view(staging.shape[0], -1), (LayerSlot(layer, 0, 0, shape),)),
                             key.is_cuda)
        if self.publish:  # these K/V seed the displaced steps that follow
            if registry.closed:
                self._ensure_buffer(key).layer_view(layer).copy_(staging)
            else:
                self._seed[layer] = staging.to(self._storage_dtype(key), copy=True)
        return self._for_attention(staging, key, value)

    def _displaced(self, layer: int, shape: tuple[int, int, int], key: torch.Tensor,
                   value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = self._buffer
        if buffer is None or not self._valid:
            raise RuntimeError("displaced attention needs at least one synchronous (warmup) step first")
        slot = buffer.slots.get(layer)
        if slot is None or slot.shape != shape:
            raise RuntimeError(f"layer {layer}: batch size or shape changed between exchanges; "
                               "K/V buffers no longer match")
        pending = self._pending.pop(slot.group, None)
        if pending is not None:
            self.comm.wait_works(pending, key.is_cuda)
        kv = buffer.layer_view(layer)
        # In place: no exchange of this group is in flight (just waited, or sent after this step).
        write_band(kv, self.own_range[0], key, value)
        if self.publish:
            self._ran[slot.group] += 1
            sizes = buffer.group_sizes
            while self._next_ready < len(sizes) and self._ran[self._next_ready] == sizes[self._next_ready]:
                self._ready.append(self._next_ready)  # sent at the next call, after this layer's attention
                self._next_ready += 1
        return self._for_attention(kv, key, value)

    def _for_attention(self, kv: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a token-major ``(tokens, 2, batch, heads, head_dim)`` view, as attention takes them.

        On CUDA the strided views go straight to attention (its kernels take any token stride). On
        CPU, attention over a token stride of a whole group row measured ~20 % slower than over
        contiguous K/V, more than copying them into a reused ``(2, batch, heads, tokens, head_dim)``
        scratch buffer costs (~5 %), so they are copied there. A narrower stale dtype is widened
        on the way, and this rank's own band is then overwritten with its fresh full-precision K/V.
        """
        if kv.is_cuda and kv.dtype == key.dtype:
            return heads_view(kv, 0), heads_view(kv, 1)
        batch, heads, _, head_dim = key.shape
        tokens = kv.shape[0]
        numel = 2 * batch * heads * tokens * head_dim
        scratch = self._scratch
        if scratch is None or scratch.numel() < numel or scratch.dtype != key.dtype or scratch.device != key.device:
            self._scratch = None
            scratch = self._scratch = torch.empty(numel, dtype=key.dtype, device=key.device)
        out = scratch[:numel].view(2, batch, heads, tokens, head_dim)
        out[0].copy_(heads_view(kv, 0))
        out[1].copy_(heads_view(kv, 1))
        if kv.dtype != key.dtype:
            start, end = self.own_range
            out[0, :, :, start:end] = key
            out[1, :, :, start:end] = value
        return out[0], out[1]

    # --- steps and exchanges -------------------------------------------------------------------
    def _begin_step(self) -> None:
        if self.synchronous:
            self._step_kind = "synchronous"
        elif self.publish:
            self._step_kind = "publish"
            self._ran = [0] * (self._buffer.num_groups if self._buffer is not None else 0)
            self._next_ready = 0
        else:
            self._step_kind = "displaced"
        self._step_collectives = 0

    def _end_step(self, forward_only: bool = False) -> None:
        """Book-keeping once a forward is over: send what is left, close the registration, count."""
        self._flush()
        kind = self._step_kind
        if kind == "publish" and self._buffer is not None and self._ran != self._buffer.group_sizes:
            skipped = self.layers_may_skip and all(ran <= size for ran, size in zip(self._ran, self._buffer.group_sizes))
            if not skipped:
                raise RuntimeError(f"a publishing step ran {self._ran} layers per group, the registry has "
                                   f"{self._buffer.group_sizes}: every displaced layer must run once per step")
            self._publish_skipped_groups()
        if not self._registry.closed and len(self._registry):
            self._close_registration()
        if kind == "synchronous":
            self.counts["synchronous_steps"] += 1
            self.counts["synchronous_collectives"] += self._step_collectives
            self.counts["last_synchronous_step_collectives"] = self._step_collectives
            if self.publish and self._buffer is not None:
                self._valid = True
        elif kind == "publish":
            self.counts["sync_points"] += 1
            self.counts["sync_point_collectives"] += self._step_collectives
            self.counts["last_sync_point_collectives"] = self._step_collectives
            self.counts["max_sync_point_collectives"] = max(self.counts["max_sync_point_collectives"],
                                                            self._step_collectives)
        self._step_kind = None
        self._step_collectives = 0
        if forward_only:
            self._begin_step()

    def _flush(self) -> None:
        for group in self._ready:
            self._pending[group] = self._launch_group(group)
        self._ready.clear()

    def _publish_skipped_groups(self) -> None:
        """The groups of a publishing step that a step cache cut short go out too, in group order, after their
        previous exchange has landed: they hold this rank's K/V of the last step that computed them (what its
        peers should attend over), and every rank then issues the same exchanges in the same order."""
        buffer = self._buffer
        for group in range(self._next_ready, buffer.num_groups):
            pending = self._pending.pop(group, None)
            if pending is not None:
                self.comm.wait_works(pending, buffer.flat.is_cuda)
            self._pending[group] = self._launch_group(group)
            self.counts["skipped_layer_publishes"] += buffer.group_sizes[group] - self._ran[group]
        self._next_ready = buffer.num_groups

    def _launch_group(self, group: int) -> PendingWorks:
        buffer = self._buffer
        slots = tuple(slot for slot in buffer.slots.values() if slot.group == group)
        return self._launch(buffer.blocks[group], slots)

    def _launch(self, block: torch.Tensor, slots: tuple[LayerSlot, ...]) -> PendingWorks:
        """One exchange of a token-major (tokens, width) block of the layers `slots`: this rank's rows out, the
        rest in."""
        comm = self.comm
        start, end = self.own_range
        method = self._choose_method(block)
        if method == "head_shards":
            self._step_collectives += 1
            return self._routes_of(slots).launch(comm, block, self.band.layout.token_range, comm.wait_slice)
        if method == "all_gather":
            works = comm.all_gather_into_async(block, block[start:end])
        else:
            works, offset = [], 0
            for source, count in enumerate(self.token_counts):
                works += comm.broadcast_async(block[offset:offset + count], source)
                offset += count
        self._step_collectives += len(works)
        return PendingWorks(works, comm.wait_slice)

    def _routes_of(self, slots: tuple[LayerSlot, ...]) -> ShardRoutes:
        """The head-shard routes of a block of these layers, worked out once (layers keep their shapes)."""
        if slots not in self._routes:
            self._routes[slots] = ShardRoutes(self.shards, self.comm.rank, slots)
        return self._routes[slots]

    def _fit(self, computed: torch.dtype, values: int, keep: str | None = None) -> None:
        """The dtype a store of `values` K/V values (computed in `computed`) fits in on every band rank
        (`planner.memory`), decided before the store holds anything: at the first layer of a registration,
        from that layer's width times the layers the injection routes here. `keep`: check that dtype only."""
        if self.memory_budgets is None:
            self._fitted_dtype = self.fit = None
            return
        if self.shards is not None:
            # Unequal groups: the largest store of the branch (the smallest group's heads) against every budget,
            # so that every rank picks the same dtype: the exchange moves rows of one dtype.
            own = self.shards.group_sizes[self.member[0]]
            values = values * own // min(self.shards.group_sizes)
        named = None if self.kv_dtype is None else str(self.kv_dtype).removeprefix("torch.")
        fit = fit_kv_store(values, str(computed).removeprefix("torch."), self.memory_budgets,
                           requested=keep or named, source=self.budget_source, remedies=self.budget_remedies)
        if keep is None:
            self.fit = fit
            self._fitted_dtype = getattr(torch, fit.kv_dtype) if fit.narrowed else None
            if fit.narrowed:
                logger.info("STADI K/V store in %s to fit the memory budget (%s): %s", fit.kv_dtype,
                            self.budget_source, fit.reason)

    def _close_registration(self) -> None:
        self._registry.close(self.group_layers)
        if self.fit is not None:  # the first layer's width times the layers was an estimate: check the sum
            values = sum(self.token_counts) * sum(self._registry.group_widths)
            self._fit(getattr(torch, self.fit.kv_dtype), values, keep=self.fit.kv_dtype)
        if self._seed:
            first = next(iter(self._seed.values()))
            self._buffer = None
            buffer = FlatKVBuffer(self._registry, first.shape[0], first.dtype, first.device)
            for layer in list(self._seed):
                buffer.layer_view(layer).copy_(self._seed.pop(layer))
            self._buffer = buffer

    def _storage_dtype(self, key: torch.Tensor) -> torch.dtype:
        return self.kv_dtype or self._fitted_dtype or key.dtype

    def _ensure_buffer(self, key: torch.Tensor) -> FlatKVBuffer:
        tokens, dtype = sum(self.token_counts), self._storage_dtype(key)
        if self._buffer is None or not self._buffer.fits(self._registry, tokens, dtype, key.device):
            self._buffer = None  # release before allocating the new one
            self._buffer = FlatKVBuffer(self._registry, tokens, dtype, key.device)
        return self._buffer

    def _staging_view(self, key: torch.Tensor) -> torch.Tensor:
        batch, heads, _, head_dim = key.shape
        tokens = sum(self.token_counts)
        numel = tokens * 2 * batch * heads * head_dim
        staging = self._staging
        if staging is None or staging.numel() < numel or staging.dtype != key.dtype or staging.device != key.device:
            self._staging = None
            staging = self._staging = torch.empty(numel, dtype=key.dtype, device=key.device)
        return staging[:numel].view(tokens, 2, batch, heads, head_dim)

    def _forget(self) -> None:
        self._registry.clear()
        self._buffer = None
        self._seed.clear()
        self._valid = False

    # --- lifecycle -----------------------------------------------------------------------------
    def drain(self) -> None:
        """Finish every exchange in flight (end of run, or before a layout change)."""
        self._end_step()
        for group in list(self._pending):
            self.comm.wait_works(self._pending.pop(group), self._buffer.flat.is_cuda)

    def reset(self) -> None:
        """End of a run: nothing in flight, contents forgotten; buffers stay for the next run."""
        self.drain()
        self._valid = False
        self.synchronous, self.publish = True, True

    def release(self) -> None:
        """Free every buffer (the next run registers and allocates again)."""
        self.reset()
        self._forget()
        self._staging = self._scratch = None

    # --- accounting ----------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes this store holds: the flat buffer, the staging and attention buffers (one layer
        each) and any seed in transit."""
        tensors = [self._staging, self._scratch, *self._seed.values()]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total + (self._buffer.nbytes if self._buffer is not None else 0)

    def stale_bytes_ratio(self) -> float:
        """Bytes per token of the displaced exchange over those of a synchronous gather (kv_dtype)."""
        if self._buffer is None or self._staging is None:
            return 1.0
        return self._buffer.dtype.itemsize / self._staging.dtype.itemsize

    def stats(self) -> dict:
        """What the exchange did and costs on this rank (JSON-ready)."""
        buffer, counts = self._buffer, self.token_counts
        per_token = buffer.bytes_per_token() if buffer is not None else 0
        band = self.member[0]
        own = counts[band] if counts else 0
        sent = own * per_token
        if self.shards is not None and buffer is not None and counts:
            sent, received = self._shard_bytes(buffer)
        elif self.method == "all_gather" and counts:
            received = (len(counts) - 1) * max(counts) * per_token
        else:
            received = (sum(counts) - own) * per_token
        extra = {"skipped_layer_publishes": self.counts["skipped_layer_publishes"]} if self.layers_may_skip else {}
        if self.fit is not None:  # plans that fit: the dtype the budget allowed, and why
            extra["memory_fit"] = f"{self.fit.kv_dtype}{' (narrowed)' if self.fit.narrowed else ''}: {self.fit.reason}"
        return {
            "method": self.method,
            "token_counts": list(counts),
            "layers": len(self._registry),
            "group_layers": self.group_layers,
            "groups": buffer.num_groups if buffer is not None else None,
            "kv_dtype": str(buffer.dtype).removeprefix("torch.") if buffer is not None else None,
            "collectives_per_sync_point": self.counts["max_sync_point_collectives"],
            "sync_points": self.counts["sync_points"],
            "collectives_per_synchronous_step": self.counts["last_synchronous_step_collectives"],
            "synchronous_steps": self.counts["synchronous_steps"],
            "bytes_sent_per_sync_point": sent,
            "bytes_received_per_sync_point": received,
            "store_bytes": self.memory_bytes(),
            "buffer_bytes": buffer.nbytes if buffer is not None else 0,
            **extra,  # a step cache's layers published with the K/V they last computed; the memory fit
        }


    def _shard_bytes(self, buffer: FlatKVBuffer) -> tuple[int, int]:
        """Bytes this rank sends and receives per sync point between unequal groups: its band to every rank of
        another group for the heads they share, and every other group's band for its own heads."""
        shards, rank, size = self.shards, self.comm.rank, buffer.flat.element_size()
        rows = [self.token_counts[shards.member_of(peer)[0]] for peer in range(shards.world_size)]
        sent = received = 0
        for group in range(buffer.num_groups):
            routes = self._routes_of(tuple(slot for slot in buffer.slots.values() if slot.group == group))
            sent += rows[rank] * sum(len(columns) for columns in routes.send) * size
            received += sum(count * len(columns) for count, columns in zip(rows, routes.receive)) * size
        return sent, received


def _check_group_layers(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"group_layers must be an integer >= 1, got {value!r}")
    return value
