"""`StadiConfig`: every STADI setting, validated before any process group exists. No torch here.

The fields' metadata is the one source of truth for the settings: the `--stadi_*` flags, the
`StadiArgs` fields and the config-file keys are all generated from it (`SETTINGS`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import reprlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from stadi_xdit.paths import read_regular_file
from stadi_xdit.planner.plan_types import MODES
from stadi_xdit.planner.replan import REPLAN_MODES
from stadi_xdit.planner.validation import MAX_RANKS, MAX_STRIDE_LIMIT
from stadi_xdit.topology import Topology, check_stadi_degree

# --stadi_kv_dtype: storage of the stale K/V (runtime/kv.py maps the names to torch dtypes).
KV_DTYPES = ("auto", "bfloat16", "float16")
TIMINGS = ("wall", "work")

# A week: far beyond any denoising run, and small enough for every backend's millisecond timers
# (gloo and NCCL overflow on values like 1e300).
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0
# The timeout tells a stalled peer from a slow one, so it must exceed any healthy wait: with 0.1 s (then
# accepted) two healthy ranks blamed each other for one slow step. 5 s also covers the profile cache's
# bounded lock wait (2 s) and the launcher's heartbeat (one beat a second), and is whole milliseconds for
# the backends (1e-9 s became a 0 ms socket timeout that failed the rendezvous with a traceback).
MIN_TIMEOUT_SECONDS = 5.0
# Longest repr() an error line shows of a value; a 5000-digit number or a huge list is cut.
MAX_SHOWN_CHARS = 120
# Largest settings file read: a few hundred bytes hold every setting; a 200 MB file is not one.
MAX_CONFIG_BYTES = 1 << 20
# Largest --stadi_emulate_slowdown / --stadi_emulate_shift factor: a rank 1000x slower is far past any
# card mix, and a larger factor's sleep can overflow time.sleep.
MAX_EMULATED_SLOWDOWN = 1000.0


def setting(default: Any, flag: str, kind: str, help: str, **extra: Any) -> Any:
    """A StadiConfig field with its CLI flag, value kind and help. Kinds: bool, choice, int, count (an optional
    int), counts ("4,2"), float, floats ("1,0.5"), path, text."""
    return field(default=default, metadata={"flag": flag, "kind": kind, "help": help, **extra})


def parse_floats(text: str | Sequence[float] | None, flag: str) -> tuple[float, ...] | None:
    """'1,0.5' -> (1.0, 0.5); the error names the flag."""
    if text is None or (isinstance(text, str) and text.strip() == ""):
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    if not items:
        raise ValueError(f"{flag} needs one value per rank, got an empty list")
    try:
        values = tuple(_as_float(item) for item in items)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be comma-separated numbers, got {shown_value(text)}") from None
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{flag} values must be finite and > 0, got {shown_value(text)}")
    return values


def parse_counts(text: str | Sequence[int] | None, flag: str) -> tuple[int, ...] | None:
    """'4,2' -> (4, 2): integers in [1, MAX_RANKS], at most MAX_RANKS of them; the error names the flag."""
    if text is None or (isinstance(text, str) and text.strip() == ""):
        return None
    items = [item.strip() for item in text.split(",")] if isinstance(text, str) else list(text)
    valid = 0 < len(items) <= MAX_RANKS and all(
        (isinstance(item, str) and re.fullmatch(r"\d{1,4}", item))
        or (isinstance(item, int) and not isinstance(item, bool)) for item in items)
    values = tuple(int(item) for item in items) if valid else ()
    if not values or any(not 1 <= value <= MAX_RANKS for value in values):
        raise ValueError(f"{flag} must be comma-separated integers in [1, {MAX_RANKS}] (one group size per STADI "
                         f"member, in rank order), got {shown_value(text)}")
    return values


def _as_float(item: Any) -> float:
    """float(item), with ints too large for a float (10**400) as inf, so the range check names them."""
    try:
        return float(item)
    except OverflowError:
        return math.inf if item > 0 else -math.inf


def _normalize_shift(text: object) -> str | None:
    """'10:1,2' (from base step 10, factors 1 and 2) -> '10:1,2'; the error names the flag."""
    if not isinstance(text, str) or not text.strip():
        return None if text is None or isinstance(text, str) else _bad_shift(text)
    step, colon, factors = text.strip().partition(":")
    if not colon or not re.fullmatch(r"\d{1,4}", step.strip()):
        _bad_shift(text)
    values = parse_floats(factors, "--stadi_emulate_shift")
    if values is None or any(not 1 <= k <= MAX_EMULATED_SLOWDOWN for k in values):
        _bad_shift(text)
    return f"{int(step)}:" + ",".join(f"{k:g}" for k in values)


def _bad_shift(text: object) -> None:
    raise ValueError(f"--stadi_emulate_shift must be STEP:k0,k1,... (a base step, then one slowdown factor "
                     f"in [1, {MAX_EMULATED_SLOWDOWN:g}] per rank), got {text!r}")


@dataclass(frozen=True)
class StadiConfig:
    """STADI as one more parallel strategy of xDiT; `use_stadi=True` is the only required switch."""

    use_stadi: bool = setting(False, "--use_stadi", "bool",
                              "Run STADI on the ranks of each CFG branch (replaces data parallelism).")
    mode: str = setting("full", "--stadi_mode", "choice",
                        "uniform: equal bands (patch parallelism); spatial: bands by speed; "
                        "full: bands by speed x stride and fewer steps on slow ranks.", choices=MODES)
    exact: bool = setting(False, "--stadi_exact", "bool",
                          "Every step synchronous with stride 1: output equals one process.")
    max_stride: int = setting(2, "--stadi_max_stride", "int",
                              f"Largest step stride of a slow rank (1..{MAX_STRIDE_LIMIT}).")
    tolerance: float = setting(0.02, "--stadi_tolerance", "float",
                               "Accept a predicted slowdown this large for a smaller sync period.")
    speeds: tuple[float, ...] | None = setting(None, "--stadi_speeds", "floats",
                                               "Comma-separated relative speeds per rank; skips measurement.")
    emulate_slowdown: tuple[float, ...] | None = setting(
        None, "--stadi_emulate_slowdown", "floats",
        "Testing aid: comma-separated slowdown factor per rank (1 = full speed).")
    emulate_shift: str | None = setting(
        None, "--stadi_emulate_shift", "text",
        "Testing aid: STEP:k0,k1,... emulates these slowdown factors from base step STEP on "
        "(a load change mid-call; before it, --stadi_emulate_slowdown or full speed).")
    timing: str = setting("wall", "--stadi_timing", "choice",
                          "What a forward's measured cost is: wall (the rank's elapsed time net of waits, other "
                          "tenants' load included, what STADI balances) or work (the rank's own work: CPU time "
                          "of its compute thread plus any emulated slowdown; on CUDA the same as wall). work "
                          "makes CPU tests and emulated benchmarks immune to co-tenants.", choices=TIMINGS)
    profile_cache: str | None = setting(None, "--stadi_profile_cache", "path",
                                        "JSON file to store and reuse measured speeds.")
    timeout_seconds: float = setting(600.0, "--stadi_timeout", "float",
                                     "Seconds before a stalled or dead peer makes the run fail.")
    kv_dtype: str = setting("auto", "--stadi_kv_dtype", "choice",
                            "Storage type of the stale K/V (auto: as computed; bfloat16/float16 halve the "
                            "K/V store and its exchange when computing in float32). Refused with "
                            "--stadi_exact, which keeps no stale K/V.", choices=KV_DTYPES)
    memory_budget: tuple[float, ...] | None = setting(
        None, "--stadi_memory_budget", "floats",
        "Comma-separated GiB per rank that the displaced K/V store may hold; with --stadi_kv_dtype auto a "
        "store that does not fit is narrowed (bfloat16), else refused in one line. Default: the free device "
        "memory on CUDA, unchecked on CPU.")
    # Default `calls` (docs/benchmarks.md, adaptive section; docs/method.md, cost models and the noise
    # floor): later calls of a pipeline start from remembered cost models and reach a fixed plan.
    replan: str = setting("calls", "--stadi_replan", "choice",
                          "off: plan once per call from its own warmup; calls: a pipeline remembers each "
                          "rank's cost model (fixed + per-row cost, with its noise), so the next call warms up "
                          "on elastic bands and its plan moves only on gains beyond the noise; sync: also "
                          "re-plan at sync points when the load changes. With --stadi_speeds, off and calls "
                          "run alike (bit for bit).", choices=REPLAN_MODES)
    degree: int | None = setting(None, "--stadi_degree", "count",
                                 "Ranks per CFG branch; launchers start degree x CFG processes "
                                 "(default: every rank of the launch).")
    groups: tuple[int, ...] | None = setting(
        None, "--stadi_groups", "counts",
        "Comma-separated sizes of the STADI members' Ulysses groups, in rank order (4,2: a member of 4 ranks, then "
        "one of 2; nodes of different sizes). Each member gets one band and one stride; its band's tokens and heads "
        "are split over its ranks. Equal sizes are --ulysses_degree. Default: one rank per member.")

    def __post_init__(self) -> None:
        # Every construction path (flags, files, xDiT's runner dict) ends here: a dict's "false" or
        # b"1,2" must fail by type, not be read as True or as three bytes.
        _check_types({name: getattr(self, name) for name in SETTINGS}, where="")
        # Accept the CLI's string forms so configs built from flags or files validate the same way.
        object.__setattr__(self, "speeds", parse_floats(self.speeds, "--stadi_speeds"))
        object.__setattr__(self, "emulate_slowdown", parse_floats(self.emulate_slowdown, "--stadi_emulate_slowdown"))
        object.__setattr__(self, "memory_budget", parse_floats(self.memory_budget, "--stadi_memory_budget"))
        object.__setattr__(self, "groups", parse_counts(self.groups, "--stadi_groups"))
        for name, meta in SETTINGS.items():  # --stadi_mode, --stadi_replan, --stadi_kv_dtype, --stadi_timing
            value = getattr(self, name)
            if meta["kind"] == "choice" and value not in meta["choices"]:
                raise ValueError(f"{meta['flag']} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if (isinstance(self.max_stride, bool) or not isinstance(self.max_stride, int)
                or not 1 <= self.max_stride <= MAX_STRIDE_LIMIT):
            raise ValueError(f"--stadi_max_stride must be an integer in [1, {MAX_STRIDE_LIMIT}] "
                             f"(the planner's limit), got {shown_value(self.max_stride)}")
        if not (_is_number(self.tolerance) and 0 <= self.tolerance < 1):
            raise ValueError(f"--stadi_tolerance must be a number in [0, 1), "
                             f"got {shown_value(self.tolerance)}")
        if not (_is_number(self.timeout_seconds)
                and MIN_TIMEOUT_SECONDS <= self.timeout_seconds <= MAX_TIMEOUT_SECONDS):
            raise ValueError(f"--stadi_timeout must be a number of seconds in [{MIN_TIMEOUT_SECONDS:g}, "
                             f"{MAX_TIMEOUT_SECONDS:.0f}], got {shown_value(self.timeout_seconds)}")
        if self.emulate_slowdown is not None and any(not 1 <= k <= MAX_EMULATED_SLOWDOWN
                                                     for k in self.emulate_slowdown):
            raise ValueError(f"--stadi_emulate_slowdown factors must be in [1, {MAX_EMULATED_SLOWDOWN:g}] "
                             f"(1 = full speed), got {shown_value(self.emulate_slowdown)}")
        if self.emulate_shift is not None:
            object.__setattr__(self, "emulate_shift", _normalize_shift(self.emulate_shift))
        # Settings that a combination leaves without effect are refused, not accepted without a word.
        if self.timing != "wall" and self.speeds is not None:
            raise ValueError(f"--stadi_timing {self.timing} has no effect with --stadi_speeds (nothing is "
                             "timed); drop one of them")
        for flag, value in (("--stadi_kv_dtype", None if self.kv_dtype == "auto" else self.kv_dtype),
                            ("--stadi_memory_budget", self.memory_budget)):
            if value is not None and self.exact:
                shown = value if isinstance(value, str) else ",".join(f"{v:g}" for v in value)
                raise ValueError(f"{flag} {shown} has no effect with --stadi_exact (exact mode keeps no stale "
                                 "K/V); drop one of them")
        if self.degree is not None and (isinstance(self.degree, bool) or not isinstance(self.degree, int)
                                        or not 1 <= self.degree <= MAX_RANKS):
            raise ValueError(f"--stadi_degree must be an integer in [1, {MAX_RANKS}], "
                             f"got {shown_value(self.degree)}")
        if self.groups is not None and self.degree is not None and self.degree != len(self.groups):
            raise ValueError(f"--stadi_degree {self.degree} disagrees with --stadi_groups "
                             f"{','.join(map(str, self.groups))} ({len(self.groups)} members)")
        if self.profile_cache is not None and not self.profile_cache.strip():
            raise ValueError("--stadi_profile_cache must be a file path, got an empty string")
        if self.profile_cache is not None and "\0" in self.profile_cache:
            raise ValueError(f"--stadi_profile_cache must be a file path, got one holding a NUL byte: "
                             f"{shown_value(self.profile_cache)}")

    @property
    def emulated_shift(self) -> tuple[int, tuple[float, ...]] | None:
        """``--stadi_emulate_shift`` as (first base step, factors per rank), or None."""
        if not self.emulate_shift:
            return None
        step, _, factors = self.emulate_shift.partition(":")
        return int(step), parse_floats(factors, "--stadi_emulate_shift")

    def emulated_factor(self, rank: int, base_step: int) -> float:
        """The slowdown factor this rank emulates at ``base_step`` of the full timestep grid."""
        shift = self.emulated_shift
        if shift is not None and base_step >= shift[0]:
            return shift[1][rank]
        return self.emulate_slowdown[rank] if self.emulate_slowdown else 1.0

    @property
    def effective_max_stride(self) -> int:
        return 1 if self.exact or self.mode != "full" else self.max_stride

    def check_world(self, stadi_world_size: int) -> None:
        """`--stadi_degree` and the per-rank lists must match the number of ranks in one STADI group."""
        check_stadi_degree(self.degree, stadi_world_size)
        shift = self.emulated_shift[1] if self.emulate_shift else None
        for flag, values in (("--stadi_speeds", self.speeds), ("--stadi_emulate_slowdown", self.emulate_slowdown),
                             ("--stadi_emulate_shift", shift), ("--stadi_memory_budget", self.memory_budget)):
            if values is not None and len(values) != stadi_world_size:
                raise ValueError(f"{flag} has {len(values)} values but the STADI group has {stadi_world_size} ranks")

    @property
    def strategy_label(self) -> str:
        """`stadi-full`, `stadi-spatial-exact`, ...: what output names carry, so that runs of different
        strategies into one folder never write the same file."""
        return f"stadi-{self.mode}" + ("-exact" if self.exact else "")

    def output_label(self, torch_compile: bool, topology: Topology | None = None) -> str:
        """The strategy, then `_tc` with --use_torch_compile (as xDiT's names carry `tc_True`) and the topology's
        group label (`_u2`, `_g2-1`): compiled and eager runs, flat and grouped ones, into one folder never share
        a name."""
        return self.strategy_label + ("_tc" if torch_compile else "") + (topology.group_label if topology else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "STADI config") -> StadiConfig:
        """Validate a parsed file or dict; every error is one line naming the flag or key."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a mapping of settings (e.g. {{\"mode\": \"full\"}}), "  # noqa: TRY004
                             f"got {type(data).__name__}")
        unknown = sorted(shown_key(key) for key in set(data) - set(FLAGS))
        if unknown:
            raise ValueError(f"unknown STADI config keys: {', '.join(unknown)} (known: {', '.join(FLAGS)})")
        _check_types(data)  # a file's `exact: "yes"` must not silently switch exact mode on
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "STADI config") -> StadiConfig:
        try:
            data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_int=_json_int)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from None
        except RecursionError:  # e.g. 100000 nested lists: json recurses once per level
            raise ValueError(f"{source} nests too deeply to be a STADI config") from None
        return cls.from_dict(data, source)

    def to_yaml(self) -> str:
        """The config as a YAML mapping (same keys as `to_dict`); `from_yaml` reads it back."""
        import yaml  # pyyaml is a dependency; imported here to keep `import stadi_xdit.config` light

        data = {k: list(v) if isinstance(v, tuple) else v for k, v in self.to_dict().items()}
        return yaml.safe_dump(data, sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str, source: str = "STADI config") -> StadiConfig:
        """Parse and validate a YAML mapping; wrong types fail like bad values, naming the flag."""
        import yaml

        try:
            data = yaml.load(text, Loader=_strict_yaml_loader())
        except yaml.YAMLError as error:
            raise ValueError(f"{source} is not valid YAML: {' '.join(str(error).split())}") from None
        except RecursionError:  # e.g. 100000 nested lists: the YAML composer recurses once per level
            raise ValueError(f"{source} nests too deeply to be a STADI config") from None
        return cls.from_dict({} if data is None else data, source)

    @classmethod
    def from_file(cls, path: str | Path) -> StadiConfig:
        """A `.json`, `.yaml` or `.yml` file; unreadable files fail with one line naming the path."""
        if not isinstance(path, (str, os.PathLike)):  # xDiT's runner dict can hold anything
            raise ValueError(  # noqa: TRY004 (one exception type for every bad input)
                f"--stadi_config_file must be a file path, got {shown_value(path)} ({type(path).__name__})")
        if "\0" in os.fspath(path):
            raise ValueError(f"--stadi_config_file must be a file path, got one holding a NUL byte: "
                             f"{shown_value(os.fspath(path))}")
        path = Path(path)
        source = f"STADI config file {str(path)!r}"
        try:
            size = os.stat(path).st_size
            if size > MAX_CONFIG_BYTES:
                raise ValueError(f"{source} is {size} bytes, more than a settings file can be "
                                 f"({MAX_CONFIG_BYTES} bytes at most)")
            text = read_regular_file(path, limit=MAX_CONFIG_BYTES + 1).decode("utf-8")
            if len(text.encode("utf-8")) > MAX_CONFIG_BYTES:  # it grew while being read
                raise ValueError(f"{source} is more than {MAX_CONFIG_BYTES} bytes, more than a settings file can be")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
            raise ValueError(f"cannot read {source}: {reason}") from None
        if path.suffix.lower() == ".json":
            return cls.from_json(text, source)
        if path.suffix.lower() in (".yaml", ".yml"):
            return cls.from_yaml(text, source)
        raise ValueError(f"{source} must end in .json, .yaml or .yml")


