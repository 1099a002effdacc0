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


class StadiInputError(ValueError):
    """A bad STADI input found inside a library call that a command line reached (e.g. xDiT's
    runner turning its dict into args); entry points print it as one line, not a traceback."""


def is_speaking_rank() -> bool:
    """True outside torchrun and on its rank 0: the one process that reports a shared input error."""
    return os.environ.get("RANK", "0") in ("", "0")


def fail(prog: str, message: str, status: int = USAGE_ERROR) -> NoReturn:
    """Exit with `prog: error: message` on one line (rank 0 only); never a traceback."""
    if is_speaking_rank():
        sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
        sys.stderr.flush()
    raise SystemExit(status)


class OneLineErrors:
    """Mixin for any `argparse.ArgumentParser` subclass: errors become one line, printed once."""

    prog: str

    def error(self, message: str) -> NoReturn:  # argparse's hook for every parse error
        fail(self.prog, message)


class OneLineArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (`prog: error: ...`), exit status 2."""
