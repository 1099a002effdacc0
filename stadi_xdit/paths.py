"""Paths users give: output folders checked before any work starts, input files read without hanging.
Pure standard library (no torch).

A benchmark or a training run that writes its results at the end must not find out then that its
output folder cannot exist (under a regular file, in /proc, read-only): these checks create the
folder up front, or return the one-line reason why they cannot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
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
    # os.path's tests, not Path's: on Python 3.11 Path.exists() raises for a name too long (ENAMETOOLONG).
    if os.path.exists(folder) and not os.path.isdir(folder):
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
    if os.path.isdir(target):
        return f"{str(target)!r} is a folder, not a file path"
    return output_dir_problem(target.parent)


# --- writing results: atomically, with room checked first, never lost ----------------------------

def free_space_problem(folder: str | os.PathLike, needed_bytes: int) -> str | None:
    """None when `folder` (or its nearest existing ancestor) has room for `needed_bytes`; else why not."""
    probe = Path(folder).absolute()
    while not os.path.exists(probe) and probe != probe.parent:
        probe = probe.parent
    try:
        stats = os.statvfs(probe)
    except (OSError, ValueError):
        return None  # cannot tell: the write itself will say
    free = stats.f_bavail * stats.f_frsize
    if free < needed_bytes:
        return (f"{str(folder)!r} has {_size(free)} free, the output needs about {_size(needed_bytes)}")
    return None


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"  # pragma: no cover


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that pick a format by the
    name still do); when the block ends without an error it is synced and renamed over `path`.

    A reader, or a crash mid-write, sees the old file or the new one, never part of one; a failed
    write leaves no temporary behind. The folder is created if it went missing meanwhile.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".partial{target.suffix}")
    os.close(descriptor)
    temp = Path(name)
    try:
        yield temp
        if not temp.exists() or temp.stat().st_size == 0 and not _may_be_empty(target):
            raise OSError(errno.EIO, "the writer produced no data", str(target))
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())  # the rename must not publish an empty file after a crash
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a result from the user's group
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _may_be_empty(target: Path) -> bool:
    return target.suffix.lower() in (".txt", ".log", ".csv")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """`Path(path).write_bytes(data)`, atomically (see `atomic_output`)."""
    with atomic_output(path) as temp:
        temp.write_bytes(data)


def save_with_fallback(path: str | os.PathLike, write: Callable[[Path], object], what: str = "output",
                       fallback_dirs: Sequence[str | os.PathLike] | None = None) -> Path | None:
    """Write `what` with `write(temp_path)` atomically to `path`; when that fails (a full disk, the
    folder removed or made read-only mid-run), write it to the first of `fallback_dirs` (default:
    the launch folder, then the system temp folder) that works, and say where on one stderr line.

    Returns where the result is, or None (after one line saying why) when nothing could be written.
    """
    target = Path(path)
    try:
        with atomic_output(target) as temp:
            write(temp)
        return target
    except OSError as error:
        first = error
    folders = list(fallback_dirs) if fallback_dirs is not None else [os.getcwd(), tempfile.gettempdir()]
    for folder in folders:
        candidate = _free_name(Path(folder) / target.name)
        if candidate.absolute() == target.absolute():
            continue
        try:
            with atomic_output(candidate) as temp:
                write(temp)
        except OSError:
            continue
        _say(f"stadi: warning: cannot save the {what} to {target} ({_reason(first)}); saved it to {candidate} instead")
        return candidate
    _say(f"stadi: error: cannot save the {what} to {target} ({_reason(first)}), nor to {', '.join(map(str, folders))}")
    return None


def _free_name(candidate: Path) -> Path:
    number = 0
    base = candidate
    while os.path.lexists(candidate):
        number += 1
        candidate = base.with_name(f"{base.stem}-{number}{base.suffix}")
    return candidate


def _reason(error: OSError) -> str:
    return error.strerror or errno.errorcode.get(error.errno or 0, "") or str(error)


def _say(line: str) -> None:
    sys.stderr.write(" ".join(line.split()) + "\n")
    sys.stderr.flush()


def is_same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` name one existing file (hard links and symlinks included), or the
    same absolute path (for files not written yet)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return os.path.realpath(a) == os.path.realpath(b)
        except (OSError, ValueError):
            return False


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path` lies in `folder` (or is it), after resolving symlinks."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


# --- model folders: every file the pipeline will load is there, whole --------------------------

_NO_WEIGHTS = ("Tokenizer", "Scheduler", "FeatureExtractor", "Processor", "ImageProcessor")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")  # a model's weights files
_MAX_SAFETENSORS_HEADER = 100 << 20


def model_folder_problem(folder: str | os.PathLike) -> str | None:
    """None when a diffusers pipeline folder looks loadable; else why not, for one line: a broken
    `model_index.json`, a listed component without its folder or weights, a truncated safetensors
    file, a config with a negative size."""
    import json

    root = Path(folder)
    try:
        index = json.loads(read_regular_file(root / "model_index.json", limit=1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"model_index.json cannot be read ({type(error).__name__}: {_short(error)})"
    if not isinstance(index, dict):
        return "model_index.json is not a JSON object"
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        part = root / name
        if not part.is_dir():
            return f"has no {name}/ folder (model_index.json lists {name})"
        problem = _component_problem(part, str(entry[1]))
        if problem:
            return f"{name}/{problem}"
    return None


def _component_problem(part: Path, class_name: str) -> str | None:
    import json

    config = part / "config.json"
    if config.is_file():
        try:
            values = json.loads(read_regular_file(config, limit=1 << 20).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"config.json cannot be read ({type(error).__name__})"
        for key, value in sorted(values.items()) if isinstance(values, dict) else ():
            if isinstance(value, int) and not isinstance(value, bool) and value < 0 and _is_size_key(key):
                return f"config.json: {key} must be >= 0, got {value}"
    if any(word in class_name for word in _NO_WEIGHTS):
        return None
    weights = [p for p in part.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        return "has no weights file (*.safetensors or *.bin)" if config.is_file() else None
    for path in sorted(weights):
        if path.name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem:
                return f"{path.name} {problem}"
    return None


def _is_size_key(key: str) -> bool:
    return key.startswith("num_") or key.endswith(("_size", "_dim", "_channels", "_layers", "_heads"))


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """None when the file is a whole safetensors file (its header's tensors end at its end)."""
    import json
    import struct

    try:
        size = os.stat(path).st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (header_size,) = struct.unpack("<Q", head)
            if header_size > min(size - 8, _MAX_SAFETENSORS_HEADER):
                return f"is truncated or not a safetensors file ({size} bytes, header claims {header_size})"
            header = json.loads(handle.read(header_size))
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except (ValueError, UnicodeDecodeError):
        return "has a broken header (not a safetensors file)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_size + max(ends, default=0)
    if expected != size:
        return f"is truncated ({size} of {expected} bytes)" if size < expected else \
            f"has {size - expected} bytes past its last tensor"
    return None


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 120 else text[:120] + "..."


def save_figure(figure: object, path: str | os.PathLike, what: str = "plot", dpi: int = 110) -> Path | None:
    """A matplotlib figure saved with `save_with_fallback` (the format follows the file's suffix)."""
    return save_with_fallback(path, lambda temp: figure.savefig(temp, dpi=dpi), what)
