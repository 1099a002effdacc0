"""The loop's forward timers (runtime/profile.py): CUDA's event timer, driven here by stand-in events on a
clock the test sets, reads nothing and waits for nothing until a phase asks for the figures."""

from __future__ import annotations

import time

import pytest
import torch

from stadi_xdit.runtime.profile import EventForwardTimer, HostForwardTimer, RankTimeline

STEPS = 10


class DeviceClock:
    """A device timeline the test moves by hand, and the events recorded on it."""

    def __init__(self):
        self.now = 0.0
        self.synchronized: list[float] = []  # the time of each event the host waited for

    def event(self):
        return StandInEvent(self)


class StandInEvent:
    """torch.cuda.Event's surface that the timers use: record, elapsed_time (ms), synchronize."""

    def __init__(self, clock: DeviceClock):
        self.clock, self.time = clock, None

    def record(self) -> None:
        self.time = self.clock.now

    def elapsed_time(self, other: StandInEvent) -> float:
        if self.time is None or other.time is None:
            raise RuntimeError("an event that was never recorded")
        return (other.time - self.time) * 1000.0

    def synchronize(self) -> None:
        self.clock.synchronized.append(self.time)


class StandInComm:
    """A group's wait account: host seconds, and device waits as event pairs."""

    def __init__(self, clock: DeviceClock):
        self.clock, self.wait_seconds, self.device_waits = clock, 0.0, []

    def device_wait(self, start: float, end: float) -> None:
        begin, finish = self.clock.event(), self.clock.event()
        self.clock.now = start
        begin.record()
        self.clock.now = end
        finish.record()
        self.device_waits.append((begin, finish))

    def take_device_waits(self) -> list:
        waits, self.device_waits = self.device_waits, []
        return waits


def event_timer(record_work: bool = True):
    clock = DeviceClock()
    comm = StandInComm(clock)
    timer = EventForwardTimer(RankTimeline(), comm, record_work, clock.event)
    return timer, clock, comm


def test_event_timer_reads_nothing_until_settled_then_waits_for_the_last_event_only():
    timer, clock, comm = event_timer()
    comm.device_wait(0.2, 0.4)  # before the first forward (a transition's gather): no forward's wait
    for phase, step, start, wait, end in [("warmup", 0, 1.0, (1.1, 1.3), 1.5), ("stadi", 0, 2.0, None, 2.25)]:
        clock.now = start
        timer.begin()
        if wait:
            comm.device_wait(*wait)
        clock.now = end
        timer.end(phase, step, rows=8, slowdown=1.0)
    assert clock.synchronized == [] and timer.timeline.steps == [] and timer.count == 2
    records = timer.settle()
    assert clock.synchronized == [2.25]  # one wait, for the end of the last forward
    assert [(r.phase, r.base_step, r.rows) for r in records] == [("warmup", 0, 8), ("stadi", 0, 8)]
    first, second = records
    assert first.start == pytest.approx(timer.origin_seconds + 1.0) and first.end - first.start == pytest.approx(0.5)
    assert first.wait == pytest.approx(0.2) and first.work == pytest.approx(0.3)
    assert first.compute == pytest.approx(0.3)
    assert second.wait == pytest.approx(0.0) and second.compute == pytest.approx(0.25)
    assert timer.settle() is records and clock.synchronized == [2.25]  # nothing left to read: no wait
    assert timer.count == 2


def test_event_timer_without_work_timing_leaves_work_empty():
    timer, clock, _ = event_timer(record_work=False)
    timer.begin()
    clock.now = 0.5
    timer.end("warmup", 0, rows=4, slowdown=1.0)
    (record,) = timer.settle()
    assert record.work is None and record.compute == pytest.approx(0.5)


def test_an_emulated_slowdown_reads_its_forward_at_once_and_sleeps_for_it(monkeypatch):
    slept = []
    monkeypatch.setattr("stadi_xdit.runtime.profile.time.sleep", slept.append)
    timer, clock, comm = event_timer()
    timer.begin()
    comm.device_wait(0.1, 0.15)
    clock.now = 0.25
    timer.end("warmup", 0, rows=4, slowdown=3.0)
    assert clock.synchronized == [0.25]  # the sleep is sized by this forward's cost, so it is read now
    (record,) = timer.timeline.steps
    assert slept == [pytest.approx(0.4)] and record.emulated == pytest.approx(0.4)
    assert record.compute == pytest.approx(0.2 + 0.4) and record.end - record.start == pytest.approx(0.25 + 0.4)


