"""Benchmark scenarios: what makes a rank slow, the same for every arm of one scenario.

* ``none``: nothing; every rank runs at full speed.
* ``slowdown:k0,k1,...``: duty-cycle emulation. After every transformer forward of ``c`` seconds of
  compute, rank i sleeps ``(k_i - 1) * c``: a device ``k_i`` times slower. STADI arms get it through
  ``--stadi_emulate_slowdown`` (the planner is *not* told; it measures), every other arm through a
  forward hook with the same rule (``arms.SlowdownHook``).
* ``background:RANK=LOAD[,RANK=LOAD...]``: a real co-located load on that rank's core for the whole
  scenario (all arms, warm-up and timed runs). ``LOAD`` >= 1 (integer) starts that many burner
  processes, each a busy loop pinned to the core: under Linux' fair scheduler a rank sharing its
  core with L burners gets ~1/(L+1) of it while it computes, i.e. it is ~(L+1)x slower (and the
  burners take the whole core while the rank waits). ``0 < LOAD < 1`` starts one burner with that
  duty cycle (busy LOAD x 10 ms, then asleep for the rest of each 10 ms period), ~(1 + LOAD)x slower.

Load that changes *during* each timed call (adaptive re-planning, ``--stadi_replan``):

* ``slowdown:k0,k1,...->k0',k1',...@F``: the emulated form. Up to base step ``round(F x steps)`` of
  the timestep grid rank i is ``k_i`` times slower, from it on ``k_i'`` times (STADI arms:
  ``--stadi_emulate_shift``; other arms: the forward hook, which counts steps by the timestep).
* ``shift:RANK=A->B@F[,...]``: real burners. Each timed call starts with LOAD ``A`` on the rank's core;
  ``F`` x the arm's warm-up call (which runs under ``A`` throughout) after the call's start, the
  controller switches to LOAD ``B`` (0 = no burner), and back to ``A`` when the call returns. Burners
  of both loads are started with the scenario and paused/resumed (SIGSTOP/SIGCONT), so a switch costs
  no process start on the measured cores.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Self

from stadi_xdit.planner.cli import parse_numbers

# A rank k times slower runs k times longer: beyond 100x one timed call of the slow arms takes hours.
MAX_SLOWDOWN = 100.0
# Burner processes per rank: each is a busy process on the rank's core; 32 already make it ~33x slower.
MAX_BURNERS = 32
FORMS = ("none, slowdown:k0,k1,..., slowdown:k0,k1,...->k0',k1',...@F, background:RANK=LOAD[,...] "
         "or shift:RANK=A->B@F[,...]")


@dataclass(frozen=True)
class LoadShift:
    """``shift`` item: ``rank`` runs with LOAD ``before``, then ``after`` from ``at`` x the reference call."""

    rank: int
    before: float
    after: float
    at: float


@dataclass(frozen=True)
class Scenario:
    text: str
    kind: str  # "none" | "slowdown" | "background" | "shift"
    factors: tuple[float, ...] = ()  # slowdown: per-rank factor k_i (before the change, if any)
    loads: dict[int, float] = field(default_factory=dict)  # background: rank -> LOAD
    after_factors: tuple[float, ...] | None = None  # slowdown ...->...@F: the factors from step F on
    at: float | None = None  # slowdown ...->...@F: F, a fraction of the steps
    shifts: tuple[LoadShift, ...] = ()  # shift: the real load changes

    @property
    def varying(self) -> bool:
        """True when the load changes during each timed call."""
        return self.kind == "shift" or self.after_factors is not None

    def switch_step(self, steps: int) -> int:
        """Base step of the grid where an emulated change takes effect: round(F x steps), in [1, steps - 1]."""
        return min(max(1, round(self.at * steps)), max(1, steps - 1))

    def factor_schedule(self, rank: int, steps: int) -> tuple[float, float, int | None]:
        """(factor before, factor after, first step of 'after' or None) of ``rank`` for the forward hook."""
        if self.kind != "slowdown":
            return 1.0, 1.0, None
        if self.after_factors is None:
            return self.factors[rank], self.factors[rank], None
        return self.factors[rank], self.after_factors[rank], self.switch_step(steps)

    def emulate_shift_arg(self, steps: int) -> str | None:
        """``--stadi_emulate_shift`` for STADI arms (None without an emulated change)."""
        if self.after_factors is None:
            return None
        return f"{self.switch_step(steps)}:" + ",".join(f"{k:g}" for k in self.after_factors)

    def load_phases(self, world: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Nominal relative speeds (1 = fast) before and after the change (equal for steady scenarios)."""
        if self.kind == "slowdown" and self.after_factors is not None:
            return tuple(1 / k for k in self.factors), tuple(1 / k for k in self.after_factors)
        if self.kind == "shift":
            before = {s.rank: s.before for s in self.shifts}
            after = {s.rank: s.after for s in self.shifts}
            return (tuple(1 / (1 + before.get(r, 0.0)) for r in range(world)),
                    tuple(1 / (1 + after.get(r, 0.0)) for r in range(world)))
        speeds = self.nominal_speeds(world)
        return speeds, speeds

    @property
    def label(self) -> str:
        return (self.text.replace("->", "-to-").replace("@", "-at-").replace(":", "_").replace("=", "-")
                .replace(",", "_"))

    def check_world(self, world: int) -> None:
        """ValueError unless the scenario fits ``world`` ranks (one factor per rank, loaded ranks exist)."""
        for factors in (self.factors, self.after_factors or self.factors):
            if self.kind == "slowdown" and len(factors) != world:
                raise ValueError(f"scenario {self.text!r} has {len(factors)} slowdown factors, "
                                 f"one per rank is needed for {world} ranks (--ranks)")
        for rank in [*self.loads, *(s.rank for s in self.shifts)]:
            if not 0 <= rank < world:
                raise ValueError(f"scenario {self.text!r}: rank {rank} is outside 0..{world - 1} "
                                 f"({world} ranks, --ranks)")

    def emulate_arg(self) -> str | None:
        """``--stadi_emulate_slowdown`` for STADI arms (None when nothing is emulated)."""
        if self.kind != "slowdown" or all(k == 1 for k in self.factors):
            return None
        return ",".join(f"{k:g}" for k in self.factors)

    def fast_rank(self, world: int) -> int:
        """The rank whose device the single-rank arm stands for: least slowed / unloaded, lowest id."""
        before, after = self.load_phases(world)
        return min(range(world), key=lambda r: (-min(before[r], after[r]), r))

    def nominal_speeds(self, world: int) -> tuple[float, ...]:
        """Relative speed of each rank this scenario intends (1 = fast); used for ideal bounds."""
        if self.kind == "slowdown":
            return tuple(1.0 / k for k in self.factors)
        if self.kind == "background":
            return tuple(1.0 / (1.0 + self.loads.get(r, 0.0)) for r in range(world))
        return (1.0,) * world


