"""Naming the peer behind a failed collective: one line per survivor, never a backend traceback.

A bounded wait that fails only says "Operation timed out!" or "Connection closed by peer" with a
socket address. To say *which* rank failed, in which phase, each rank posts its progress (a
sequence number, the phase and the step) to the job's rendezvous store before every STADI
phase. When a wait fails, the survivor reads its peers' progress: the peer furthest behind is the
one that stalled or died. One store write per step, not per layer, so the hot path is untouched.

`STADI_DEBUG=1` keeps the full traceback (`report_and_exit` re-raises instead of exiting).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import torch.distributed as dist

from stadi_xdit.runtime import heartbeat

T = TypeVar("T")

_KEY_PREFIX = "stadi/progress/"
_ALIVE_PREFIX = "stadi/alive/"  # the time of a rank's last progress (heartbeat.progress), posted at most every second
_STORE_READ_SECONDS = 2.0  # diagnosing must not itself hang on a store whose host is gone


class WaitTimedOut(RuntimeError):
    """One wait on a collective still in flight ran out of time (`runtime/comm.py`); it may be waited on
    again, which `PeerWatch.guard` does while a peer works. A collective the backend failed raises otherwise."""


class PeerFailure(RuntimeError):
    """A STADI peer died or stalled; `str()` is the one-line report."""


def debug_enabled() -> bool:
    return os.environ.get("STADI_DEBUG", "") not in ("", "0")


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()  # the rendezvous store every rank shares
    except (RuntimeError, ValueError, AttributeError):
        return None


@dataclass
class PeerWatch:
    """Progress of this rank, posted for its peers; turns a failed wait into a `PeerFailure`.

    `global_ranks[i]` is the global rank of group rank i; `rank` is this rank's group rank.
    """

    global_ranks: Sequence[int]
    rank: int
    timeout_seconds: float
    phase: str = "setup"
    step: int = 0
    # gloo waits can be waited on again after a timeout: keep waiting while a peer reports progress (a slow
    # forward is work, not a stall). NCCL's are stream-ordered and torn down by its watchdog: never re-armed.
    rewaits: bool = False
    _sequence: int = 0
    _store: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._store is None and len(self.global_ranks) > 1:
            self._store = _default_store()
        if self._store is not None and self.rewaits:
            heartbeat.on_progress(f"{_ALIVE_PREFIX}{self.global_ranks[self.rank]}", self._post_alive,
                                  interval=min(1.0, self.timeout_seconds / 4))

    @property
    def slice_seconds(self) -> float:
        """One wait's slice where waits are re-armed (`BandComm.wait_slice`): a quarter of the timeout."""
        return self.timeout_seconds / 4

    def _post_alive(self, now: float) -> None:
        if self._store is None:
            return
        try:
            self._store.set(f"{_ALIVE_PREFIX}{self.global_ranks[self.rank]}", f"{now:.3f}")
        except (RuntimeError, ValueError):
            self._store = None

    @contextlib.contextmanager
    def _short_reads(self):
        """The store, read with a short timeout (a store whose host is gone must not hang a check), then
        given back its own timeout: a check runs while the job goes on."""
        previous = getattr(self._store, "timeout", None)
        self._store.set_timeout(_timedelta(_STORE_READ_SECONDS))
        try:
            yield self._store
        finally:
            if previous is not None:
                try:
                    self._store.set_timeout(previous)
                except RuntimeError:
                    pass

    def a_peer_works(self) -> bool:
        """Whether a peer reported progress within the last `timeout_seconds` (its clock and ours: one node,
        or nodes whose clocks agree within a second, as NTP keeps them)."""
        if self._store is None:
            return False
        now = time.time()
        try:
            with self._short_reads() as store:
                for rank, global_rank in enumerate(self.global_ranks):
                    key = f"{_ALIVE_PREFIX}{global_rank}"
                    if rank != self.rank and store.check([key]) and \
                            now - float(store.get(key).decode()) < self.timeout_seconds:
                        return True
        except (RuntimeError, ValueError):
            return False
        return False

    def enter(self, phase: str, step: int = 0) -> None:
        """This rank starts `phase` (warmup / exchange / transition / gather / ...) at `step`."""
        self.phase, self.step = phase, step
        self._sequence += 1
        if self._store is not None:
            try:
                self._store.set(f"{_KEY_PREFIX}{self.global_ranks[self.rank]}",
                                f"{self._sequence} {phase} {step} {time.time():.3f}")
            except (RuntimeError, ValueError):
                self._store = None  # the store is gone: keep running, diagnose without it
        heartbeat.phase(f"{phase} step {step}")  # the launcher's per-phase time limit restarts

    def _progress(self, global_rank: int) -> tuple[int, str, int] | None:
        if self._store is None:
            return None
        key = f"{_KEY_PREFIX}{global_rank}"
        try:
            with self._short_reads() as store:
                if not store.check([key]):
                    return (0, "startup", 0)
                sequence, phase, step, _ = store.get(key).decode().split(" ")
            return int(sequence), phase, int(step)
        except (RuntimeError, ValueError):
            return None

    def failure(self, error: BaseException, waited_seconds: float) -> PeerFailure:
        """The one-line report for a wait that failed after `waited_seconds`."""
        text = str(error).lower()
        died = any(word in text for word in ("closed", "reset", "broken pipe", "refused", "eof"))
        peers = [r for r in range(len(self.global_ranks)) if r != self.rank]
        progress = {r: self._progress(self.global_ranks[r]) for r in peers}
        known = {r: p for r, p in progress.items() if p is not None}
        if known:
            behind = min(p[0] for p in known.values())
            suspects = [r for r, p in known.items() if p[0] == behind]
        else:
            suspects = peers
        names = ", ".join(f"rank {r} (global rank {self.global_ranks[r]})" for r in suspects)
        what = "died (connection closed)" if died else "stopped responding"
        where = ""
        if len(suspects) == 1 and suspects[0] in known:
            _, phase, step = known[suspects[0]]
            where = f"; it was last in {phase} step {step}"
        return PeerFailure(
            f"stadi: peer {names} {what} during {self.phase} step {self.step} after {waited_seconds:.1f} s"
            f"{where} (--stadi_timeout {self.timeout_seconds:g} s)")

    def guard(self, wait: Callable[[], T]) -> T:
        """Run a blocking wait (re-callable: it waits on works already launched); a backend error becomes a
        `PeerFailure` naming the peer. A timed-out wait is waited on again while a peer reports progress, so
        `--stadi_timeout` bounds silence, not a slow peer's work."""
        start = time.perf_counter()
        waited = 0.0  # seconds this rank ran while waiting (a slice counts at most its own length)
        while True:
            slice_start = time.perf_counter()
            try:
                return wait()
            except PeerFailure:
                raise
            except RuntimeError as error:  # gloo/NCCL errors, DistBackendError included
                spent = time.perf_counter() - slice_start
                # A slice that took longer than itself spans time this process did not run (Ctrl-Z, then
                # `fg`; a paused VM): that time is nobody's silence, so it does not count against the peers.
                waited += min(spent, self.slice_seconds) if isinstance(error, WaitTimedOut) else spent
                # A slice of the wait (BandComm.wait_slice) ran out: wait on while the wait is younger than the
                # timeout, or a peer works. Either way this rank is not stalled, its wait is bounded: it reports
                # progress, so the launcher names the peer that stopped, never the rank waiting for it.
                if self.rewaits and isinstance(error, WaitTimedOut) and (
                        waited < self.timeout_seconds or self.a_peer_works()):
                    heartbeat.progress()
                    continue
                raise self.failure(error, time.perf_counter() - start) from error


def _timedelta(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


def report_and_exit(error: PeerFailure, status: int = 1) -> NoReturn:
    """Print the one line and exit non-zero; with STADI_DEBUG=1 re-raise for the full traceback."""
    if debug_enabled():
        raise error
    heartbeat.mark_exit("peer")  # the launcher then names the peer, not this survivor
    sys.stderr.write(f"{error}\n")
    sys.stderr.flush()
    os._exit(status)  # process groups of a failed job cannot be torn down cleanly; do not hang in atexit