def test_host_timer_reads_at_once_and_counts_only_the_forwards_waits():
    class HostComm:
        wait_seconds = 1.0

    comm = HostComm()
    timer = HostForwardTimer(RankTimeline(), comm, record_work=True)
    timer.begin()
    comm.wait_seconds = 1.25
    timer.end("stadi", 3, rows=2, slowdown=1.0)
    (record,) = timer.timeline.steps  # no settle needed
    assert (record.phase, record.base_step, record.rows, record.emulated) == ("stadi", 3, 2, 0.0)
    assert record.wait == pytest.approx(0.25) and record.work is not None and record.work >= 0
    assert timer.settle() == [record] and timer.count == 1


class HostClockEvent:
    """A stand-in CUDA event on the host's clock, so that the loop runs the event timer on CPU."""

    synchronized = 0

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, other: HostClockEvent) -> float:
        return (other.time - self.time) * 1000.0

    def synchronize(self) -> None:
        HostClockEvent.synchronized += 1


def run_with_timers(rank: int, world: int, runs: list[tuple[str, dict]]) -> list[dict]:
    """A rank: tiny PixArt-α STADI calls, each with the host timer or the event timer (stand-in events)."""
    import torch

    from stadi_xdit.families.pixart import tiny_pixart_pipeline
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline
    from stadi_xdit.runtime import loop, profile
    from stadi_xdit.xdit.build import build_stadi_pipeline

    results = []
    for timer, kwargs in runs:
        def events_timer(device, timeline, comm, record_work):
            return profile.EventForwardTimer(timeline, comm, record_work, HostClockEvent)

        loop.forward_timer = events_timer if timer == "events" else profile.forward_timer
        HostClockEvent.synchronized = 0
        pipe = build_stadi_pipeline(StadiPixArtAlphaPipeline, tiny_pixart_pipeline("alpha"), size=64, steps=STEPS, **kwargs)
        out = pipe(prompt="a red cat", height=64, width=64, num_inference_steps=STEPS, output_type="latent",
                   generator=torch.Generator().manual_seed(1), use_resolution_binning=False)
        result = pipe.last_result
        results.append({"latents": out.images, "evals": result.num_evals, "syncs": HostClockEvent.synchronized,
                        "steps": [(s.phase, s.base_step, s.rows) for s in result.timeline.steps],
                        "times": [(s.start, s.end, s.wait, s.compute) for s in result.timeline.steps],
                        "plan": result.plan, "replans": len(result.replans)})
    return results


def test_the_loop_runs_on_the_event_timer_as_on_the_host_timer(tiny_pixart):
    """Given speeds, the event timer changes no output and no step; measured speeds with calibration and
    sync-point re-plans read the events only at those phases, never once per forward."""
    from stadi_xdit.offline.spawn import run_distributed

    given = {"stadi_mode": "full", "stadi_speeds": "1,0.5", "warmup_steps": 2}
    measured = {"stadi_mode": "full", "warmup_steps": 3, "stadi_replan": "sync", "stadi_emulate_slowdown": "1,2"}
    runs = [("host", given), ("events", given), ("events", measured)]
    for rank, (host, events, adaptive) in enumerate(run_distributed(run_with_timers, 2, runs, timeout=300)):
        assert torch.equal(host["latents"], events["latents"]) and host["steps"] == events["steps"]
        assert events["evals"] == len(events["steps"]) == host["evals"]
        assert events["syncs"] == 1  # given speeds: the events are read once, when the call ends
        assert adaptive["evals"] == len(adaptive["steps"])
        for start, end, wait, compute in events["times"] + adaptive["times"]:
            assert start <= end and wait >= 0 and compute > 0
        if rank == 0:  # not slowed: read at calibration, profile, sync points and the end, not per forward
            assert 2 <= adaptive["syncs"] < adaptive["evals"], adaptive
        else:  # each emulated sleep is sized by its own forward, read at once
            assert adaptive["syncs"] >= adaptive["evals"], adaptive


def test_only_the_timed_group_brackets_its_cuda_waits_with_events(monkeypatch):
    """On CUDA the band group's waits are bracketed by events that the forward timer takes; the CFG pair's group
    (`times_device_waits=False`) records none, so no event piles up unread over a run (it did, one pair per wait)."""
    from stadi_xdit.runtime.comm import BandComm

    clock = DeviceClock()
    made = []
    monkeypatch.setattr(torch.cuda, "Event", lambda **_: made.append(clock.event()) or made[-1])
    band, cfg = BandComm(None, 0, 2), BandComm(None, 0, 2, times_device_waits=False)
    for _ in range(3):
        assert band._timed(True, lambda: "waited") == cfg._timed(True, lambda: "waited") == "waited"
    assert len(band.take_device_waits()) == 3 and band.take_device_waits() == []
    assert cfg.take_device_waits() == [] and len(made) == 6  # the band group's 3 pairs, none for the CFG pair
