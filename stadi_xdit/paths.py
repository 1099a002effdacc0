"""Paths users give: output folders checked before any work starts, input files read without hanging.
Pure standard library (no torch).

A benchmark or a training run that writes its results at the end must not find out then that its
output folder cannot exist (under a regular file, in /proc, read-only): these checks create the
folder up front, or return the one-line reason why they cannot.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_regular_file(path: str | os.PathLike, limit: int = -1) -> bytes:
    """The bytes of a regular file (at most `limit` of them when >= 0); a FIFO, device or socket
    raises OSError instead of being read (a FIFO without a writer blocks forever), a directory
    IsADirectoryError."""
    # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            return handle.read(limit)
    finally:
        os.close(descriptor)


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """None when `path` is, or now is, a writable folder; else why not, for a one-line error.

    Creating it now is the test that matters: `os.access` says yes for root where mkdir then fails
    (e.g. under /proc), and a missing parent may lie under a regular file (/dev/null/x).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        return f"{str(folder)!r} exists and is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name
        return f"cannot create the folder {str(folder)!r}: {error.strerror or error}" \
            if isinstance(error, OSError) else f"{str(folder)!r} is not a valid path"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {str(folder)!r} is not writable"
    return None


def output_file_problem(path: str | os.PathLike) -> str | None:
    """None when a file can be written at `path` (its folder is created now); else why not."""
    target = Path(path)
    if target.is_dir():
        return f"{str(target)!r} is a folder, not a file path"
    return output_dir_problem(target.parent)