def parse_scenario(text: str) -> Scenario:
    """``none`` | ``slowdown:k0,k1,...`` | ``background:RANK=LOAD[,...]``; ValueError (one line) if bad."""
    text = text.strip()
    if text == "none":
        return Scenario(text, "none")
    kind, _, rest = text.partition(":")
    if kind == "slowdown" and "->" in rest:
        before, after, at = _change(text, rest, "slowdown:k0,k1,...->k0',k1',...@F")
        factors, after_factors = _slowdown_factors(text, before), _slowdown_factors(text, after)
        if len(factors) != len(after_factors):
            raise ValueError(f"scenario {text!r}: {len(factors)} factors before '->' but {len(after_factors)} after")
        return Scenario(text, "slowdown", factors=factors, after_factors=after_factors, at=at)
    if kind == "slowdown":
        return Scenario(text, "slowdown", factors=_slowdown_factors(text, rest))
    if kind == "background":
        return Scenario(text, "background", loads=_background_loads(text, rest))
    if kind == "shift":
        return Scenario(text, "shift", shifts=_load_shifts(text, rest))
    raise ValueError(f"unknown scenario {text!r}: use {FORMS}")


def _slowdown_factors(text: str, rest: str) -> tuple[float, ...]:
    try:
        factors = parse_numbers(rest, example="1,2")
    except ValueError:
        raise ValueError(
            f"scenario {text!r}: expected slowdown:k0,k1,... with one finite number per rank"
        ) from None
    if not all(1 <= k <= MAX_SLOWDOWN for k in factors):
        raise ValueError(f"scenario {text!r}: slowdown factors must be in [1, {MAX_SLOWDOWN:g}] "
                         "(1 = full speed)")
    return factors


def _background_loads(text: str, rest: str) -> dict[int, float]:
    loads: dict[int, float] = {}
    for item in rest.split(","):
        rank_text, eq, load_text = item.partition("=")
        try:
            (rank,) = parse_numbers(rank_text, int)
        except ValueError:
            rank = None
        if not eq or rank is None:
            raise ValueError(f"scenario {text!r}: expected background:RANK=LOAD[,RANK=LOAD...] "
                             "with an integer RANK and a number LOAD")
        if rank in loads:
            raise ValueError(f"scenario {text!r}: rank {rank} is loaded twice")
        loads[rank] = _parse_load(text, load_text, allow_zero=False)
    return loads