# Field -> the CLI flag that sets it (and the kind of value), from the fields' metadata.
SETTINGS = {f.name: f.metadata for f in fields(StadiConfig)}
FLAGS = {name: meta["flag"] for name, meta in SETTINGS.items()}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # Any int is finite; math.isfinite(10**400) would raise OverflowError instead.
    return _is_real(value) and (isinstance(value, int) or math.isfinite(value))


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "choice":
        return isinstance(value, str)
    if kind in ("path", "text"):
        return value is None or isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "counts":  # "4,2" or [4, 2]
        return value is None or isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if kind == "count":  # an optional int
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if kind == "float":  # NaN/inf pass here and fail the value check, which names the range
        return _is_real(value)
    # per-rank lists: "1,0.5" or [1, 0.5]
    return value is None or isinstance(value, str) or (
        isinstance(value, (list, tuple)) and all(_is_real(v) for v in value))


def _check_types(data: dict[str, Any], where: str = " in the config") -> None:
    """Types a config can get wrong that the value checks would not name (or would accept)."""
    for key, value in data.items():
        meta = SETTINGS[key]
        if not _type_ok(meta["kind"], value):
            type_name = "int" if isinstance(value, _HugeInt) else type(value).__name__
            raise ValueError(f"{meta['flag']} has the wrong type{where}: {shown_value(value)} ({type_name})")


