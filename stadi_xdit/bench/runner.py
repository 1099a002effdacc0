"""The controller: one scenario = load on, every arm's job started, warm-up, interleaved timed runs.

Order of runs inside a scenario (``order="interleaved"``, the default)::

    start every arm's job (build the pipeline; not timed)
    warm-up: one untimed call per arm
    for repeat in range(r): for arm in arms: one timed call

so slow drift (thermal, other tenants) hits every arm alike. ``order="blocked"`` runs each arm's
job alone (start, warm-up, r calls, stop) for machines that cannot hold every arm's model at once.
A timed call starts with a barrier on the arm's ranks; its latency is the slowest rank's time from
the barrier release to the pipeline's return (every rank holds or has sent its output by then).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stadi_xdit.bench.arms import ArmJob, JobError, skip_reason
from stadi_xdit.bench.catalog import ARMS
from stadi_xdit.bench.presets import BenchPreset
from stadi_xdit.bench.scenarios import BackgroundLoad, Scenario

WORKER_ENV = {"LOG_LEVEL": "error", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


@dataclass
class BenchSettings:
    preset: BenchPreset
    height: int
    steps: int
    warmup: int
    repeats: int
    world: int
    arms: tuple[str, ...]
    cores: list[int | None]
    seed: int = 0
    order: str = "interleaved"
    max_stride: int = 2
    pipefusion_patches: int | None = None
    profile_cache: bool = False
    cache_threshold: float | None = None  # cached arms: residual_diff_threshold (None: xDiT's default)
    device: str = "cpu"
    dtype: str = "float32"
    run_timeout: float | None = None  # None: auto from the first warm-up
    start_timeout: float = 600.0
    verbose_workers: bool = False
    out_dir: Path = field(default_factory=lambda: Path("bench-out"))
    per_call: bool = False  # --calls: report every call's plan, cost model and latency


@dataclass
class ArmOutcome:
    name: str
    label: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    warmup_latency: float | None = None  # the first, cold call
    cold: dict | None = None  # ... and its details (the start of adaptive STADI's sequence of calls)
    reference_latency: float | None = None  # shift scenarios: a second untimed call, under the initial load
    runs: list[dict] = field(default_factory=list)  # per timed run: latency + per-rank details
    latent: torch.Tensor | None = None  # final latent of the last timed run

    @property
    def latencies(self) -> list[float]:
        return [run["latency"] for run in self.runs]

    @property
    def median(self) -> float | None:
        return statistics.median(self.latencies) if self.runs else None


def _arm_setup(settings: BenchSettings, arm_name: str, scenario: Scenario) -> dict:
    """What every rank of one arm builds and runs in one scenario (plain values: it is pickled to the ranks)."""
    arm = ARMS[arm_name]
    world = 1 if arm.kind == "single" else settings.world
    fast = scenario.fast_rank(settings.world)
    cores = [settings.cores[fast]] if arm.kind == "single" else list(settings.cores[:world])
    ranks = [fast] if arm.kind == "single" else list(range(world))
    factors = [scenario.factor_schedule(r, settings.steps) for r in ranks]
    cache = None
    if settings.profile_cache and arm_name in ("spatial", "full"):
        cache_dir = settings.out_dir / "profile-cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = str(cache_dir / f"{scenario.label}-{arm_name}.json")
        Path(cache).unlink(missing_ok=True)  # measured fresh in this scenario's warm-up
    return {"arm": arm_name, "preset": settings.preset.name, "num_frames": settings.preset.num_frames,
            "height": settings.height, "steps": settings.steps,
                "warmup": settings.warmup, "seed": settings.seed, "device": settings.device, "dtype": settings.dtype,
                "emulate": scenario.emulate_arg(), "emulate_shift": scenario.emulate_shift_arg(settings.steps),
                "max_stride": settings.max_stride, "profile_cache": cache,
                "pipefusion_patches": settings.pipefusion_patches, "cores": cores, "factors": factors,
                "cache_threshold": settings.cache_threshold,
            "quiet": not settings.verbose_workers}


def _collect(arm_name: str, per_rank: list[dict]) -> dict:
    """One timed call: latency, per-rank busy time and the STADI details, JSON-ready."""
    latency = max(r["seconds"] for r in per_rank)
    ranks = []
    for r in per_rank:
        forwards = r["forwards"]
        hook_busy = sum(c + slept for _, _, c, slept in forwards)
        entry = {"seconds": r["seconds"], "forwards": len(forwards), "hook_busy": hook_busy,
                 "hook_compute": sum(c for _, _, c, _ in forwards),
                 "emulated": sum(slept for *_, slept in forwards),
                 "forward_spans": [[s, e, c, slept] for s, e, c, slept in forwards],
                 "peak_memory_bytes": r.get("peak_memory_bytes"), "compile": r.get("compile"),
                 "served_forwards": r.get("served_forwards")}
        stadi = r.get("stadi")
        if stadi is not None:
            entry["stadi"] = stadi
            entry["busy"] = stadi["busy_seconds"]
            entry["emulated"] = sum(step["emulated"] for step in stadi["steps"])
        else:
            entry["busy"] = hook_busy
        entry["busy_fraction"] = entry["busy"] / latency if latency > 0 else float("nan")
        ranks.append(entry)
    return {"latency": latency, "ranks": ranks}


def _latent_of(per_rank: list[dict]) -> torch.Tensor | None:
    for r in per_rank:
        if r["latent"] is not None:
            return r["latent"]
    return None


class _Progress:
    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="run", disable=not enabled, dynamic_ncols=True)

    def step(self, text: str, latency: float | None = None) -> None:
        self.bar.set_description(text)
        if latency is not None:
            self.bar.set_postfix_str(f"{latency:.3f} s")
        self.bar.update(1)

    def note(self, text: str) -> None:
        self.bar.write(text)

    def skip(self, count: int) -> None:
        self.bar.update(count)

    def close(self) -> None:
        self.bar.close()


def _kill(job: ArmJob) -> None:
    """End the ranks of a stuck job by their process ids (they were started by us)."""
    for info in job.rank_info.values():
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except (ProcessLookupError, KeyError):
            pass


def calls_per_arm(scenario: Scenario, repeats: int) -> int:
    """Pipeline calls of each arm in ``scenario``: untimed (cold; shift: + reference) and timed."""
    return (2 if scenario.shifts else 1) + repeats


class LoadShifter:
    """The real load changes of a ``shift`` scenario, timed against each call (see scenarios.py)."""

    def __init__(self, scenario: Scenario, load: BackgroundLoad):
        self.scenario, self.load = scenario, load

    @contextlib.contextmanager
    def during_call(self, reference_seconds: float | None):
        """Yields ``(on_start, switches)``: ``on_start(t)`` arms each shift item's switch at
        ``F x reference_seconds`` after ``t``, the call's barrier release (perf_counter, one clock for
        every process); ``switches`` collects the switch times as they happen. With no reference (the
        warm-up call, which measures it under the initial load) nothing switches. The initial load is
        restored when the call returns."""
        switches: list[float] = []
        timers: list[threading.Timer] = []

        def on_start(released: float) -> None:
            if not (self.scenario.shifts and reference_seconds):
                return
            for item, shift in enumerate(self.scenario.shifts):
                def fire(item=item):
                    self.load.switch(item)
                    switches.append(time.perf_counter())
                delay = max(0.0, released + shift.at * reference_seconds - time.perf_counter())
                timers.append(threading.Timer(delay, fire))
                timers[-1].start()

        try:
            yield on_start, switches
        finally:
            for timer in timers:
                timer.cancel()
                timer.join()
            if timers:
                self.load.reset()


def run_scenario(settings: BenchSettings, scenario: Scenario, progress: _Progress) -> dict[str, ArmOutcome]:
    scenario.check_world(settings.world)
    outcomes: dict[str, ArmOutcome] = {}
    runnable = []
    for name in settings.arms:
        arm = ARMS[name]
        outcome = outcomes[name] = ArmOutcome(name, arm.label(settings.world))
        reason = skip_reason(arm, settings.preset, settings.height, settings.world, settings.steps,
                             settings.warmup, settings.pipefusion_patches)
        if reason:
            outcome.status, outcome.reason = "skipped", reason
            progress.note(f"[{scenario.text}] skip {outcome.label}: {reason}")
            progress.skip(calls_per_arm(scenario, settings.repeats))
        else:
            runnable.append(name)

    env = {} if settings.verbose_workers else WORKER_ENV
    jobs: dict[str, ArmJob] = {}
    timeout = {"run": settings.run_timeout}

    def fail(name: str, error: Exception, done_runs: int) -> None:
        outcome = outcomes[name]
        outcome.status, outcome.reason = "failed", str(error).strip().splitlines()[-1][:300]
        progress.note(f"[{scenario.text}] {outcome.label} failed: {error}")
        progress.skip(calls_per_arm(scenario, settings.repeats) - done_runs)
        job = jobs.pop(name, None)
        if job is not None:
            _kill(job)
            job.stop()

    def start(name: str) -> None:
        arm = ARMS[name]
        procs = 1 if arm.kind == "single" else settings.world
        job = ArmJob(_arm_setup(settings, name, scenario), procs, env=env).start()
        jobs[name] = job
        try:
            job.wait_ready(settings.start_timeout)
        except JobError as error:
            fail(name, error, 0)

    def run(name: str, call: str, done_runs: int) -> None:
        """One call of arm ``name``: ``call`` is "cold" (the first, untimed), "reference" (shift scenarios:
        untimed, under the initial load; its latency times the load switches) or "timed"."""
        job = jobs.get(name)
        if job is None:
            return
        limit = timeout["run"] if timeout["run"] is not None else settings.start_timeout
        reference = outcomes[name].reference_latency if call == "timed" else None
        try:
            with shifting.during_call(reference) as (on_start, switches):
                per_rank = job.run(limit, on_start)
        except JobError as error:
            fail(name, error, done_runs)
            return
        collected = _collect(name, per_rank)
        if switches:  # seconds after the barrier release (perf_counter is one clock for all processes)
            collected["load_switches"] = [t - min(r["start"] for r in per_rank) for t in switches]
        outcome = outcomes[name]
        if call == "cold":
            outcome.warmup_latency = collected["latency"]
            outcome.cold = collected
            if timeout["run"] is None:  # auto: generous multiple of the first warm-up call
                timeout["run"] = max(60.0, 20.0 * collected["latency"])
        elif call == "reference":
            outcome.reference_latency = collected["latency"]
        else:
            outcome.runs.append(collected)
            outcome.latent = _latent_of(per_rank)
        progress.step(f"{scenario.text} {'run' if call == 'timed' else call} {outcome.label}", collected["latency"])

    # The first call of a job carries one-time costs (allocations, lazy initialisation), so it cannot
    # time the switches of a shift scenario: a second untimed call does.
    untimed = ["cold", "reference"] if scenario.shifts else ["cold"]

    with BackgroundLoad(scenario, settings.cores) as load:
        shifting = LoadShifter(scenario, load)
        if settings.order == "interleaved":
            for name in runnable:
                start(name)
            for done, call in enumerate(untimed):
                for name in runnable:
                    run(name, call, done)
            for repeat in range(settings.repeats):
                for name in runnable:
                    run(name, "timed", len(untimed) + repeat)
            for name in list(jobs):
                jobs.pop(name).stop()
        else:
            for name in runnable:
                start(name)
                for done, call in enumerate(untimed):
                    run(name, call, done)
                for repeat in range(settings.repeats):
                    run(name, "timed", len(untimed) + repeat)
                if name in jobs:
                    jobs.pop(name).stop()
    time.sleep(0.1)
    return outcomes