def _parse_load(text: str, load_text: str, allow_zero: bool) -> float:
    """LOAD >= 1 starts that many burners, 0 < LOAD < 1 one burner with that duty cycle (0: none)."""
    try:
        (load,) = parse_numbers(load_text) if load_text.strip() not in ("0", "0.0") else (0.0,)
    except ValueError:
        load = math.nan
    if load == 0 and allow_zero:
        return 0.0
    if not (0 < load < 1 or (math.isfinite(load) and load == int(load) and 1 <= load <= MAX_BURNERS)):
        raise ValueError(f"scenario {text!r}: LOAD must be an integer in [1, {MAX_BURNERS}] (burners) "
                         f"or a duty fraction in (0, 1){', or 0' if allow_zero else ''}, got {load_text.strip()!r}")
    return load


def _change(text: str, rest: str, form: str) -> tuple[str, str, float]:
    """'A->B@F' -> ('A', 'B', F) with 0 < F < 1; ValueError naming the expected form."""
    match = re.fullmatch(r"([^@>]*)->([^@]*)@\s*([0-9.eE+-]+)\s*", rest)
    try:
        at = float(match.group(3)) if match else math.nan
    except ValueError:
        at = math.nan
    if not match or not 0 < at < 1:
        raise ValueError(f"scenario {text!r}: expected {form} with 0 < F < 1 (the fraction of the call "
                         "after which the load changes)")
    return match.group(1), match.group(2), at


def _load_shifts(text: str, rest: str) -> tuple[LoadShift, ...]:
    shifts = []
    for item in rest.split(","):
        rank_text, eq, change = item.partition("=")
        before, after, at = _change(text, change if eq else "", "shift:RANK=A->B@F[,...]")
        loads = {side: _parse_load(text, value, allow_zero=True) for side, value in (("A", before), ("B", after))}
        try:
            (rank,) = parse_numbers(rank_text, int)
        except ValueError:
            raise ValueError(f"scenario {text!r}: expected shift:RANK=A->B@F with an integer RANK") from None
        if any(s.rank == rank for s in shifts):
            raise ValueError(f"scenario {text!r}: rank {rank} is shifted twice")
        if loads["A"] == loads["B"]:
            raise ValueError(f"scenario {text!r}: rank {rank}'s load does not change ({before.strip()}->{after.strip()})")
        shifts.append(LoadShift(rank, loads["A"], loads["B"], at))
    return tuple(shifts)


def _burn(core: int | None, duty: float, period: float = 0.01) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    x = 0
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < duty * period:
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        if duty < 1:
            time.sleep((1 - duty) * period)


def _burner_duties(load: float) -> list[float]:
    """LOAD -> the duty cycle of each burner process: LOAD >= 1 full burners, else one partial."""
    return [1.0] * int(load) if load >= 1 else ([load] if load > 0 else [])


class BackgroundLoad:
    """Burner processes of a ``background`` or ``shift`` scenario; a context manager that always stops them.

    ``shift``: both loads of every item are started; the ``after`` burners stay paused (SIGSTOP) until
    ``switch(item)``, and ``reset()`` restores the ``before`` load between calls.
    """

    def __init__(self, scenario: Scenario, cores: list[int | None]):
        self.scenario = scenario
        self.cores = cores
        self.procs: list[mp.Process] = []
        self._before: list[list[mp.Process]] = []  # per shift item
        self._after: list[list[mp.Process]] = []

    def _start(self, rank: int, load: float) -> list[mp.Process]:
        ctx = mp.get_context("spawn")
        core = self.cores[rank % len(self.cores)] if self.cores else None
        started = []
        for duty in _burner_duties(load):
            proc = ctx.Process(target=_burn, args=(core, duty), daemon=True, name=f"burner-r{rank}")
            proc.start()
            if core is not None:  # pinned from here too, before its interpreter even starts up
                os.sched_setaffinity(proc.pid, {core})
            started.append(proc)
        self.procs.extend(started)
        return started

    def __enter__(self) -> Self:
        for rank, load in self.scenario.loads.items():
            self._start(rank, load)
        for shift in self.scenario.shifts:
            self._before.append(self._start(shift.rank, shift.before))
            self._after.append(self._start(shift.rank, shift.after))
        if self.scenario.shifts:
            time.sleep(1.0)  # let the burners' interpreters start up before anything is measured
            self.reset()
        return self

    @staticmethod
    def _signal(procs: list[mp.Process], sig: int) -> None:
        for proc in procs:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def switch(self, item: int) -> None:
        """Shift item ``item`` changes from its ``before`` load to its ``after`` load."""
        self._signal(self._before[item], signal.SIGSTOP)
        self._signal(self._after[item], signal.SIGCONT)

    def reset(self) -> None:
        """Every shift item back to its ``before`` load."""
        for before, after in zip(self._before, self._after):
            self._signal(after, signal.SIGSTOP)
            self._signal(before, signal.SIGCONT)

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            self._signal([proc], signal.SIGCONT)  # a stopped process only acts on SIGTERM once continued
            proc.terminate()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs.clear()
