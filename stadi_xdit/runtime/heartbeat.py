"""Every phase of a rank under a timeout: heartbeats for the launcher, and fault-injection hooks.

STADI's own collectives are bounded (`runtime/faults.py`), but a rank can also stall where no
STADI collective runs: loading the model, creating xDiT's process groups, decoding, saving, or
writing the profile cache. A stopped (SIGSTOP) or wedged rank cannot report itself, and its peers
may already have exited or may wait in a gloo call with a 30-minute default. So the launcher
(`stadi-xdit`) watches its ranks from outside:

* the launcher sets `STADI_HEARTBEAT_DIR` (a private folder) and `STADI_PHASE_TIMEOUT`
  (`--stadi_timeout`) for its ranks;
* each rank runs a daemon thread that rewrites `rank-<RANK>` in that folder every
  `min(1 s, timeout / 4)`: its pid, its current phase, when the phase began and the time of
  the beat; `phase()` names the phase (`process-group`, `load`, `<STADI phase> step <n>`,
  `decode`, `save`, `profile-cache write`, `cleanup`, `idle`);
* work reports progress (`progress()`): every block of the pipeline's models (transformer blocks,
  VAE decoder blocks, text-encoder layers) reports as it starts (`watch_progress`), and so does a
  phase change; while loading, saving and cleaning up (`PROCESS_WORK_PHASES`) the beat also counts the
  process's CPU time and bytes read, and while torch.compile compiles, the CPU time of the process and
  of its compile workers (`count_process_work`); the beat carries the time of the last progress;
* the launcher's supervisor (`stadi_xdit.supervisor`) ends the launch when a rank's beat is older
  than the timeout (a stopped or wedged process) or it has made no progress for longer than the
  timeout (a live stall: a lock, a hung read), naming that rank and phase in one line. A rank that
  works slowly (a long VAE decode) keeps reporting progress and is never ended for it.

The launcher's variables are read once, when the rank starts, and taken out of its environment:
processes a rank starts (a script's own subprocesses) are not ranks of this launch. Should the
folder be deleted under the running launch (a /tmp cleaner), the next beat creates it again.

A rank that exits because a peer failed marks itself (`mark_exit("peer")`), so the launcher names
the rank that failed first, not a survivor.

`STADI_FAULT=PHASE:RANK[:HOW][,...]` injects a fault for tests: when global rank RANK enters a
phase whose name starts with PHASE, it stops itself with SIGSTOP (`stop`, the default), sleeps
forever (`sleep`: a live stall), exits with status 1 (`exit`), raises (`raise`) or works on for
twice the timeout, reporting progress, before it goes on (`slow`: slow work, not a stall);
`STADI_FAULT_STAMP=FILE` records when (and in which phase) it fired.

Standard library only; without `STADI_HEARTBEAT_DIR` nothing runs but the fault hooks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ENV_DIR = "STADI_HEARTBEAT_DIR"
ENV_TIMEOUT = "STADI_PHASE_TIMEOUT"
ENV_FAULT = "STADI_FAULT"
ENV_FAULT_STAMP = "STADI_FAULT_STAMP"
FAULT_KINDS = ("stop", "sleep", "exit", "raise", "slow")
MAX_BEAT_SECONDS = 1.0

_lock = threading.Lock()
_state = {"phase": "startup", "since": time.time(), "cause": None}
_last_progress = [0.0]  # a list: `progress()` only stores into it, no lock on the hot path
# Who else hears of progress (a STADI group's peers, through the rendezvous store: `faults.PeerWatch`),
# at most once per `_post_interval` seconds.
_listeners: dict[str, Callable[[float], None]] = {}
_post_interval = [MAX_BEAT_SECONDS]
_posted = [0.0]
_thread: threading.Thread | None = None
_folder: str | None = None  # the launcher's heartbeat folder, once `start()` has read it
_timeout = [600.0]  # the launcher's --stadi_timeout, once `start()` has read it


class InjectedFault(RuntimeError):
    """`STADI_FAULT=...:raise`: the exception a rank raises at the named phase."""


def beat_seconds(timeout: float) -> float:
    return max(0.02, min(MAX_BEAT_SECONDS, timeout / 4))


def global_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def beat_path(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"rank-{rank}"


def read_beats(folder: str | os.PathLike) -> dict[int, dict]:
    """Every rank's last heartbeat in `folder` ({global rank: record}); a file being replaced is skipped."""
    found = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        if not name.startswith("rank-") or not name[5:].isdigit():
            continue
        try:
            found[int(name[5:])] = json.loads(Path(folder, name).read_text())
        except (OSError, ValueError):
            continue
    return found


