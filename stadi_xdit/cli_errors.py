"""One-line command-line errors, printed once per launch. Pure standard library (no torch).

argparse prints its usage block before the error; a user who mistyped one flag wants the one line
that names it. Under torchrun every rank parses the same arguments, so only rank 0 speaks and the
others exit with the same status in silence.
"""

from __future__ import annotations

import argparse
import os
import sys
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
