"""Timing each forward of a rank, and emulating slow ranks (the cost models: planner/evidence.py).

The loop times a forward with a `ForwardTimer` (`forward_timer`): `begin()` before it, `end(...)` after,
`settle()` when a phase needs the figures (calibration, profile, a sync point, the end of the call).
On CPU the host clocks are read at once. On CUDA each forward is bracketed by two events on the compute
stream, and the exchange's waits by the group's own events (`BandComm.take_device_waits`); they are read
at `settle()`, which waits for the last event only. So the host never stops the device between forwards:
the K/V exchange in flight overlaps the next forward, and nothing rules out CUDA graphs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

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
    cached: bool = False  # a step cache served the transformer's blocks: not a sample of the band's cost

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
    """A clock of this rank's own device work, for the bench's baseline arms (the loop: `forward_timer`).

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


class WaitAccount(Protocol):
    """What a timer reads from the group's collectives (`runtime/comm.py`'s `BandComm`)."""

    @property
    def wait_seconds(self) -> float:
        """Seconds the host has been blocked in collectives, in all."""

    def take_device_waits(self) -> list:
        """(start, end) event pairs of the device waits recorded since the last call."""


class HostForwardTimer:
    """CPU: host clocks, read when the forward ends. The work clock is the compute thread's CPU time."""

    def __init__(self, timeline: RankTimeline, comm: WaitAccount, record_work: bool):
        self.timeline, self.comm, self.record_work = timeline, comm, record_work
        self._start: tuple[float, float, float] | None = None

    def begin(self) -> None:
        self._start = (self.timeline.now(), time.thread_time(), self.comm.wait_seconds)

    def end(self, phase: str, base_step: int, rows: int, slowdown: float, cached: bool = False) -> None:
        start, work_start, waited_before = self._start
        work = time.thread_time() - work_start  # a blocked collective burns no CPU time: no wait to subtract
        wait = self.comm.wait_seconds - waited_before
        emulated = emulate_slowdown(slowdown, work) if slowdown != 1.0 else 0.0
        self.timeline.steps.append(StepRecord(phase, base_step, start, self.timeline.now(), wait, emulated, rows,
                                              work=work if self.record_work else None, cached=cached))

    @property
    def count(self) -> int:
        """Forwards timed so far."""
        return len(self.timeline.steps)

    def settle(self) -> list[StepRecord]:
        """Every forward's record (read as each forward ended)."""
        return self.timeline.steps


@dataclass
class _TimedForward:
    phase: str
    base_step: int
    rows: int
    start: object  # device events
    end: object
    waits: list  # (start, end) event pairs of the collectives it waited on
    host_wait: float
    cached: bool


class EventForwardTimer:
    """CUDA: events on the compute stream, read at `settle()` (see the module docstring).

    A forward's cost is the device time between its two events less the device time its stream spent
    waiting for collectives; timestamps are seconds since the timeline's origin, on the device's clock.
    """

    def __init__(self, timeline: RankTimeline, comm: WaitAccount, record_work: bool,
                 new_event: Callable[[], object]):
        self.timeline, self.comm, self.record_work, self.new_event = timeline, comm, record_work, new_event
        self.origin = self._recorded()
        self.origin_seconds = timeline.now()
        self.pending: list[_TimedForward] = []
        self._start: tuple[object, float] | None = None

    def _recorded(self):
        event = self.new_event()
        event.record()
        return event

    def _seconds(self, event) -> float:
        return self.origin_seconds + self.origin.elapsed_time(event) / 1000.0

    def begin(self) -> None:
        self.comm.take_device_waits()  # waits between forwards (a transition's gathers) belong to no forward
        self._start = (self._recorded(), self.comm.wait_seconds)

    def end(self, phase: str, base_step: int, rows: int, slowdown: float, cached: bool = False) -> None:
        start, host_before = self._start
        self.pending.append(_TimedForward(phase, base_step, rows, start, self._recorded(),
                                          self.comm.take_device_waits(), self.comm.wait_seconds - host_before, cached))
        if slowdown != 1.0:  # the emulated sleep is sized by this forward's cost: read it now
            record = self.settle()[-1]
            record.emulated = emulate_slowdown(slowdown, record.end - record.start - record.wait)
            record.end += record.emulated  # the device idles while the host sleeps: the forward's slot

    @property
    def count(self) -> int:
        """Forwards timed so far, read or not."""
        return len(self.timeline.steps) + len(self.pending)

    def settle(self) -> list[StepRecord]:
        """Wait for the last timed forward's end event (not the whole device), then read every pending one."""
        if self.pending:
            self.pending[-1].end.synchronize()
            for forward in self.pending:
                device_wait = sum(begin.elapsed_time(finish) for begin, finish in forward.waits) / 1000.0
                wait = device_wait + forward.host_wait
                start, end = self._seconds(forward.start), self._seconds(forward.end)
                work = end - start - wait
                self.timeline.steps.append(StepRecord(forward.phase, forward.base_step, start, end, wait, 0.0,
                                                      forward.rows, work=work if self.record_work else None,
                                                      cached=forward.cached))
            self.pending.clear()
        return self.timeline.steps


ForwardTimer = HostForwardTimer | EventForwardTimer


def forward_timer(device: torch.device, timeline: RankTimeline, comm: WaitAccount,
                  record_work: bool) -> ForwardTimer:
    """The timer for `device`'s forwards; `record_work`: fill `StepRecord.work` (`--stadi_timing work`)."""
    if device.type == "cuda":
        return EventForwardTimer(timeline, comm, record_work, lambda: torch.cuda.Event(enable_timing=True))
    return HostForwardTimer(timeline, comm, record_work)
