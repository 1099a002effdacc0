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
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Self

from stadi_xdit.planner.cli import parse_numbers

# A rank k times slower runs k times longer: beyond 100x one timed call of the slow arms takes hours.
MAX_SLOWDOWN = 100.0
# Burner processes per rank: each is a busy process on the rank's core; 32 already make it ~33x slower.
MAX_BURNERS = 32
FORMS = "none, slowdown:k0,k1,... or background:RANK=LOAD[,RANK=LOAD...]"


@dataclass(frozen=True)
class Scenario:
    text: str
    kind: str  # "none" | "slowdown" | "background"
    factors: tuple[float, ...] = ()  # slowdown: per-rank factor k_i
    loads: dict[int, float] = field(default_factory=dict)  # background: rank -> LOAD

    @property
    def label(self) -> str:
        return self.text.replace(":", "_").replace("=", "-").replace(",", "_")

    def check_world(self, world: int) -> None:
        """ValueError unless the scenario fits ``world`` ranks (one factor per rank, loaded ranks exist)."""
        if self.kind == "slowdown" and len(self.factors) != world:
            raise ValueError(f"scenario {self.text!r} has {len(self.factors)} slowdown factors, "
                             f"one per rank is needed for {world} ranks (--ranks)")
        for rank in self.loads:
            if not 0 <= rank < world:
                raise ValueError(f"scenario {self.text!r}: rank {rank} is outside 0..{world - 1} "
                                 f"({world} ranks, --ranks)")

    def factor(self, rank: int) -> float:
        return self.factors[rank] if self.kind == "slowdown" else 1.0

    def emulate_arg(self) -> str | None:
        """``--stadi_emulate_slowdown`` for STADI arms (None when nothing is emulated)."""
        if self.kind != "slowdown" or all(k == 1 for k in self.factors):
            return None
        return ",".join(f"{k:g}" for k in self.factors)

    def fast_rank(self, world: int) -> int:
        """The rank whose device the single-rank arm stands for: least slowed / unloaded, lowest id."""
        if self.kind == "slowdown":
            return min(range(world), key=lambda r: (self.factors[r], r))
        if self.kind == "background":
            return min(range(world), key=lambda r: (self.loads.get(r, 0.0), r))
        return 0

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
    if kind == "slowdown":
        return Scenario(text, "slowdown", factors=_slowdown_factors(text, rest))
    if kind == "background":
        return Scenario(text, "background", loads=_background_loads(text, rest))
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
            (rank,), (load,) = parse_numbers(rank_text, int), parse_numbers(load_text)
        except ValueError:
            rank = load = None
        if not eq or rank is None:
            raise ValueError(f"scenario {text!r}: expected background:RANK=LOAD[,RANK=LOAD...] "
                             "with an integer RANK and a number LOAD")
        if rank in loads:
            raise ValueError(f"scenario {text!r}: rank {rank} is loaded twice")
        # LOAD >= 1 starts that many burners, 0 < LOAD < 1 one burner with that duty cycle.
        if not (0 < load < 1 or (load == int(load) and 1 <= load <= MAX_BURNERS)):
            raise ValueError(f"scenario {text!r}: LOAD must be an integer in [1, {MAX_BURNERS}] (burners) "
                             f"or a duty fraction in (0, 1), got {load_text.strip()!r}")
        loads[rank] = load
    return loads


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


class BackgroundLoad:
    """Burner processes for a ``background`` scenario; a context manager that always stops them."""

    def __init__(self, scenario: Scenario, cores: list[int]):
        self.scenario = scenario
        self.cores = cores
        self.procs: list[mp.Process] = []

    def __enter__(self) -> Self:
        ctx = mp.get_context("spawn")
        for rank, load in self.scenario.loads.items():
            core = self.cores[rank % len(self.cores)] if self.cores else None
            jobs = [1.0] * int(load) if load >= 1 else [load]
            for duty in jobs:
                proc = ctx.Process(target=_burn, args=(core, duty), daemon=True, name=f"burner-r{rank}")
                proc.start()
                self.procs.append(proc)
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs.clear()
