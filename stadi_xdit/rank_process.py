"""How a rank process of `stadi-xdit` starts and ends.

**Start.** torchrun starts each rank as `python -u -m stadi_xdit.run TARGET ...`, a new interpreter
that imports torch, diffusers and xfuser again: about 4.5 CPU-s per rank, most of a small CPU
run's time, and the launcher has imported them all already (its checks). Without an accelerator,
the launcher forks its ranks instead: torchrun's own process handling is kept (its `Popen` object,
sessions, signals, exit statuses), but the child runs `stadi_xdit.run.main` in the forked
interpreter instead of executing a new one. With a CUDA device the ranks are executed as torchrun
does (a forked CUDA context is unusable). `STADI_RANK_START=exec|fork` chooses either; `auto`, the
default, forks only without an accelerator.

A forked rank first undoes what is the launcher's alone, so that it runs as an executed rank
would: torchrun's signal handlers, the launcher's exit handlers, its quieted log levels and its
"always speak" errors; the environment is torchrun's for that rank, the streams unbuffered (`-u`),
and the working directory first on `sys.path` (`-m`).

**End.** `exit_without_teardown`: a normal exit without the interpreter's teardown of torch, xfuser
and diffusers (about a second per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

ENV_RANK_START = "STADI_RANK_START"
RANK_STARTS = ("auto", "fork", "exec")
RANK_MODULE = "stadi_xdit.run"

# What the launcher changed for itself alone (`undo` callables), undone in a forked rank.
_LAUNCHER_ONLY: list[Callable[[], None]] = []


def launcher_only(undo: Callable[[], None]) -> None:
    """Register how to undo a setting that is the launcher's alone (a log level, a handler)."""
    _LAUNCHER_ONLY.append(undo)


def rank_start() -> str:
    """`fork` or `exec`: `STADI_RANK_START`, where `auto` (or unset) forks only without an accelerator.
    ValueError names a bad value."""
    choice = os.environ.get(ENV_RANK_START, "auto").strip() or "auto"
    if choice not in RANK_STARTS:
        raise ValueError(f"{ENV_RANK_START}={choice!r}: choose one of {', '.join(RANK_STARTS)}")
    if choice != "auto":
        return choice
    if not hasattr(os, "fork"):
        return "exec"
    import torch

    accelerator = getattr(torch, "accelerator", None)
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return "exec" if has_device else "fork"


def fork_ranks(rank_main: Callable[[list[str]], None]) -> Callable[[], None]:
    """Make torchrun fork the ranks that run `python -u -m stadi_xdit.run ...` into `rank_main(args)`,
    in this process only. Returns the undo."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    original = subprocess_handler.Popen

    class ForkedRank(_ForkedRankPopen):
        main = staticmethod(rank_main)

    subprocess_handler.Popen = ForkedRank

    def restore() -> None:
        subprocess_handler.Popen = original

    return restore


def rank_args(args: Sequence[str]) -> list[str] | None:
    """The arguments of `stadi_xdit.run` in a torchrun command `python -u -m stadi_xdit.run ...`, else None."""
    args = list(args)
    if len(args) >= 4 and args[1:4] == ["-u", "-m", RANK_MODULE]:
        return args[4:]
    return None


class _ForkedRankPopen(subprocess.Popen):
    """A `Popen` whose child is a fork of this process running `main(args)` (when the command is a
    `stadi_xdit.run` rank; any other command is executed as usual). Waiting, polling, signals and
    the exit status are `Popen`'s own: the child is this process's child either way."""

    main: Callable[[list[str]], None]

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        arguments = rank_args(args) if isinstance(args, (list, tuple)) and not shell else None
        if arguments is None or preexec_fn is not None or cwd is not None:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                                          startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread,
                                          c2pwrite, errread, errwrite, *rest)
        new_session = bool(rest[5])  # start_new_session, in every Python from 3.10
        _flush_all()  # else the child would write this process's buffered output again
        pid = os.fork()
        if pid == 0:  # the rank; it never returns
            status = 1
            try:
                _become_a_rank(env, new_session, (p2cread, c2pwrite, errwrite))
                type(self).main(arguments)
                status = 0
            except SystemExit as stop:
                status = _exit_status(stop)
            except KeyboardInterrupt:  # as Python ends on an uncaught Ctrl-C: killed by SIGINT
                import signal

                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _flush_all()
                os.kill(os.getpid(), signal.SIGINT)
            except Exception:  # noqa: BLE001  (as Python reports an uncaught error: traceback, status 1)
                sys.excepthook(*sys.exc_info())
            finally:
                exit_without_teardown(status)
        self.pid = pid
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)


def _become_a_rank(env, new_session: bool, stdio: tuple[int, int, int]) -> None:
    """In the forked child: undo what is the launcher's, as an executed `python -u -m` rank starts."""
    import atexit
    import signal

    if new_session:
        os.setsid()
    for fd, target in zip(stdio, (0, 1, 2)):
        if fd != -1 and fd != target:
            os.dup2(fd, target)
    # Signals as a new Python has them: torchrun's agent handlers and the launcher's job control gone.
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGTSTP", "SIGCONT", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    atexit._clear()  # the launcher's exit handlers are not the rank's
    if env is not None:
        os.environ.clear()
        os.environ.update({os.fsdecode(key): os.fsdecode(value) for key, value in env.items()})
    sys.stdout, sys.stderr = _unbuffered(sys.stdout, 1), _unbuffered(sys.stderr, 2)
    sys.path[0] = os.getcwd()  # `python -m`'s first path entry
    sys.modules.pop("__mp_main__", None)
    from stadi_xdit.cli_errors import speak_as_a_rank

    speak_as_a_rank()
    while _LAUNCHER_ONLY:
        _LAUNCHER_ONLY.pop()()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))  # torchrun's per-rank count, not the launcher's


def _unbuffered(stream, fd: int):
    """A text stream on `fd` writing through to it, as `python -u` makes stdout and stderr."""
    import io

    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=getattr(stream, "encoding", None),
                            errors=getattr(stream, "errors", None), write_through=True)


def _exit_status(stop: SystemExit) -> int:
    """The status Python gives a process ended by this SystemExit (a message is printed, status 1)."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    print(stop.code, file=sys.stderr)
    return 1


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):  # a closed pipe: nothing left to deliver
        pass


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)


def exit_without_teardown(status: int) -> NoReturn:
    """End this process as a normal exit would (its other threads joined, exit handlers run, output
    flushed), but skip the interpreter's teardown of the torch, xfuser and diffusers modules: about a
    second per process, when a launch has nothing left to do."""
    import atexit
    import logging
    import threading

    # A normal exit's order: threading's own exit hooks first (concurrent.futures' tell their idle
    # workers to stop: inductor's compile pool is one), then every non-daemon thread joined, then the
    # exit handlers (logging's flush among them). Joining first would wait on idle pool workers forever.
    threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    _flush_all()
    os._exit(status)
