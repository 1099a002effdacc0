"""Timing each forward of a rank, and emulating slow ranks (the cost models: planner/evidence.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """One model evaluation of one rank, in seconds since the run started."""

    phase: str  # "warmup" or "stadi"
    base_step: int  # scheduler index for warmup, base step k after it
    start: float
    end: float
    wait: float  # blocked in collectives inside the forward
    emulated: float  # sleep added by --stadi_emulate_slowdown
    rows: int | None = None  # token rows of the band this forward computed
    work: float | None = None  # --stadi_timing work: the rank's own work clock over the forward

    @property
    def compute(self) -> float:
        """The forward's cost: the rank's work clock plus the emulated sleep (--stadi_timing work), or
        the time it took minus its communication waits (wall)."""
        if self.work is not None:
            return self.work + self.emulated
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


def work_clock(device: torch.device) -> Callable[[], float]:
    """A clock of this rank's own device work, for the slowdown emulation and `--stadi_timing work`.

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
