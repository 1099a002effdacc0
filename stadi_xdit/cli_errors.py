"""One-line command-line errors, printed once per launch. Pure standard library (no torch).

argparse prints its usage block before the error; a user who mistyped one flag wants the one line
that names it. Under torchrun every rank parses the same arguments, so only rank 0 speaks and the
others exit with the same status in silence.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

USAGE_ERROR = 2  # argparse's exit status for bad input
_ALWAYS_SPEAKS = False  # set by processes that are never a rank (launchers, planners, benchmarks)


class StadiInputError(ValueError):
    """A bad STADI input found inside a library call that a command line reached (e.g. xDiT's
    runner turning its dict into args); entry points print it as one line, not a traceback."""


def is_speaking_rank() -> bool:
    """False only on a non-zero rank of a multi-process launch: every other process reports the error.

    A stray RANK=1 (or RANK=abc) exported in a plain shell must not silence the only process there is,
    so both RANK and WORLD_SIZE must read as a real launch (torchrun sets both). A process that is
    never a rank (`speak_always`) speaks whatever its environment says: a launcher started inside
    a Kubernetes PyTorchJob pod inherits RANK=1 WORLD_SIZE=4.
    """
    if _ALWAYS_SPEAKS:
        return True
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    return not (rank is not None and world_size is not None and 0 < rank < world_size)


def speak_always() -> None:
    """This process is never one rank of many (the launcher): its errors are printed whatever RANK
    and WORLD_SIZE its environment holds."""
    global _ALWAYS_SPEAKS
    _ALWAYS_SPEAKS = True


def speak_as_a_rank() -> None:
    """Undo `speak_always` in a rank forked from the launcher: only rank 0 reports."""
    global _ALWAYS_SPEAKS
    _ALWAYS_SPEAKS = False


def _env_int(name: str) -> int | None:
    """The environment variable as an int, or None when unset or not an integer."""
    try:
        return int(os.environ.get(name, "").strip())
    except ValueError:
        return None


def fail(prog: str, message: str, status: int = USAGE_ERROR, always: bool = False) -> NoReturn:
    """Exit with `prog: error: message` on one line (rank 0 only, unless `always`: a process that
    is never a rank); never a traceback."""
    _say(prog, "error", message, always)
    raise SystemExit(status)


def warn(prog: str, message: str) -> None:
    """`prog: warning: message` on one line (rank 0 only); the run goes on."""
    _say(prog, "warning", message)


def _say(prog: str, kind: str, message: str, always: bool = False) -> None:
    if always or is_speaking_rank():
        sys.stderr.write(f"{prog}: {kind}: {' '.join(str(message).split())}\n")
        sys.stderr.flush()


def comma_subset(text: str, known: Sequence[str]) -> list[str]:
    """The names of the comma-separated `text`, in its order, each one of `known`; else ValueError saying
    which is unknown (or that none is named) and what is known, for the caller's one line."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown {', '.join(unknown) or '(none named)'}; known: {', '.join(known)}")
    return names


class OneLineErrors:
    """Mixin for any `argparse.ArgumentParser` subclass: errors become one line, printed once."""

    prog: str
    always_speaks = False

    def error(self, message: str) -> NoReturn:  # argparse's hook for every parse error
        fail(self.prog, message, always=self.always_speaks)


class OneLineArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (`prog: error: ...`), exit status 2.

    For single-process commands, which are never a rank: they speak whatever RANK says."""

    always_speaks = True


class _GuardedStdout(io.TextIOBase):
    """Standard output that turns a failed write (a full device, a closed pipe) into one error line."""

    def __init__(self, stream, prog: str):
        super().__init__()
        self._stream, self._prog = stream, prog
        # After the command (a logging handler may keep this object and flush it at exit, when a test's
        # captured stream is long closed): the command's status is decided, so a failure is not reported.
        self.command_running = True

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as error:
            self._lost(error)
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError) as error:
            self._lost(error)

    def _lost(self, error: Exception) -> None:
        if not self.command_running:
            return
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (what is still buffered goes nowhere at exit)
        reason = (error.strerror or errno.errorcode.get(error.errno or 0, "")) if isinstance(error, OSError) else ""
        fail(self._prog, f"cannot write to standard output ({reason or error})", status=1, always=True)


@contextlib.contextmanager
def stdout_guard(prog: str) -> Iterator[None]:
    """The command's output must reach its reader: a closed standard output, or one that fails while
    written or flushed, ends the command with one `prog: error:` line and exit status 1 (it used to be
    a traceback, or exit 0 with nothing printed)."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): print() would drop everything silently
        fail(prog, "standard output is closed; nothing could be printed", status=1, always=True)
    real = sys.stdout
    sys.stdout = guarded = _GuardedStdout(real, prog)
    try:
        yield
        sys.stdout.flush()
    finally:
        guarded.command_running = False
        if isinstance(sys.stdout, _GuardedStdout):
            sys.stdout = real