def start() -> None:
    """Start this rank's heartbeat thread (idempotent; only under a launcher that watches). The
    launcher's variables leave the environment here, so a process this rank starts is not taken
    for a rank of the launch."""
    global _thread, _folder
    folder = os.environ.pop(ENV_DIR, None)
    timeout_text = os.environ.pop(ENV_TIMEOUT, None)
    if not folder or _thread is not None:
        return
    try:
        timeout = float(timeout_text or "600")
    except ValueError:
        timeout = 600.0
    _folder, _timeout[0] = folder, timeout
    _write(folder)
    _thread = threading.Thread(target=_beat, args=(folder, beat_seconds(timeout)), name="stadi-heartbeat",
                               daemon=True)
    _thread.start()


# Phases in which no model block runs but the process itself works: loading reads and deserializes weights,
# saving encodes a PNG or a video, cleanup is the runner's teardown (compiler reset, garbage collection, process
# groups destroyed), which took past a 5 s timeout on a loaded machine. There the beat also counts the process's
# own work as progress: CPU time (well beyond what this thread spends) or bytes read since the last beat. A lock
# or a hung read spends neither, so it is still a stall.
PROCESS_WORK_PHASES = ("load", "save", "cleanup")
_MIN_CPU_SHARE = 0.05  # of the beat interval
_MIN_READ_BYTES = 1 << 16  # reading /proc/self/io itself reads a few hundred bytes each beat
# Set while torch.compile compiles (`runtime/compile.py`): inside a block's first forward no block starts for
# minutes, while this process and inductor's compile workers (its child processes) work.
_compiling = [False]
_work_thread: threading.Thread | None = None


def _process_work(descendants: bool = False) -> tuple[float, int]:
    """(CPU seconds of this process and its finished children, plus its live descendants' with `descendants`,
    bytes it has read), from os.times, /proc/<pid>/stat and /proc/self/io (0 where there is no /proc)."""
    times = os.times()
    try:
        with open("/proc/self/io") as handle:
            read = next((int(line.split()[1]) for line in handle if line.startswith("rchar:")), 0)
    except (OSError, ValueError, IndexError):
        read = 0
    own = times.user + times.system + times.children_user + times.children_system
    return own + (_descendants_cpu_seconds() if descendants else 0.0), read


def _descendants_cpu_seconds() -> float:
    """CPU seconds of this process's live descendants (inductor's compile workers), 0 without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0.0
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
            pid, parent = int(name), int(fields[1])
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(pid)
    total, pending = 0, list(children.get(os.getpid(), ()))
    while pending:
        pid = pending.pop()
        total += ticks.get(pid, 0)
        pending.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def _counts_process_work() -> bool:
    return _state["phase"] in PROCESS_WORK_PHASES or _compiling[0]


class _WorkMeter:
    """Whether the process worked (CPU time or bytes read) since the last look."""

    def __init__(self) -> None:
        self.cpu, self.read = _process_work()

    def worked(self, interval: float) -> bool:
        cpu, read = _process_work(descendants=_compiling[0])
        worked = cpu - self.cpu > _MIN_CPU_SHARE * interval or read - self.read > _MIN_READ_BYTES
        self.cpu, self.read = cpu, read
        return worked


def _beat(folder: str, interval: float) -> None:
    meter = _WorkMeter()
    while True:
        time.sleep(interval)
        if meter.worked(interval) and _counts_process_work():
            if _compiling[0]:
                # Peers wait for a compiling rank at its first exchange: they hear of its work too (the
                # rendezvous store's client serializes its operations, so this thread may post).
                progress()
            else:
                _last_progress[0] = time.time()  # loading: no peer listens yet
        _write(folder)


def count_process_work(on: bool) -> None:
    """torch.compile starts (True) or ends (False) compiling: meanwhile this process's work is progress, for the
    launcher and for peers waiting for this rank. Without the launcher's beat a small thread watches the work."""
    global _work_thread
    _compiling[0] = on
    if on and _thread is None and _listeners and _work_thread is None:
        _work_thread = threading.Thread(target=_watch_work, name="stadi-work-watch", daemon=True)
        _work_thread.start()


def _watch_work() -> None:
    interval = min(MAX_BEAT_SECONDS, _post_interval[0])
    meter = _WorkMeter()
    while True:
        time.sleep(interval)
        if meter.worked(interval) and _compiling[0]:
            progress()


