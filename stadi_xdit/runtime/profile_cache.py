"""The speed cache behind --stadi_profile_cache: measured rank speeds, reused by later launches.

Why it looks like this:

* Key. `profile_key` hashes only the model's *public* config (keys not starting with "_") as
  canonical JSON. diffusers adds private keys such as `_use_default_values`, a list built from a
  set whose order changes with PYTHONHASHSEED; hashing them made every launch miss the cache and
  append a new entry forever.
* File format. One UTF-8 JSON object, `{"stadi_profile_cache": 1, "entries": {key: entry}}`, written
  with sorted keys so diffs stay readable; the first field marks the file as ours. An entry is
  `[speed of rank 0, speed of rank 1, ...]`, each speed a finite number > 0, or
  `{"speeds": [...], "memory": {...}}`, where the memory is the cost-model evidence of the run
  (`planner.calls.CallMemory.to_json`: per rank and band size, samples, time and spread) that the
  next launch starts from. Every field is validated (`CallMemory.from_json`: finite, in range, one
  value per rank, integer rows >= 1, strides <= 16). The file is shared by every run that names it,
  so one bad entry must never break the others: `load` ignores an invalid entry (one warning line)
  and the next `store` drops invalid entries from the file (one warning line). A file of the
  earlier form, `{key: entry}` with every key a profile key, is read and rewritten in this one.
* Only our own files are written. A file that is neither (a model's `config.json`, a benchmark's
  `results.json`), one larger than `MAX_CACHE_BYTES`, and any path inside a model folder (a
  folder with `model_index.json`, or with a `config.json` beside weights) or the Hugging Face
  cache is refused: `check_cache_path` before launch, in one line; `load`/`store` with one warning,
  leaving the file untouched.
* Quarantine. A file that is not a JSON object at all (garbage, a top-level list/null/number,
  non-UTF-8 bytes, empty) is renamed to `<name>.corrupt-<UTC timestamp>[-n]` beside it, never
  overwritten: it may be a user's file given by mistake, or evidence of a bug.
* Locking. Writers from several processes (ranks, concurrent launches) serialise their
  read-modify-write with an exclusive `fcntl.flock` on the sidecar `<path>.lock` (left in place:
  deleting it would let two writers lock different inodes) and publish with a temp file in the
  same directory plus `os.replace`, so a reader sees the old file or the new one, never half of
  one; that is why `load` reads without a lock. Quarantining renames under the same lock, so it
  cannot move aside a file that a writer has just repaired.
* Failures. The cache is an optimisation: every problem becomes one line on stderr starting with
  "stadi: warning:" and `None`/`False`, never an exception after the run's compute is done.
  `check_cache_path` is the one check that raises, before any process group starts.

Standard library only: it is imported by launchers and tests that must not pay for torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import numbers
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stadi_xdit.paths import WEIGHT_SUFFIXES, is_inside, is_same_file, read_regular_file
from stadi_xdit.planner.validation import MIN_RELATIVE_SPEED
from stadi_xdit.runtime import heartbeat

__all__ = ["ProfileCache", "check_cache_path", "model_files_holding", "profile_key"]

FLAG = "--stadi_profile_cache"
FORMAT_FIELD, FORMAT_VERSION = "stadi_profile_cache", 1
# Thousands of entries with their memories fit; parsing a larger JSON file holds the GIL long enough to
# starve the rank's heartbeat (a 300 MB file did), and no cache grows that large.
MAX_CACHE_BYTES = 8 << 20
_KEY_SHAPE = re.compile(r".+-[0-9a-f]{16}-\d+x\d+-\[.*\]", re.DOTALL)  # what `profile_key` returns
_DIGEST_CHARS = 16  # 64 bits of sha256: collisions between model configs are not a concern
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


def _warn(message: str) -> None:
    """One line on stderr; logging/warnings would add a second line or depend on configuration."""
    sys.stderr.write(f"stadi: warning: {_one_line(message)}\n")
    sys.stderr.flush()


def _one_line(text: object) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


# ----------------------------------------------------------------------------------------------
# Key


def _canonical(value: Any) -> Any:
    """A JSON-ready value that is the same in every process for the same input."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        # NaN/inf are not JSON; their repr is stable.
        return number if math.isfinite(number) else f"float:{number!r}"
    if isinstance(value, Mapping):
        return {_mapping_key_text(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        # Set order depends on the hash seed: sort by each element's canonical text.
        return sorted((_canonical(item) for item in value), key=_canonical_text)
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    # dtypes, enums, paths...: their repr, minus memory addresses that differ between launches.
    return f"{type(value).__qualname__}:{_MEMORY_ADDRESS.sub('', repr(value))}"


def _mapping_key_text(key: Any) -> str:
    return key if isinstance(key, str) else _canonical_text(_canonical(key))


def _canonical_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def profile_key(model_class: str, model_config: Mapping[str, Any], height: int, width: int,
                hardware: Sequence[Sequence[str]]) -> str:
    """The cache key of one model at one resolution on one set of devices in rank order.

    `model_config` is the transformer's config; top-level keys starting with "_" (diffusers'
    bookkeeping, e.g. `_use_default_values`, `_diffusers_version`) are left out. `hardware` holds
    one list per CFG branch, each naming every rank's device in rank order.
    """
    if isinstance(hardware, str) or any(isinstance(group, str) for group in hardware):
        raise TypeError("hardware must be a list of groups, each a list of device names")
    public = {name: value for name, value in model_config.items()
              if not (isinstance(name, str) and name.startswith("_"))}
    digest = hashlib.sha256(_canonical_text(_canonical(public)).encode()).hexdigest()[:_DIGEST_CHARS]
    devices = "|".join(",".join(group) for group in hardware)
    return f"{model_class}-{digest}-{height}x{width}-[{devices}]"


# ----------------------------------------------------------------------------------------------
# Path check


# Files a cache path may name by mistake: settings, weights, code, images (a cache is JSON).
_NOT_A_CACHE_SUFFIXES = (".yaml", ".yml", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".py", ".png")


def check_cache_path(path: str | os.PathLike, settings_file: object = None, model: object = None) -> None:
    """Refuse a cache path that can never be a file, or that is not ours to write (see the module
    docstring), before any process group starts: the cache is written at the end of every measured run,
    so it must not be the `settings_file` (--stadi_config_file), a file of `model`'s folder or of any
    model files, or a file that is plainly not a speeds cache. The most specific reason is given.

    An unwritable location is not refused: it only costs the cache, and `store` says so.
    """
    target = Path(path)
    shown = _one_line(os.fspath(path))
    if isinstance(settings_file, (str, os.PathLike)) and settings_file and is_same_file(path, settings_file):
        raise ValueError(f"{FLAG} {shown} is the --stadi_config_file: the cache would overwrite your settings; "
                         "name a separate file, e.g. speeds.json")
    if isinstance(model, str) and os.path.isdir(model) and is_inside(path, model):
        raise ValueError(f"{FLAG} {shown} lies inside the model folder {model}; name a file outside it")
    # os.path's tests, not Path's: on Python 3.11 Path.exists() raises for a name too long (ENAMETOOLONG).
    if os.path.exists(target) and target.suffix.lower() in _NOT_A_CACHE_SUFFIXES:
        raise ValueError(f"{FLAG} {shown} is an existing {target.suffix} file, not a speeds cache; name a .json file")
    if os.path.isdir(target):
        raise ValueError(f"{FLAG} {shown} is a directory; name a file, e.g. {shown}/speeds.json")
    if os.path.exists(target) and not os.path.isfile(target):  # a FIFO would block every rank's read forever
        raise ValueError(f"{FLAG} {shown} is not a regular file (a FIFO, device or socket); name a JSON file")
    inside = model_files_holding(target)
    if inside is not None:
        raise ValueError(f"{FLAG} {shown} is inside {inside}; keep the cache outside model files, "
                         "e.g. ~/.cache/stadi/speeds.json")
    if os.path.isfile(target):
        try:
            ProfileCache(target)._read_entries()
        except _ForeignFile as foreign:
            raise ValueError(f"{FLAG} {shown} {foreign}; name a new file or an existing profile cache") from None
        except (_CorruptFile, OSError):
            pass  # moved aside (corrupt) or warned about (unreadable) when used: it only costs the cache
    # The nearest existing ancestor must be a directory, or the file can never be created.
    for ancestor in target.absolute().parents:
        if os.path.exists(ancestor):
            if not os.path.isdir(ancestor):
                raise ValueError(f"{FLAG} {shown}: {_one_line(ancestor)} is not a directory")
            return


# ----------------------------------------------------------------------------------------------
# Cache file


def model_files_holding(path: Path) -> str | None:
    """What model files `path` is inside, in words ("the model folder X", "the Hugging Face cache"), or None."""
    try:
        absolute = Path(os.path.abspath(path))
        resolved = absolute.resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    hub = _hugging_face_cache()
    for candidate in dict.fromkeys((absolute, resolved)):
        if hub is not None and (candidate == hub or hub in candidate.parents):
            return f"the Hugging Face cache ({hub})"
        parts = candidate.parts
        if any(part.startswith(("models--", "datasets--")) for part in parts) and "snapshots" in parts:
            return "a Hugging Face cache snapshot"
        for folder in candidate.parents:
            if os.path.isfile(folder / "model_index.json"):
                return f"the model folder {folder}"
        folder = candidate.parent
        try:
            weights = any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(folder))
        except OSError:
            weights = False
        if weights and os.path.isfile(folder / "config.json"):
            return f"the model folder {folder}"
    return None


def _hugging_face_cache() -> Path | None:
    """The hub cache folder as huggingface_hub resolves it (HF_HUB_CACHE, HF_HOME/hub, XDG, ~/.cache)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        folder = Path(explicit)
    elif os.environ.get("HF_HOME"):
        folder = Path(os.environ["HF_HOME"]) / "hub"
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"
    try:
        return Path(os.path.abspath(folder.expanduser())).resolve()
    except (OSError, RuntimeError, ValueError):
        return None


class _CorruptFile(Exception):
    """The file exists but is not a JSON object; the message says why."""


class _ForeignFile(Exception):
    """The file is not ours (another JSON object, or too large); the message says why, after the path."""


def _speeds_problem(speeds: Any, num_ranks: int | None) -> str | None:
    """Why `speeds` is not a usable entry (None when it is): a list of finite numbers > 0, or an
    object with such a list under "speeds" (and optionally a "memory" object)."""
    memory = None
    if isinstance(speeds, Mapping):
        if set(speeds) - {"speeds", "memory"}:
            return f"unknown fields {sorted(map(str, set(speeds) - {'speeds', 'memory'}))[:5]}"
        if not isinstance(speeds.get("memory", {}), Mapping):
            return "memory is not an object"
        memory = speeds.get("memory")
        speeds = speeds.get("speeds")
    if isinstance(speeds, (str, bytes)) or not isinstance(speeds, Sequence):
        return f"not a list but {type(speeds).__name__}"
    if not speeds:
        return "empty list"
    if num_ranks is not None and len(speeds) != num_ranks:
        return f"{len(speeds)} speeds for {num_ranks} ranks"
    for speed in speeds:
        if isinstance(speed, bool) or not isinstance(speed, numbers.Real):
            return f"speed {speed!r} is not a number"
        try:
            number = float(speed)
        except (OverflowError, ValueError):
            return f"speed {speed!r} is not a finite number"
        if not math.isfinite(number) or number <= 0:
            return f"speed {speed!r} is not a finite number > 0"
    if max(speeds) > min(speeds) / MIN_RELATIVE_SPEED:
        return f"speeds {min(speeds):g} and {max(speeds):g} differ by more than {1 / MIN_RELATIVE_SPEED:g}x"
    if memory is not None:
        from stadi_xdit.planner.calls import CallMemory  # pure Python, like this module

        try:
            CallMemory.from_json(memory, num_ranks=len(speeds))
        except ValueError as error:
            return str(error)
    return None


class ProfileCache:
    """Measured speeds per `profile_key` in one JSON file; see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def load(self, key: str, num_ranks: int) -> list[float] | None:
        """The cached speeds for `key` if they are `num_ranks` finite numbers > 0, else None."""
        entry = self.load_entry(key, num_ranks)
        return None if entry is None else entry["speeds"]

    def load_entry(self, key: str, num_ranks: int) -> dict[str, Any] | None:
        """`{"speeds": [...], "memory": object or None}` for `key`, or None (see `load`)."""
        try:
            entries = self._read_entries()
        except OSError as error:
            _warn(f"cannot read profile cache {self.path}: {_os_reason(error)}; measuring speeds instead")
            return None
        except _ForeignFile as foreign:
            _warn(f"{FLAG} {self.path} {foreign}; not using it, and not writing it")
            return None
        except _CorruptFile:
            try:
                # Re-read under the writers' lock: a writer may have replaced the file meanwhile.
                with self._exclusive_lock():
                    entries = self._read_entries_quarantining_corrupt()
            except OSError as error:
                _warn(f"profile cache {self.path} is corrupt and cannot be locked to move it aside "
                      f"({_os_reason(error)}); ignoring it and leaving it untouched")
                return None
            except _ForeignFile as foreign:  # replaced meanwhile by something not ours
                _warn(f"{FLAG} {self.path} {foreign}; not using it, and not writing it")
                return None
        if entries is None or key not in entries:
            return None
        problem = _speeds_problem(entries[key], num_ranks)
        if problem is not None:
            _warn(f"ignoring profile cache entry {key} in {self.path} ({problem}); "
                  "it is measured again and replaced, and invalid entries are dropped at the next store")
            return None
        entry = entries[key]
        speeds = entry["speeds"] if isinstance(entry, Mapping) else entry
        memory = entry.get("memory") if isinstance(entry, Mapping) else None
        return {"speeds": [float(speed) for speed in speeds], "memory": memory}

    def store(self, key: str, speeds: Sequence[float], memory: Mapping[str, Any] | None = None) -> bool:
        """Record `speeds` (and the run's cost-model `memory`) for `key`; False (and one warning line)
        when it could not be written."""
        if isinstance(speeds, (str, bytes, Mapping)) or not hasattr(speeds, "__iter__"):
            values: Any = speeds
        else:
            values = list(speeds)  # also accepts tuples and arrays of speeds
        problem = _speeds_problem(values, None)
        if not isinstance(key, str) or not key:
            problem = f"key {key!r} is not a non-empty string"
        if problem is not None:
            _warn(f"not caching speeds for {key} in {self.path}: {problem}")
            return False
        inside = model_files_holding(self.path)
        if inside is not None:
            _warn(f"not caching speeds in {self.path}: it is inside {inside}")
            return False
        try:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError as error:  # an ancestor is a file: say that, not "File exists"
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", error.filename) from None
            # A named phase: under stadi-xdit a write that hangs (a wedged filesystem) ends the launch
            # naming it, instead of a peer blaming this rank for its next collective.
            with heartbeat.in_phase("profile-cache write"), self._exclusive_lock():
                try:
                    entries = self._read_entries_quarantining_corrupt()
                except _ForeignFile as foreign:
                    _warn(f"not caching speeds: {FLAG} {self.path} {foreign}; it is left as it is")
                    return False
                if entries is None:  # corrupt and could not be moved aside: never overwrite it
                    return False
                dropped = sorted(name for name, value in entries.items()
                                 if name != key and _speeds_problem(value, None) is not None)
                for name in dropped:
                    del entries[name]
                entries[key] = [float(speed) for speed in values]
                if memory is not None:
                    entries[key] = {"speeds": entries[key], "memory": dict(memory)}
                self._replace_file(entries)
        except OSError as error:
            _warn(f"cannot write profile cache {self.path}: {_os_reason(error)}; speeds not cached")
            return False
        if dropped:
            _warn(f"dropped {len(dropped)} invalid entr{'y' if len(dropped) == 1 else 'ies'} "
                  f"from profile cache {self.path}: {', '.join(dropped)}")
        return True

    # -- internals ----------------------------------------------------------------------------

    def _read_entries(self) -> dict[str, Any]:
        """The file's entries ({} when there is no file); raises _CorruptFile, _ForeignFile or OSError."""
        try:
            raw = read_regular_file(self.path, limit=MAX_CACHE_BYTES + 1)
        except FileNotFoundError:
            return {}
        if len(raw) > MAX_CACHE_BYTES:
            raise _ForeignFile(f"is larger than {MAX_CACHE_BYTES >> 20} MiB, more than a profile cache grows to")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise _CorruptFile("not UTF-8 text") from None
        except (ValueError, RecursionError) as error:
            raise _CorruptFile(f"not JSON: {error}") from None
        if not isinstance(data, dict):
            raise _CorruptFile(f"top level is {type(data).__name__}, not an object")
        if FORMAT_FIELD in data:
            if data[FORMAT_FIELD] != FORMAT_VERSION or not isinstance(data.get("entries"), dict) or len(data) != 2:
                raise _ForeignFile(f"is not a version {FORMAT_VERSION} profile cache (it has {FORMAT_FIELD}: "
                                   f"{data[FORMAT_FIELD]!r:.40} and fields {sorted(map(str, data))[:4]})")
            return data["entries"]
        # The earlier form, {key: entry}: ours only if every key is a profile key.
        foreign = [key for key in data if not (isinstance(key, str) and _KEY_SHAPE.fullmatch(key))]
        if foreign:
            raise _ForeignFile(f"is not a STADI profile cache (a JSON object with keys such as "
                               f"{', '.join(repr(k)[:40] for k in foreign[:3])})")
        return data

    def _read_entries_quarantining_corrupt(self) -> dict[str, Any] | None:
        """Under the lock: the entries, {} after moving a corrupt file aside, None if that failed."""
        try:
            return self._read_entries()
        except _CorruptFile as corrupt:
            reason = str(corrupt)
        try:
            quarantine = self._free_quarantine_path()
            os.rename(self.path, quarantine)
        except OSError as error:
            _warn(f"profile cache {self.path} is corrupt ({reason}) and could not be moved aside "
                  f"({_os_reason(error)}); ignoring it and leaving it untouched")
            return None
        _warn(f"profile cache {self.path} is corrupt ({reason}); moved it to {quarantine}, starting afresh")
        return {}

    def _free_quarantine_path(self) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        base = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        candidate, number = base, 0
        while os.path.lexists(candidate):
            number += 1
            candidate = base.with_name(f"{base.name}-{number}")
        return candidate

    @contextlib.contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        # O_NOFOLLOW: a symlink planted at the lock path must not make us create or lock its target;
        # 0600: nobody else needs to open our lock file (flock works on any descriptor of it).
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        try:
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | nofollow, 0o600)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "the lock file is a symbolic link; refusing to follow it",
                              str(self.lock_path)) from None
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # Someone else's lock file, or a read-only filesystem: flock works on a read-only
            # descriptor too (and if the file is missing there, nothing can be written anyway).
            try:
                descriptor = os.open(self.lock_path, os.O_RDONLY | nofollow)
            except OSError:
                raise error from None  # the first failure says why
        try:
            _bounded_flock(descriptor, self.lock_path)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def _replace_file(self, entries: Mapping[str, Any]) -> None:
        """Write all entries to a temp file beside the cache and rename it over the cache."""
        try:
            mode = self.path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644  # mkstemp's 0600 would hide a shared cache from other users
        descriptor, temp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                                 suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump({FORMAT_FIELD: FORMAT_VERSION, "entries": dict(entries)}, handle, indent=1, sort_keys=True,
                          allow_nan=False)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())  # the rename must not publish an empty file after a crash
            os.chmod(temp_name, mode)
            os.replace(temp_name, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise


# Longest wait for another process's lock: a stalled holder must not stall a finished run (its peers
# would blame this rank for the wait). Well below the smallest useful --stadi_timeout.
LOCK_WAIT_SECONDS = 2.0
_LOCK_POLL_SECONDS = 0.05


def _bounded_flock(descriptor: int, path: Path) -> None:
    """An exclusive flock, waiting at most `LOCK_WAIT_SECONDS`; then an OSError saying who holds it."""
    import time

    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(errno.EWOULDBLOCK, f"locked by another process for more than {LOCK_WAIT_SECONDS:g} s",
                              str(path)) from None
            time.sleep(_LOCK_POLL_SECONDS)


def _os_reason(error: OSError) -> str:
    reason = error.strerror or errno.errorcode.get(error.errno or 0, "") or str(error)
    return f"{reason} ({error.filename})" if error.filename else reason
