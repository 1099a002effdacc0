"""Measuring each rank's speed during warmup and emulating slow ranks (the cache: profile_cache)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from stadi_xdit.runtime.profile_cache import ProfileCache  # noqa: F401  (moved; re-exported until callers switch)


@dataclass
class StepRecord:
    """One model evaluation of one rank, in seconds since the run started."""

    phase: str  # "warmup" or "stadi"
    base_step: int  # scheduler index for warmup, base step k after it
    start: float
    end: float
    wait: float  # blocked in collectives inside the forward
    emulated: float  # sleep added by --stadi_emulate_slowdown

    @property
    def compute(self) -> float:
        """Time the device was busy: the forward minus its communication waits."""
        return self.end - self.start - self.wait


@dataclass
class RankTimeline:
    """Everything a rank did, for busy/idle accounting and Gantt plots."""

    origin: float = field(default_factory=time.perf_counter)
    steps: list[StepRecord] = field(default_factory=list)
    # (label, start, end) for communication outside forwards: transition and final gather.
    phases: list[tuple[str, float, float]] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def busy_seconds(self) -> float:
        return sum(record.compute for record in self.steps)


def measured_step_seconds(records: Sequence[StepRecord]) -> float:
    """Median compute time of warmup forwards; the first carries one-time costs and is skipped."""
    warmup = [r.compute for r in records if r.phase == "warmup"]
    if not warmup:
        raise ValueError("no warmup step was timed; speeds need --warmup_steps >= 1 or --stadi_speeds")
    usable = warmup[1:] if len(warmup) > 1 else warmup
    return statistics.median(usable)


def work_clock(device: torch.device) -> Callable[[], float]:
    """A clock of this rank's own device work, for the slowdown emulation.

    On CPU it is the compute thread's CPU time: ranks run single-threaded, a blocked collective
    burns none of it, and gloo's transfer threads and other tenants are not counted (emulating
    them again would slow the rank twice). On CUDA it is wall time after a device synchronize.
    """
    if device.type == "cuda":
        def cuda_clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return cuda_clock
    return time.thread_time


def emulate_slowdown(factor: float, compute_seconds: float) -> float:
    """Duty-cycle a rank: after a forward of `c` seconds, sleep `(factor - 1) * c`. Returns the sleep."""
    extra = max(0.0, (factor - 1.0) * compute_seconds)
    if extra > 0:
        time.sleep(extra)
    return extra
