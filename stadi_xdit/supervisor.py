"""The launcher's watch over its ranks: a stall anywhere ends the launch in bounded time.

`stadi-xdit` runs torchrun's agent in its own process; this module runs beside it. The ranks post
heartbeats (`stadi_xdit.runtime.heartbeat`) into a private folder; a thread here reads them every
`POLL_SECONDS` and ends the launch when a rank

* has not beaten for `timeout` seconds and its process has not run for a beat's time (stopped with
  SIGSTOP, or wedged). A process that runs is not stopped: on a loaded machine its beat thread can
  wait seconds for the interpreter lock behind a long garbage collection or teardown; or
* has made no progress for longer than `timeout` (a live stall: a lock, a hung read). Progress is
  a phase change or a model block starting (`heartbeat.watch_progress`), so slow work (a long VAE
  decode, a slow step) is never taken for a stall. In xDiT's model load and group set-up, which are
  collectives of xDiT's own, a rank waiting for a peer that still progresses is not stalled either
  (`PEER_WAIT_PHASES`); or
* is `idle` (done, waiting for the output rank or tearing down) for longer than `timeout` after
  no rank of the launch works any more: teardown after the output is saved is bounded too.

It prints one line naming the rank and the phase, kills the stalled rank and then every other
rank of this node that is not saving a result (a rank in `save` may finish, within its own time
limit), and torchrun's agent then ends the launch. The launcher's exit is thus bounded by the
timeout plus `MARGIN_SECONDS` (polling, torchrun's monitor interval, its shortened stop grace).

It also records when each rank was first seen dead and why it exited (a rank that exited
because a peer failed says so in its heartbeat), so the launcher names the rank that failed first.

Standard library only.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from stadi_xdit.runtime import heartbeat

POLL_SECONDS = 0.1
STOP_GRACE_SECONDS = 2.0  # torchrun's own grace between SIGTERM and SIGKILL is 30 s
# Once a launch is failing (a stall found here, or a rank that exited because of a peer), torchrun
# ends it; should it not have within this time, the supervisor kills every rank and exits itself.
ENDING_SECONDS = STOP_GRACE_SECONDS + 2.0
MARGIN_SECONDS = 5.0  # what the launcher may take beyond --stadi_timeout to end a stalled launch
IDLE_PHASE = "idle"  # done with its part: waits for the output rank, then tears down
NO_LIMIT_PHASES = ("startup", IDLE_PHASE)  # imports and parsing; idle while another rank still works
# xDiT's model load and group set-up are collectives of its own (its replicated load reads on one rank and
# broadcasts; its groups meet at the store), outside STADI's peer-aware waits: a rank there may wait, without
# progress, for a peer that still loads on a loaded machine. It is stalled once no rank has progressed.
PEER_WAIT_PHASES = ("load", "process-group")
SAVE_PHASE = "save"


@dataclass
class Culprit:
    rank: int
    phase: str
    line: str


class Supervisor:
    """Watch the heartbeats in a fresh private folder; `env()` is what the ranks need to beat."""

    def __init__(self, timeout: float, prog: str = "stadi-xdit"):
        self.timeout = timeout
        self.prog = prog
        self.folder = tempfile.mkdtemp(prefix="stadi-heartbeat-")  # mode 0700
        self.culprit: Culprit | None = None
        self.died_at: dict[int, float] = {}
        self._paused_until = 0.0
        self._failing_since: float | None = None
        self._nobody_works_since: float | None = None
        self._known: dict[int, dict] = {}  # the last record read of each rank
        self._cpu: dict[int, tuple[int, float]] = {}  # pid -> (CPU ticks, when they last grew)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stadi-supervisor", daemon=True)

    def env(self) -> dict[str, str]:
        return {heartbeat.ENV_DIR: self.folder, heartbeat.ENV_TIMEOUT: repr(float(self.timeout))}

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        shutil.rmtree(self.folder, ignore_errors=True)

    def resumed(self) -> None:
        """After Ctrl-Z and `fg`: the time stopped does not count against any rank."""
        self._paused_until = time.time() + self.timeout

    # --- reading -------------------------------------------------------------------------------
    def records(self) -> dict[int, dict]:
        """Every rank's last heartbeat. A record that vanished (its folder deleted under the launch; the
        rank makes it again at its next beat) stays as last read, so its silence still counts."""
        self._known.update(heartbeat.read_beats(self.folder))
        return dict(self._known)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            now = time.time()
            records = self.records()
            stats = {rank: _stat(record["pid"]) for rank, record in records.items() if isinstance(record.get("pid"), int)}
            live = {rank: records[rank] for rank, stat in stats.items() if _is_running_child(stat)}
            for rank in records.keys() - live.keys():
                self.died_at.setdefault(rank, now)
            for rank, record in live.items():
                self._note_cpu(record["pid"], stats[rank][2], now)
            self._nobody_works_since = (None if any(r.get("phase") not in NO_LIMIT_PHASES for r in live.values())
                                        else self._nobody_works_since or now)
            if self.culprit is None and now >= self._paused_until:
                # Silent ranks first: a stopped or dead process waits on nobody, while a live rank without
                # progress may be waiting for it (a late poll on a loaded machine finds both past the timeout).
                for rank, record in sorted(live.items(), key=lambda item: (not self._silent(item[1], now), item[0])):
                    self._check(rank, record, now, records)
                    if self.culprit is not None:
                        break
            if self.culprit is not None:
                self._kill_idle(records)
            self._bound_the_ending(records, now)

    def _note_cpu(self, pid: int, ticks: int, now: float) -> None:
        seen = self._cpu.get(pid)
        if seen is None or ticks > seen[0]:
            self._cpu[pid] = (ticks, now if seen is not None else 0.0)  # the first look shows no growth yet

    def _silent(self, record: dict, now: float) -> bool:
        """No beat within the timeout, and the process has not run within a beat's time."""
        ran_at = self._cpu.get(record.get("pid"), (0, 0.0))[1]
        return now - float(record.get("beat", now)) > self.timeout and now - ran_at > heartbeat.MAX_BEAT_SECONDS

    def _check(self, rank: int, record: dict, now: float, records: dict[int, dict]) -> None:
        """End the launch if `rank` is silent, makes no progress in a working phase, or idles past the end."""
        since = float(record.get("since", now))
        silent = now - float(record.get("beat", now))
        no_progress = now - _last_progress(record, now)
        phase = str(record.get("phase", "?"))
        if phase in PEER_WAIT_PHASES:  # waiting for a peer that works is not a stall
            no_progress = min(no_progress, *(now - _last_progress(other, now) for other in records.values()))
        if self._silent(record, now):
            self._end(rank, phase, f"rank {rank} stopped responding in {phase} (no heartbeat for "
                                    f"{silent:.1f} s, --stadi_timeout {self.timeout:g} s)", records)
        elif phase not in NO_LIMIT_PHASES and no_progress > self.timeout:
            self._end(rank, phase, f"rank {rank} stalled in {phase} for {no_progress:.1f} s without progress "
                                    f"(--stadi_timeout {self.timeout:g} s)", records)
        elif phase == IDLE_PHASE and self._nobody_works_since is not None \
                and now - max(since, self._nobody_works_since) > self.timeout:
            self._end(rank, phase, f"rank {rank} stalled in {phase} for "
                                    f"{now - max(since, self._nobody_works_since):.1f} s after every rank "
                                    f"finished its work (--stadi_timeout {self.timeout:g} s)", records)

    def _bound_the_ending(self, records: dict[int, dict], now: float) -> None:
        """The backstop for the launcher's own exit: a failing launch that torchrun has not ended
        within `ENDING_SECONDS` is ended here (every rank killed, exit status 1)."""
        peer_exit = any(record.get("cause") == "peer" and rank in self.died_at for rank, record in records.items())
        if self._failing_since is None and (self.culprit is not None or peer_exit):
            self._failing_since = now
        if self._failing_since is None or now - self._failing_since <= ENDING_SECONDS:
            return
        if self.culprit is None:
            first = self.first_failure(records)
            who = f"rank {first} failed first (its peers reported it)" if first is not None else "a rank failed"
            sys.stderr.write(f"{self.prog}: error: {who}; ending the launch\n")
            sys.stderr.flush()
        for pid in child_pids():
            _kill(pid)
        os._exit(1)

    def _end(self, rank: int, phase: str, line: str, records: dict[int, dict]) -> None:
        self.culprit = Culprit(rank, phase, line)
        sys.stderr.write(f"{self.prog}: error: {line}; ending the launch\n")
        sys.stderr.flush()
        _kill(records[rank].get("pid"))

    def _kill_idle(self, records: dict[int, dict]) -> None:
        """Every other rank of this node, except one still saving a finished result."""
        for rank, record in records.items():
            if rank != self.culprit.rank and record.get("phase") == SAVE_PHASE and \
                    time.time() - float(record.get("since", 0)) <= self.timeout:
                continue
            _kill(record.get("pid"))

    # --- after the launch --------------------------------------------------------------------------
    def first_failure(self, failed: Iterable[int], stopped_by_the_agent: Iterable[int] = ()) -> int | None:
        """Of the failed global ranks, the one that failed first: the rank this supervisor ended,
        else the earliest seen dead among those that did not exit because of a peer. Ranks ended by
        torchrun's own SIGTERM (`stopped_by_the_agent`) come last: the agent stops the survivors once
        one rank has failed, often within the same poll, so their deaths can look as early."""
        if self.culprit is not None:
            return self.culprit.rank
        records = self.records()
        candidates = [rank for rank in failed if records.get(rank, {}).get("cause") != "peer"]
        if not candidates:
            return None
        stopped = set(stopped_by_the_agent)
        return min(candidates, key=lambda rank: (rank in stopped, self.died_at.get(rank, float("inf")), rank))


    def ended_after_its_peers(self, rank: int) -> str | None:
        """The phase `rank` was stuck in when a peer's bounded wait gave up on it (torchrun then killed
        it, so its signal is the launch's, not the fault); None when it died on its own.

        Stuck: it had been in that phase for about the timeout when the first peer exited (a killed
        rank closes its sockets, and its peers report it at once, while it was in a fresh phase).
        """
        records = self.records()
        reported = [self.died_at[r] for r, record in records.items()
                    if record.get("cause") == "peer" and r in self.died_at]
        record = records.get(rank)
        if not reported or record is None:
            return None
        if float(record.get("since", float("inf"))) > min(reported) - 0.8 * self.timeout:
            return None
        return str(record.get("phase", "?"))


def _last_progress(record: dict, now: float) -> float:
    """When a rank last progressed: its phase's start or its last reported progress."""
    since = float(record.get("since", now))
    return max(since, float(record.get("progress", since)))


def _is_child(pid: int) -> bool:
    """`pid` is a running (not zombie) child of this process: only those are ever signalled."""
    return _is_running_child(_stat(pid))


def _is_running_child(stat: tuple[str, int, int] | None) -> bool:
    return stat is not None and stat[1] == os.getpid() and stat[0] not in ("Z", "X")


def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """(state, parent pid, CPU clock ticks used, user + system) of a process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def _kill(pid: object) -> None:
    if isinstance(pid, int) and _is_child(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def signal_children(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        if _is_child(pid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def child_pids() -> list[int]:
    """This process's running children (the ranks torchrun started)."""
    names = os.listdir("/proc") if os.path.isdir("/proc") else []
    return [int(name) for name in names if name.isdigit() and _is_child(int(name))]