def shown_value(value: Any) -> str:
    """repr() for one error line: cut when long, and sized when repr() itself fails (a 5000-digit int
    is past Python's int-to-text limit; a 100000-deep list past the recursion limit)."""
    if isinstance(value, _HugeInt):
        return repr(value)
    if isinstance(value, int) and value.bit_length() > 4 * MAX_SHOWN_CHARS:
        return f"an integer of about {int(value.bit_length() * math.log10(2))} digits"
    try:
        text = _BOUNDED_REPR.repr(value)  # bounded work: a few items per level, a few levels deep
    except (ValueError, RecursionError, MemoryError):
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."


def _bounded_repr() -> reprlib.Repr:
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxlist, shown.maxtuple, shown.maxdict, shown.maxset = 3, 8, 8, 8, 8
    shown.maxstring = shown.maxother = shown.maxlong = MAX_SHOWN_CHARS
    return shown


_BOUNDED_REPR = _bounded_repr()


class _HugeInt(int):
    """Stand-in for a file's integer past Python's int-to-text limit (4300 digits): int() raises a
    message naming neither key nor file, so the setting's own check refuses this one by name."""

    digits: int

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"

    __str__ = __repr__  # int's own str() would hit the very limit this stands in for


def _huge_int(text: str) -> _HugeInt:
    """A `_HugeInt` of the sign of `text` and far beyond every setting's range (10**4300)."""
    digits = sum(char.isdigit() for char in text)
    value = _HugeInt(-(10 ** 4300) if text.lstrip().startswith("-") else 10 ** 4300)
    value.digits = digits
    return value


