"""Variable-size collectives over one STADI process group (gloo on CPU, NCCL on CUDA).

Bands differ in size, and neither gloo's all_gather nor NCCL's all_gather_into_tensor accept
uneven inputs, so every gather pads to the largest band and trims afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from stadi_xdit.runtime.faults import PeerWatch


def synchronize(tensor: torch.Tensor) -> None:
    """Finish queued device work. NCCL waits are stream-ordered, so on CUDA a host-side timer only
    measures a wait once the device has caught up; gloo waits block the host and need nothing."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


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
        for work in self.works:
            # A bounded wait: a stalled or dead peer turns into an error here, not a hang.
            work.wait(self.timeout) if self.timeout is not None else work.wait()
        self.waited_seconds = time.perf_counter() - start
        return torch.cat(self.parts, dim=self.dim)


@dataclass
class BandComm:
    """Collectives of one STADI group; `rank` and `world_size` are positions inside the group."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    timeout: timedelta | None = None
    # Seconds this rank spent blocked in collectives; the profiler subtracts it from compute time.
    wait_seconds: float = field(default=0.0)
    # Names the peer behind a failed wait; None (single process, unit tests): backend errors as they are.
    watch: PeerWatch | None = None

    def enter(self, phase: str, step: int = 0) -> None:
        """Post this rank's progress, so a survivor of a fault can say where each peer was."""
        if self.watch is not None:
            self.watch.enter(phase, step)

    def _finish(self, pending: PendingGather) -> torch.Tensor:
        return pending.wait() if self.watch is None else self.watch.guard(pending.wait)

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
            if self.world_size > 1:
                works.append(dist.broadcast(buffer, group=self.group, group_src=source, async_op=True))
            parts.append(buffer)
        return PendingGather(works, parts, dim, self.timeout)

    def all_gather(self, part: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        """Blocking gather whose whole duration counts as waiting, on CUDA too: profiling
        subtracts it from compute, so the device is synchronised on both sides of it."""
        synchronize(part)
        start = time.perf_counter()
        gathered = self._finish(self.all_gather_async(part, sizes, dim))
        synchronize(gathered)
        self.wait_seconds += time.perf_counter() - start
        return gathered

    def wait(self, pending: PendingGather) -> torch.Tensor:
        gathered = self._finish(pending)
        self.wait_seconds += pending.waited_seconds
        return gathered

    def all_gather_floats(self, value: float, device: torch.device) -> list[float]:
        """One float per rank, e.g. the measured step time; every rank gets the same list."""
        if self.world_size == 1:
            return [float(value)]
        mine = torch.tensor([value], dtype=torch.float64, device=device)
        gathered = self.all_gather(mine, [1] * self.world_size, dim=0)
        return [float(v) for v in gathered.tolist()]

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