def _write(folder: str) -> None:
    with _lock:
        record = {"pid": os.getpid(), "phase": _state["phase"], "since": _state["since"], "beat": time.time(),
                  "progress": max(_state["since"], _last_progress[0]), "cause": _state["cause"]}
    path = beat_path(folder, global_rank())
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    for _ in range(2):
        try:
            temp.write_text(json.dumps(record))
            os.replace(temp, path)
            return
        except FileNotFoundError:  # deleted under us (a /tmp cleaner): make it again, private, and retry
            if not _make_private_folder(folder):
                return
        except OSError:
            return  # a full disk: the supervisor reads the beat as silence


def _make_private_folder(folder: str) -> bool:
    """`folder` exists again as this user's own directory (mode 0700); False if something else holds the name."""
    import stat

    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def phase(name: str) -> None:
    """This rank now runs `name` (its time limit starts now); injected faults fire here."""
    with _lock:
        _state["phase"], _state["since"] = name, time.time()
    if _folder and _thread is not None:
        _write(_folder)
    progress()
    _maybe_fault(name)


def progress() -> None:
    """This rank is working: the supervisor measures a live stall from the last call, and a peer waiting
    for this rank keeps waiting while it hears of progress (cheap: one store; a listener call per interval)."""
    now = time.time()
    _last_progress[0] = now
    if _listeners and now - _posted[0] >= _post_interval[0]:
        _posted[0] = now
        for listener in tuple(_listeners.values()):
            listener(now)


def on_progress(key: str, listener: Callable[[float], None], interval: float) -> None:
    """Call `listener(time)` on progress, at most every `interval` seconds (one listener per `key`)."""
    _listeners[key] = listener
    _post_interval[0] = min(_post_interval[0], interval)


def watching() -> bool:
    """Whether anyone reads this rank's progress: a launcher's supervisor, or peers waiting for it."""
    return _thread is not None or bool(_listeners)


def watch_progress(modules) -> list:
    """Report `progress()` as each block of `modules` (torch modules) starts: every element of their
    `ModuleList`s (transformer blocks, VAE up-blocks and resnets, encoder layers). Returns the hook
    handles (`.remove()`); none where nobody reads progress (one process, no launcher)."""
    if not watching():
        return []
    import torch
    from torch import nn

    def on_block(_module, _inputs):
        # Inside a compiled region (a compiled block's own layers) the hook traces to nothing: no graph break
        # per layer; the block's own hook, around its compiled forward, has reported progress.
        if not torch.compiler.is_compiling():
            progress()

    handles = []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.ModuleList):
                handles.extend(block.register_forward_pre_hook(on_block) for block in sub)
    return handles


@contextlib.contextmanager
def in_phase(name: str) -> Iterator[None]:
    """`phase(name)` for the block, then back to the phase before it (with a fresh time limit)."""
    before = _state["phase"]
    phase(name)
    try:
        yield
    finally:
        with _lock:
            _state["phase"], _state["since"] = before, time.time()


def mark_exit(cause: str) -> None:
    """Say why this rank is about to exit (`peer`: a peer failed first); written at once."""
    with _lock:
        _state["cause"] = cause
    if _folder:
        _write(_folder)


def parse_faults(text: str) -> list[tuple[str, int, str]]:
    """`PHASE:RANK[:HOW],...` -> [(phase, rank, how)]; a ValueError names what is wrong."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].isdigit():
            raise ValueError(f"{ENV_FAULT} entries are PHASE:RANK[:{'|'.join(FAULT_KINDS)}], got {item!r}")
        how = parts[2] if len(parts) == 3 else "stop"
        if how not in FAULT_KINDS:
            raise ValueError(f"{ENV_FAULT}: {how!r} is not one of {', '.join(FAULT_KINDS)}")
        faults.append((parts[0], int(parts[1]), how))
    return faults


def _maybe_fault(name: str) -> None:
    text = os.environ.get(ENV_FAULT)
    if not text:
        return
    try:
        faults = parse_faults(text)
    except ValueError:
        return  # the launcher refuses a malformed value before any rank starts
    rank = global_rank()
    for fault_phase, fault_rank, how in faults:
        if fault_rank == rank and name.startswith(fault_phase):
            stamp = os.environ.get(ENV_FAULT_STAMP)
            if stamp:  # when the fault began, for tests and measurements of the time to exit
                with contextlib.suppress(OSError):
                    Path(stamp).write_text(f"{time.time():.3f} {name}")
            if how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif how == "sleep":
                while True:
                    time.sleep(3600)
            elif how == "exit":
                os._exit(1)
            elif how == "slow":
                end = time.time() + 2 * _timeout[0]
                while time.time() < end:
                    progress()
                    time.sleep(0.05)
            else:
                raise InjectedFault(f"injected fault at {name} on rank {rank}")
