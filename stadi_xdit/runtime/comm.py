"""Collectives over one STADI process group (gloo on CPU, NCCL on CUDA), every wait bounded.

Two kinds of collectives:

- *gathers that return a new tensor* (`all_gather`, `all_gather_async` + `wait`): the transition,
  the final gather, profile numbers. Bands differ in size, and neither gloo's all_gather nor NCCL's
  all_gather_into_tensor accept uneven inputs, so these run one broadcast per source rank;
- *in-place exchanges over preallocated buffers* (`broadcast_async`, `all_gather_into_async`,
  waited with `wait_works`): the displaced K/V store's batched exchange (`runtime/exchange.py`).

Wait accounting. `wait_seconds` is the time this rank was blocked in collectives; the profiler
subtracts it from a forward's time. On CPU a gloo wait blocks the host, so a host timer measures
it (`wait_seconds`). On CUDA an NCCL wait only makes the current stream wait, so no host timer can
see it: each wait is bracketed by two CUDA events on the current stream, which the loop's forward
timer takes (`take_device_waits`) and reads when it settles (`runtime/profile.py`), so no collective
synchronizes the device itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from stadi_xdit.runtime.faults import PeerWatch, WaitTimedOut

# torch >= 2.6 names it all_gather_single; older torch (as on many GPU images) only has the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def synchronize(tensor: torch.Tensor) -> None:
    """Finish queued device work (CUDA); CPU tensors need nothing. Only for profiling timestamps."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _bounded_wait(works: Sequence[dist.Work], timeout: timedelta | None) -> None:
    for work in works:
        # A bounded wait: a stalled or dead peer turns into an error here, not a hang.
        if timeout is None:
            work.wait()
            continue
        try:
            work.wait(timeout)
        except RuntimeError as error:
            if not work.is_completed():  # still in flight (not failed by the backend): may be waited on again
                raise WaitTimedOut(str(error)) from error
            raise


@dataclass
class PendingGather:
    """A variable-size gather in flight; `wait()` returns every rank's part, concatenated."""

    works: list[dist.Work]
    parts: list[torch.Tensor]
    dim: int
    timeout: timedelta | None = None
    waited_seconds: float = 0.0

    def wait(self) -> torch.Tensor:
        """Host-side wait. On NCCL it only orders the streams, so its seconds stay near zero."""
        start = time.perf_counter()
        try:
            _bounded_wait(self.works, self.timeout)
        finally:  # waited again after a timeout while a peer works (PeerWatch.guard): every slice counts
            self.waited_seconds += time.perf_counter() - start
        return torch.cat(self.parts, dim=self.dim)


@dataclass
class PendingWorks:
    """In-place collectives in flight over preallocated buffers (nothing to return)."""

    works: list[dist.Work]
    timeout: timedelta | None = None

    def wait(self) -> None:
        _bounded_wait(self.works, self.timeout)

    def __len__(self) -> int:
        return len(self.works)