def _json_int(text: str) -> int:
    """A JSON integer; one past Python's digit limit becomes a `_HugeInt`."""
    try:
        return int(text)
    except ValueError:
        return _huge_int(text)


def shown_key(key: Any) -> str:
    """A config key as one line shows it: as written, or repr() when it holds a newline or other control."""
    text = str(key)
    return text if text.isprintable() else repr(text)


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({shown_key(key) for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"STADI config sets {', '.join(duplicates)} more than once")
    return dict(pairs)


# YAML 1.1 reads `5e-1` (no dot) as a string; YAML 1.2 and every other config format read a number.
_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


@functools.cache
def _strict_yaml_loader() -> type:
    """SafeLoader that refuses duplicate keys and reads exponent floats like `5e-1` as numbers."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            # An alias re-uses a node; nested aliases expand exponentially (a 300-byte file held
            # gigabytes). No STADI setting needs one.
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a "
                                                  "STADI config", event.start_mark)
            node = super().compose_node(parent, index)
            return node

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key_node, deep=deep) for key_node, _ in node.value]
            hashable = [key for key in keys if isinstance(key, (str, int, float, bool)) or key is None]
            duplicates = sorted({shown_key(key) for key in hashable if hashable.count(key) > 1})
            if duplicates:
                raise ValueError(f"STADI config sets {', '.join(duplicates)} more than once")
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node):
            # Past Python's 4300-digit limit: a `_HugeInt`, refused by the setting's check by name.
            try:
                return super().construct_yaml_int(node)
            except ValueError:
                return _huge_int(str(node.value))

    StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
    StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))
    return StrictLoader
