"""`StadiConfig`: every STADI setting, validated before any process group exists. No torch here."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

MODES = ("uniform", "spatial", "full")


def parse_floats(text: str | Sequence[float] | None, flag: str) -> tuple[float, ...] | None:
    """'1,0.5' -> (1.0, 0.5); the error names the flag."""
    if text is None or text == "":
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{flag} values must be finite and > 0, got {text!r}")
    return values


@dataclass(frozen=True)
class StadiConfig:
    """STADI as one more parallel strategy of xDiT; `use_stadi=True` is the only required switch."""

    use_stadi: bool = False
    mode: str = "full"  # uniform (patch parallelism) | spatial (elastic bands) | full (bands + strides)
    exact: bool = False  # every step synchronous, strides 1: equals one process
    max_stride: int = 2
    tolerance: float = 0.02
    speeds: tuple[float, ...] | None = None  # overrides measurement
    emulate_slowdown: tuple[float, ...] | None = None  # testing aid: rank i runs k_i times slower
    profile_cache: str | None = None
    timeout_seconds: float = 600.0  # a stalled rank makes the others fail after this long

    def __post_init__(self) -> None:
        # Accept the CLI's string forms so configs built from flags or files validate the same way.
        object.__setattr__(self, "speeds", parse_floats(self.speeds, "--stadi_speeds"))
        object.__setattr__(self, "emulate_slowdown", parse_floats(self.emulate_slowdown, "--stadi_emulate_slowdown"))
        if self.mode not in MODES:
            raise ValueError(f"--stadi_mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.max_stride, int) or self.max_stride < 1:
            raise ValueError(f"--stadi_max_stride must be an integer >= 1, got {self.max_stride!r}")
        if not (0 <= self.tolerance < 1):
            raise ValueError(f"--stadi_tolerance must be in [0, 1), got {self.tolerance!r}")
        if self.timeout_seconds <= 0:
            raise ValueError(f"--stadi_timeout must be > 0 seconds, got {self.timeout_seconds!r}")
        if self.emulate_slowdown is not None and any(k < 1 for k in self.emulate_slowdown):
            raise ValueError("--stadi_emulate_slowdown factors must be >= 1 (1 = full speed)")

    @property
    def effective_max_stride(self) -> int:
        return 1 if self.exact or self.mode != "full" else self.max_stride

    def check_world(self, stadi_world_size: int) -> None:
        """Per-rank lists must match the number of ranks in one STADI group."""
        for flag, values in (("--stadi_speeds", self.speeds), ("--stadi_emulate_slowdown", self.emulate_slowdown)):
            if values is not None and len(values) != stadi_world_size:
                raise ValueError(f"{flag} has {len(values)} values but the STADI group has {stadi_world_size} ranks")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StadiConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown STADI config keys: {', '.join(unknown)}")
        _check_types(data)  # a file's `exact: "yes"` must not silently switch exact mode on
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StadiConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        """The config as a YAML mapping (same keys as `to_dict`); `from_yaml` reads it back."""
        import yaml  # pyyaml is a dependency; imported here to keep `import stadi_xdit.config` light

        data = {k: list(v) if isinstance(v, tuple) else v for k, v in self.to_dict().items()}
        return yaml.safe_dump(data, sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> StadiConfig:
        """Parse and validate a YAML mapping; wrong types fail like bad values, naming the flag."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"STADI config is not valid YAML: {' '.join(str(error).split())}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ValueError(f"STADI config must be a YAML mapping of settings, got {kind}")  # noqa: TRY004
        _check_types(data)
        return cls.from_dict(data)


# Field -> the CLI flag that sets it, for error messages about config files.
FLAGS = {"use_stadi": "--use_stadi", "mode": "--stadi_mode", "exact": "--stadi_exact",
         "max_stride": "--stadi_max_stride", "tolerance": "--stadi_tolerance", "speeds": "--stadi_speeds",
         "emulate_slowdown": "--stadi_emulate_slowdown", "profile_cache": "--stadi_profile_cache",
         "timeout_seconds": "--stadi_timeout"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(data: dict[str, Any]) -> None:
    """Types a config file can get wrong that the value checks would not name (or would accept)."""
    for key, value in data.items():
        flag = FLAGS.get(key)
        if flag is None:
            continue  # from_dict reports unknown keys
        if key in ("use_stadi", "exact"):
            ok = isinstance(value, bool)
        elif key in ("mode", "profile_cache"):
            ok = isinstance(value, str) or (key == "profile_cache" and value is None)
        elif key == "max_stride":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif key in ("tolerance", "timeout_seconds"):
            ok = _is_number(value)
        else:  # per-rank lists
            ok = value is None or isinstance(value, str) or (
                isinstance(value, (list, tuple)) and all(_is_number(v) for v in value))
        if not ok:
            raise ValueError(f"{flag} has the wrong type in the config: {value!r} ({type(value).__name__})")