@dataclass
class BandComm:
    """Collectives of one STADI group; `rank` and `world_size` are positions inside the group."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    timeout: timedelta | None = None
    # Names the peer behind a failed wait; None (single process, unit tests): backend errors as they are.
    watch: PeerWatch | None = None
    # Collectives this rank has launched (each broadcast or all-gather counts one).
    collectives: int = 0
    # On CUDA, bracket each wait with events for the forward timer (`take_device_waits`). Only the group whose
    # waits the timer takes out of a forward's cost does; elsewhere the events would pile up unread.
    times_device_waits: bool = True
    _host_wait: float = field(default=0.0, repr=False)
    _cuda_waits: list = field(default_factory=list, repr=False)

    @property
    def wait_slice(self) -> timedelta | None:
        """How long one wait on a work blocks before `PeerWatch.guard` decides whether to wait on: the
        timeout, or a quarter of it where a timed-out wait is waited on again while a peer works (gloo),
        so this rank, waiting, still reports progress to the launcher well within the timeout."""
        if self.timeout is not None and self.watch is not None and self.watch.rewaits:
            return timedelta(seconds=self.watch.slice_seconds)
        return self.timeout

    @property
    def wait_seconds(self) -> float:
        """Seconds the host spent blocked in collectives (on CUDA the stream's waits: `take_device_waits`)."""
        return self._host_wait

    def take_device_waits(self) -> list:
        """The (start, end) CUDA event pairs bracketing the stream's waits since the last call; unread."""
        waits, self._cuda_waits = self._cuda_waits, []
        return waits

    def enter(self, phase: str, step: int = 0) -> None:
        """Post this rank's progress, so a survivor of a fault can say where each peer was."""
        if self.watch is not None:
            self.watch.enter(phase, step)

    def _guarded(self, wait: Callable[[], object]) -> object:
        return wait() if self.watch is None else self.watch.guard(wait)

    def _timed(self, cuda: bool, wait: Callable[[], object]) -> object:
        """Run a bounded wait and add the time it blocks this rank to `wait_seconds`."""
        if cuda and self.times_device_waits:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = self._guarded(wait)
            end.record()  # completes only once the stream has waited for the collective
            self._cuda_waits.append((start, end))
            return result
        start = time.perf_counter()
        result = self._guarded(wait)
        self._host_wait += time.perf_counter() - start
        return result

    # --- in-place collectives over preallocated buffers (the K/V exchange) --------------------
    def broadcast_async(self, tensor: torch.Tensor, source: int) -> list[dist.Work]:
        """`tensor` (contiguous) of group rank `source` into `tensor` on every rank; [] alone."""
        if self.world_size == 1:
            return []
        self.collectives += 1
        return [dist.broadcast(tensor, group=self.group, group_src=source, async_op=True)]

    def all_gather_into_async(self, output: torch.Tensor, part: torch.Tensor) -> list[dist.Work]:
        """Equal parts of every rank into `output` (rank order along dim 0); `part` may be this
        rank's slice of `output` (in place, as NCCL and gloo both allow)."""
        if self.world_size == 1:
            return []
        self.collectives += 1
        return [_all_gather_single(output, part, group=self.group, async_op=True)]

    def wait_works(self, pending: PendingWorks, cuda: bool) -> None:
        """Bounded wait for in-place collectives; a failed peer is named (`PeerWatch`)."""
        if pending.works:
            self._timed(cuda, pending.wait)

    # --- Ulysses inside a sequence-parallel group -------------------------------------------
    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int,
                   scatter_sizes: Sequence[int] | None = None, gather_sizes: Sequence[int] | None = None) -> torch.Tensor:
        """`tensor` cut into `world_size` parts along `scatter_dim` (equal, or of `scatter_sizes`), part j sent to
        group rank j; returns the parts every rank sent this one, joined along `gather_dim` in rank order, where
        rank j's part is `gather_sizes[j]` long (default: all as long as this rank's). Ulysses' exchange of heads
        for tokens, whose token counts may differ by rank. Bounded, but not counted as waiting: inside a group it
        is part of the group's forward, whose time is the group's cost."""
        if self.world_size == 1:
            return tensor
        if scatter_sizes is None:
            if tensor.shape[scatter_dim] % self.world_size:
                raise ValueError(f"all_to_all: {tensor.shape[scatter_dim]} entries along dim {scatter_dim} do not "
                                 f"split into {self.world_size} equal parts")
            scatter_sizes = [tensor.shape[scatter_dim] // self.world_size] * self.world_size
        gather_sizes = list(gather_sizes) if gather_sizes is not None else [tensor.shape[gather_dim]] * self.world_size
        parts = tensor.split(list(scatter_sizes), dim=scatter_dim)
        send = torch.cat([part.reshape(-1) for part in parts])
        shapes = []
        for source in range(self.world_size):
            shape = list(tensor.shape)
            shape[scatter_dim], shape[gather_dim] = scatter_sizes[self.rank], gather_sizes[source]
            shapes.append(shape)
        counts = [math.prod(shape) for shape in shapes]
        received = send.new_empty(sum(counts))
        self.collectives += 1
        work = dist.all_to_all_single(received, send, output_split_sizes=counts,
                                      input_split_sizes=[part.numel() for part in parts], group=self.group,
                                      async_op=True)
        self._guarded(PendingWorks([work], self.wait_slice).wait)
        return torch.cat([piece.view(shape) for piece, shape in zip(received.split(counts), shapes)], dim=gather_dim)

    def gather_parts(self, part: torch.Tensor, dim: int) -> torch.Tensor:
        """Every group rank's equal `part`, joined along `dim` in rank order (a replicated stream's heads
        after Ulysses' attention). Like `all_to_all`, part of the group's forward: not counted as waiting."""
        if self.world_size == 1:
            return part
        pending = self.all_gather_async(part, [part.shape[dim]] * self.world_size, dim)
        return self._guarded(pending.wait)

    # --- gathers that return a new tensor ----------------------------------------------------
    def all_gather_async(self, part: torch.Tensor, sizes: Sequence[int], dim: int) -> PendingGather:
        """Start gathering `part` (this rank's `sizes[rank]` slices along `dim`) from every rank.

        One broadcast per source rank, each of that rank's exact size: an all-gather would need
        every band padded to the largest, which costs up to N times the bytes on uneven bands.
        """
        if part.shape[dim] != sizes[self.rank]:
            raise ValueError(f"part has {part.shape[dim]} entries along dim {dim}, layout says {sizes[self.rank]}")
        part = part.contiguous()
        parts, works = [], []
        for source, size in enumerate(sizes):
            if source == self.rank:
                buffer = part
            else:
                shape = list(part.shape)
                shape[dim] = size
                buffer = part.new_empty(shape)
            works += self.broadcast_async(buffer, source)
            parts.append(buffer)
        return PendingGather(works, parts, dim, self.wait_slice)

    def all_gather(self, part: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        """Blocking gather; its blocked time counts as waiting (see the module docstring)."""
        pending = self.all_gather_async(part, sizes, dim)
        return self._timed(part.is_cuda, pending.wait)

    def wait(self, pending: PendingGather) -> torch.Tensor:
        gathered = self._guarded(pending.wait)
        self._host_wait += pending.waited_seconds
        return gathered

    def all_gather_floats(self, value: float, device: torch.device) -> list[float]:
        """One float per rank, e.g. the measured step time; every rank gets the same list."""
        return [values[0] for values in self.all_gather_float_lists([value], device)]

    def all_gather_float_lists(self, values: Sequence[float], device: torch.device) -> list[list[float]]:
        """A fixed-length list of floats per rank (same length everywhere), in one collective."""
        if self.world_size == 1:
            return [[float(v) for v in values]]
        mine = torch.tensor([list(values)], dtype=torch.float64, device=device)
        gathered = self.all_gather(mine, [1] * self.world_size, dim=0)
        return [[float(v) for v in row] for row in gathered.tolist()]

    def all_gather_text(self, text: str, device: torch.device) -> list[str]:
        """One string per rank, through the same bounded waits as every STADI collective.

        Object collectives (`all_gather_object`) run on xDiT's CPU group with torch's default
        30-minute timeout, so a stalled peer would ignore `--stadi_timeout` there.
        """
        if self.world_size == 1:
            return [text]
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
        sizes = [int(n) for n in self.all_gather_floats(float(data.numel()), device)]
        gathered = self.all_gather(data.to(device), sizes, dim=0).cpu()
        out, offset = [], 0
        for size in sizes:
            out.append(bytes(gathered[offset:offset + size].tolist()).decode())
            offset += size
        return out
