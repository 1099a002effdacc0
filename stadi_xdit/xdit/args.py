"""STADI's flags and configs inside xDiT: `StadiArgs(xFuserArgs)` and `StadiEngineConfig(EngineConfig)`.

Where STADI sits in xDiT's degree tuple: on the data-parallel slot. xDiT's data-parallel ranks
already hold full model replicas and exchange nothing, and `initialize_model_parallel` builds the
dp group as exactly the ranks that share a CFG branch ("tp-sp-pp-cfg-dp" order), which is the
STADI group. So a STADI run is `dp_degree = world / cfg_degree` and xDiT's product rule holds
without touching `ParallelConfig`; the plugin only refuses degrees it cannot compose with. The
layout itself (product rule, refused degrees) is `stadi_xdit.topology.Topology`'s.

The `--stadi_*` flags and the `StadiArgs` fields are generated from `StadiConfig`'s field metadata
(`stadi_xdit.config.SETTINGS`): one declaration per setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from xfuser.config import EngineConfig, xFuserArgs

from stadi_xdit.config import SETTINGS, StadiConfig, shown_value
from stadi_xdit.geometry import TOKEN_ROW_PX
from stadi_xdit.planner.validation import MAX_ROWS, MAX_STEPS, require_int
from stadi_xdit.runtime.profile_cache import check_cache_path
from stadi_xdit.topology import Topology
from stadi_xdit.xdit.step_cache import STADI_CACHE_METHODS

# xDiT features STADI does not run under its own loop yet: refused instead of silently dropped.
UNSUPPORTED_FEATURES = ("use_fast_attn", "use_onediff", "use_teacache", "use_fbcache",
                        "use_cache", "use_fp8_comms", "use_hybrid_attn_schedule", "use_fsdp")


@dataclass(frozen=True)
class StadiEngineConfig(EngineConfig):
    """xDiT's engine config plus the STADI settings; STADI pipelines read `stadi_config`."""

    stadi_config: StadiConfig = field(default_factory=StadiConfig)
    # xDiT's model runner loads the pipeline (`stadi_xdit.xdit.runner`): it saves on its last process
    # and shards the VAE decoder itself, so the twin it builds must do neither its own way.
    served_by_runner: bool = False
    # The launch's ranks as `StadiArgs.validate` checked them; the runtime reads its degrees from here.
    topology: Topology | None = None


def stadi_arg_name(config_field: str) -> str:
    """`timeout_seconds` -> `stadi_timeout`: the xFuserArgs attribute behind the field's flag."""
    return SETTINGS[config_field]["flag"].removeprefix("--")


def add_stadi_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--use_stadi` and `--stadi_*` to an xDiT parser (underscore style, like xDiT's own).

    Idempotent: xDiT's own `add_cli_args` may already have added them (the CLI hook, or the
    upstream plugin loop), and argparse refuses a second definition.
    """
    if "--use_stadi" in parser._option_string_actions:
        return parser
    group = parser.add_argument_group("STADI (heterogeneity-aware patch parallelism)")
    for config_field in dataclasses.fields(StadiConfig):
        meta = config_field.metadata
        kind, flag, default = meta["kind"], meta["flag"], config_field.default
        if kind == "bool":
            group.add_argument(flag, action="store_true", help=meta["help"])
            continue
        python_type = {"int": int, "count": int, "float": float}.get(kind, str)
        choices = meta.get("choices")
        group.add_argument(flag, type=python_type, default=default, choices=choices,
                           help=f"{meta['help']} (default {default})")
    group.add_argument("--stadi_config_file", type=str, default=None, metavar="FILE",
                       help="STADI settings from a .json/.yaml/.yml file (keys as in StadiConfig); "
                            "--stadi_* flags given with non-default values override it.")
    return parser


def stadi_flags_without_use_stadi(values: Any) -> None:
    """A `--stadi_*` flag set away from its default while STADI is off is refused: the run would be
    plain xDiT and the flag silently ignored. `values` is a namespace, args or a runner dict."""
    get = values.get if isinstance(values, dict) else lambda name, default=None: getattr(values, name, default)
    if get("use_stadi") or get("stadi_config_file"):
        return
    for config_field in dataclasses.fields(StadiConfig):
        if config_field.name == "use_stadi":
            continue
        name = stadi_arg_name(config_field.name)
        value = get(name, config_field.default)
        if value is not None and value != config_field.default:
            raise ValueError(f"--{name} needs --use_stadi (without it this is a plain xDiT run, which would "
                             "ignore the flag)")


# Files a profile cache must never be: it rewrites its file, and moves aside one it cannot read.
def refuse_unsupported_features(args: xFuserArgs) -> None:
    """xDiT features STADI's loop cannot run, as a one-line error naming the flag (the degrees are
    `Topology.from_args`'s)."""
    for name in UNSUPPORTED_FEATURES:
        if getattr(args, name, False):
            raise ValueError(f"--{name} cannot be combined with --use_stadi (STADI runs its own denoising loop)")
    if getattr(args, "use_ray", False) or getattr(args, "ray_world_size", 1) not in (None, 1):
        flag = "--use_ray" if getattr(args, "use_ray", False) else f"--ray_world_size {args.ray_world_size}"
        raise ValueError(f"{flag} cannot be combined with --use_stadi (STADI runs on torchrun's processes, not on "
                         "xDiT's Ray workers: launch with stadi-xdit or torchrun --nproc_per_node N)")
    # fbcache's engine is the model's to say (in-tree, or cache-dit's where its settings name it).
    check_cache_config(args.cache_method, getattr(args, "cache_config", None),
                       cache_dit={"teacache": False, "dbcache": True}.get(args.cache_method))
    if args.cache_method is not None:
        check_step_cache(args.cache_method, getattr(args, "cache_config", None))
        if getattr(args, "use_cfg_parallel", False):
            raise ValueError(f"--cache_method {args.cache_method} cannot be combined with --use_cfg_parallel under "
                             "--use_stadi (each rank's cache decides alone; the two CFG branches would decide apart)")


def refuse_step_cache_outside_runner(args: xFuserArgs) -> None:
    """Scripts (xDiT's, through the CLI hook, and the example) build their pipelines themselves and apply no
    cache to a STADI twin: `--cache_method` is refused there rather than silently dropped."""
    if args.use_stadi and args.cache_method is not None:
        raise ValueError(f"--cache_method {args.cache_method} with --use_stadi runs through xDiT's model runner "
                         f"(stadi-xdit --model FLUX.1-dev ... --cache_method {args.cache_method}); a script's "
                         "pipeline gets no step cache under STADI")


def check_step_cache(method: str, cache_config: str | None) -> None:
    """`--cache_method` as STADI runs it (`xdit/step_cache.py`): each rank deciding for its band, with every
    CFG branch in one forward (its `--cache_config` is otherwise `check_cache_config`'s)."""
    if method not in STADI_CACHE_METHODS:
        raise ValueError(f"--cache_method {method} cannot be combined with --use_stadi; "
                         f"use {', '.join(STADI_CACHE_METHODS)}")
    settings = json.loads(cache_config) if isinstance(cache_config, str) and cache_config else {}
    if settings.get("enable_separate_cfg"):
        raise ValueError("--cache_config enable_separate_cfg cannot be true with --use_stadi (STADI runs both CFG "
                         "branches in one forward, so there is no separate CFG forward to cache)")


def check_cache_config(method: str | None, cache_config: str | None, *, cache_dit: bool | None = None) -> None:
    """`--cache_config` as xDiT's cache engines read it in every rank: a JSON object whose
    `residual_diff_threshold`, if any, is a finite number >= 0; for xDiT's in-tree engines (teacache,
    fbcache: `cache_dit` False) only that key, for cache-dit's (`cache_dit` True) the fields of xDiT's
    `DBCachePreset` and cache-dit's `DBCacheConfig`; None: the engine is not known yet (the model decides),
    keys unchecked. Given without `--cache_method` it would be ignored: refused instead."""
    if cache_config is None or cache_config == "":
        return
    if method is None:
        raise ValueError("--cache_config needs --cache_method (without it no cache reads the settings)")
    try:
        # A runner dict may hold any value; xDiT parses the text in every rank (a TypeError for a dict).
        settings = json.loads(cache_config) if isinstance(cache_config, str) else None
    except (ValueError, RecursionError):
        raise ValueError(f"--cache_config must be the text of a JSON object, got {shown_value(cache_config)}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"--cache_config must be the text of a JSON object, got {shown_value(cache_config)}")  # noqa: TRY004
    if cache_dit is False and set(settings) - {"residual_diff_threshold"}:
        raise ValueError(f"--cache_config takes only {{\"residual_diff_threshold\": NUMBER}} with --cache_method "
                         f"{method}, got {shown_value(cache_config)}")
    known = cache_dit_config_keys() if cache_dit else None
    if known is not None:
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"--cache_config: unknown key(s) {', '.join(map(repr, unknown))} for --cache_method "
                             f"{method} (cache-dit's DBCache)")
        check_cache_dit_values(settings)
    threshold = settings.get("residual_diff_threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise ValueError(f"--cache_config residual_diff_threshold must be a finite number >= 0 "
                         f"(0: never reuse a step), got {shown_value(threshold)}")


# What each of cache-dit's settings takes (xDiT's DBCachePreset fields, then cache-dit's DBCacheConfig's): checked
# once at launch, since cache-dit reads them in every rank, some only at the first forward.
_CACHE_DIT_COUNTS = {"Fn_compute_blocks": 0, "Bn_compute_blocks": 0, "max_warmup_steps": 0, "warmup_interval": 1,
                     "max_cached_steps": -1, "max_continuous_cached_steps": -1}  # key -> smallest value (-1: no cap)
_CACHE_DIT_FLAGS = ("enable_taylorseer", "enable_separate_cfg", "enable_encoder_calibrator", "cfg_compute_first",
                    "cfg_diff_compute_separate")
_CACHE_DIT_CHOICES = {"scm_policy": ("slow", "medium", "fast", "ultra"), "steps_computation_policy": ("dynamic", "static"),
                      "force_refresh_step_policy": ("once", "repeat")}
# Set by the run itself: the method (cache_type) and --num_inference_steps.
_CACHE_DIT_FIXED = {"cache_type": "--cache_method", "num_inference_steps": "--num_inference_steps"}


def check_cache_dit_values(settings: dict) -> None:
    """The values of cache-dit's `--cache_config` keys, each by its field's type and range (one line)."""
    for key, value in settings.items():
        if key in _CACHE_DIT_FIXED:
            raise ValueError(f"--cache_config {key}: set by {_CACHE_DIT_FIXED[key]}, not by --cache_config")
        wanted = _cache_dit_value_wanted(key, value)
        if wanted:
            raise ValueError(f"--cache_config {key} must be {wanted}, got {shown_value(value)}")


def _cache_dit_value_wanted(key: str, value: Any) -> str | None:
    """What `value` of cache-dit's `key` must be, where it is not (None: it is)."""
    count = isinstance(value, int) and not isinstance(value, bool)
    if key in _CACHE_DIT_COUNTS and not (count and value >= _CACHE_DIT_COUNTS[key]):
        return f"an integer >= {_CACHE_DIT_COUNTS[key]}"
    if key in _CACHE_DIT_FLAGS and value is not None and not isinstance(value, bool):
        return "true, false or null"
    if key in _CACHE_DIT_CHOICES:
        nullable = key == "scm_policy"
        if value not in (*_CACHE_DIT_CHOICES[key], *((None,) if nullable else ())):
            return " or ".join(map(repr, _CACHE_DIT_CHOICES[key])) + (" (or null)" if nullable else "")
    if key == "max_accumulated_residual_diff_threshold" and value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf):
        return "a finite number >= 0 or null"
    if key == "force_refresh_step_hint" and value is not None and not (count and value >= 0):
        return "an integer >= 0 or null"
    if key == "steps_computation_mask" and value is not None and not (
            isinstance(value, list) and value and all(v in (0, 1) and not isinstance(v, bool) for v in value)):
        return "a list of 0s and 1s (1: compute the step in full) or null"
    return None


def cache_dit_config_keys() -> set[str] | None:
    """What xDiT's dbcache reads from `--cache_config`: its preset's fields, then cache-dit's config's (None
    without cache-dit: the launcher refuses that on its own)."""
    try:
        from cache_dit import DBCacheConfig
    except ImportError:
        return None
    from xfuser.model_executor.cache.presets import DBCachePreset

    return {field.name for field in (*dataclasses.fields(DBCachePreset), *dataclasses.fields(DBCacheConfig))}


def launch_world_size() -> int:
    """The launch size of this process as torchrun exports it to every rank (xDiT's
    `init_distributed_environment` reads the same variable); 1 outside a launch. Read only by the
    entry points inside a rank, which hand it to `StadiArgs.validate`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# xDiT's runner model registry (`MODEL_REGISTRY`); see `StadiArgs._runner_twin`.
RUNNER_REGISTRY_MODULE = "xfuser.model_executor.models.runner_models.base_model"


def validate_shape(args: xFuserArgs, stadi_degree: int, exact: bool, image_rows: bool = True) -> None:
    """Image size and step counts STADI can band and schedule, named by flag. `image_rows`: the bands are
    the image's token rows, so there must be one per rank (a video family checks its clip's rows itself)."""
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % TOKEN_ROW_PX:
            raise ValueError(f"{flag} must be a positive multiple of {TOKEN_ROW_PX} px with --use_stadi "
                             f"(one token row), got {value!r}")
    rows = args.height // TOKEN_ROW_PX
    if image_rows and rows < stadi_degree:
        raise ValueError(f"--height {args.height} gives {rows} token rows of {TOKEN_ROW_PX} px, fewer than "
                         f"the {stadi_degree} STADI ranks: use --height >= {stadi_degree * TOKEN_ROW_PX}")
    if image_rows and rows > MAX_ROWS:
        raise ValueError(f"--height {args.height} gives {rows} token rows of {TOKEN_ROW_PX} px, more than the "
                         f"planner's {MAX_ROWS}: use --height <= {MAX_ROWS * TOKEN_ROW_PX}")
    steps = require_int("--num_inference_steps", args.num_inference_steps, minimum=1, maximum=MAX_STEPS)
    shift = args.stadi.emulated_shift if getattr(args, "stadi", None) is not None else None
    if shift is not None and shift[0] >= steps:  # it would never apply
        raise ValueError(f"--stadi_emulate_shift step {shift[0]} is past the last step of --num_inference_steps "
                         f"{steps} (steps 0..{steps - 1})")
    warmup = require_int("--warmup_steps", args.warmup_steps, minimum=0)
    if not exact and not 1 <= warmup <= steps - 1:
        raise ValueError(f"--warmup_steps must be in [1, --num_inference_steps - 1] = [1, {steps - 1}] with "
                         f"--use_stadi (the warmup measures speeds, then at least one step runs STADI), "
                         f"got --warmup_steps {warmup}")


def validate_call_inputs(args: Any) -> None:
    """The call's inputs that xDiT's parser takes as given and a runner config dict passes unchecked, each
    of which every rank would refuse with a traceback (or silently misuse): named by flag, one line."""
    prompt = args.prompt
    if prompt is not None and not (isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt))):
        raise ValueError(f"--prompt must be text or a list of texts, got {shown_value(prompt)}")
    negative = getattr(args, "negative_prompt", None)
    if negative is not None and not (isinstance(negative, str) or (
            isinstance(negative, list) and all(isinstance(item, str) for item in negative))):
        raise ValueError(f"--negative_prompt must be text or a list of texts, got {shown_value(negative)}")
    require_int("--seed", args.seed, minimum=0, maximum=2**63 - 1)
    guidance = args.guidance_scale
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise ValueError(f"--guidance_scale must be a finite number, got {shown_value(guidance)}")
    if getattr(args, "use_cfg_parallel", False) and guidance is not None and guidance <= 1:
        # CfgPair refused it in every rank, after the process groups were up
        raise ValueError(f"--use_cfg_parallel needs --guidance_scale > 1 (one CFG branch per rank; guidance "
                         f"{guidance:g} runs no unconditional branch)")
    require_int("--num_iterations", args.num_iterations, minimum=1)
    require_int("--warmup_calls", args.warmup_calls, minimum=0)
    output = args.output_directory
    if not (isinstance(output, os.PathLike) or (isinstance(output, str) and output.strip())):
        raise ValueError(f"--output_directory must name a folder, got {shown_value(output)}")


def require_prompt(args: Any) -> None:
    """A runner call needs its text: `--prompt` or `--dataset_path` (the launcher says so before any rank
    starts; a runner config dict reaches no launcher)."""
    if args.prompt is None and getattr(args, "dataset_path", None) is None:
        raise ValueError(f"--model {args.model} needs --prompt (or --dataset_path)")


def stadi_config_from(args: Any) -> StadiConfig:
    """The validated STADI settings of parsed args: `--stadi_config_file` first, flags over it.

    A flag overrides the file when its value differs from the flag's default (argparse cannot
    tell an explicit default from an omitted flag).
    """
    values = {f.name: getattr(args, stadi_arg_name(f.name)) for f in dataclasses.fields(StadiConfig)}
    path = getattr(args, "stadi_config_file", None)
    if path is not None and not (isinstance(path, str) and path.strip()) and not isinstance(path, os.PathLike):
        raise ValueError(f"--stadi_config_file must name a file, got {shown_value(path)}")
    if path:
        from_file = StadiConfig.from_file(path)
        for config_field in dataclasses.fields(StadiConfig):
            if values[config_field.name] == config_field.default:
                values[config_field.name] = getattr(from_file, config_field.name)
    return StadiConfig(**values)


def _joined_numbers(flag: str, values: list | tuple) -> str:
    """A list of numbers as `flag` writes them ("1.0,0.5"); one line naming the flag otherwise."""
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{flag} must be a non-empty list of numbers, got {shown_value(values)}")
    try:
        return ",".join(repr(float(v)) for v in values)
    except OverflowError:  # an int beyond float range (str() of one with > 4300 digits would raise too)
        raise ValueError(f"{flag} values must be finite numbers, got one too large for a float") from None


class _StadiArgsBehaviour(xFuserArgs):
    """Methods of `StadiArgs`; its fields are generated below from `StadiConfig`'s metadata."""

    # The STADI pipeline class these args will drive, where the caller knows it (the benchmark): launch
    # checks then follow its family (Wan bands a clip's rows). Not a flag; the runner finds it by --model.
    stadi_pipeline_class = None
    # The launch layout `validate` checked (a `Topology`), for what is named or counted after it.
    topology = None

    def __post_init__(self) -> None:
        if self.use_stadi:
            # xDiT's deprecation notes on cache flags (two lines each) would bury the one-line error
            # that `validate` gives for those flags under STADI.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                super().__post_init__()
        else:
            super().__post_init__()
        for name in ("stadi_speeds", "stadi_emulate_slowdown", "stadi_memory_budget"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # a runner dict's list: the flag's text form
                setattr(self, name, _joined_numbers(f"--{name}", value))
        # Validates every --stadi_* value now, before any process group exists.
        self.stadi = stadi_config_from(self)
        self.use_stadi = self.stadi.use_stadi  # a config file may switch STADI on
        if not self.use_stadi:
            stadi_flags_without_use_stadi({**vars(self), "stadi_config_file": None})

    @staticmethod
    def add_cli_args(parser):
        xFuserArgs.add_cli_args(parser)
        return add_stadi_cli_args(parser)

    def validate(self, world_size: int) -> int:
        """Check the flags against a launch of `world_size` processes before any process group exists;
        returns the STADI degree (ranks per CFG branch). The checked layout is kept as `topology`."""
        refuse_unsupported_features(self)
        validate_call_inputs(self)
        twin = self._runner_twin()
        # A twin not known yet (an xDiT script picks it when it builds its pipeline) checks it itself, at construction.
        self.topology = Topology.from_args(self, world_size, group_sizes=self.stadi.groups,
                                           ulysses_groups=twin is None or bool(getattr(twin, "ulysses_groups", False)))
        degree = self.topology.stadi_degree
        self.stadi.check_world(degree)
        validate_shape(self, degree, self.stadi.exact, image_rows=twin is None or twin.bands_are_image_rows)
        if twin is not None:
            twin.check_launch(self, degree)
        if self.stadi.profile_cache is not None:
            check_cache_path(self.stadi.profile_cache, settings_file=getattr(self, "stadi_config_file", None),
                             model=self.model)
        return degree

    def _runner_twin(self) -> type | None:
        """The STADI family serving `--model` as an xDiT runner model (None: any other model name).

        Only where xDiT's runner registry is already loaded (the runner and its launcher): importing
        it elsewhere would print its import-time log lines around a one-line input error.
        """
        if self.stadi_pipeline_class is not None:
            return self.stadi_pipeline_class
        if RUNNER_REGISTRY_MODULE not in sys.modules:
            return None
        from stadi_xdit.xdit.runner import runner_twin

        return runner_twin(self.model)

    def create_config(self):
        if not self.use_stadi:
            return super().create_config()
        # STADI occupies the data-parallel slot (see module docstring); --stadi_groups of equal sizes are xDiT's
        # own Ulysses groups, unequal ones leave xDiT a flat branch (the topology says which).
        self.validate(launch_world_size())
        given_ulysses = self.ulysses_degree
        self.data_parallel_degree, self.ulysses_degree = (self.topology.data_parallel_degree,
                                                          self.topology.ulysses_degree)
        try:
            engine_config, input_config = super().create_config()
        finally:
            self.data_parallel_degree, self.ulysses_degree = 1, given_ulysses
        values = {f.name: getattr(engine_config, f.name) for f in dataclasses.fields(EngineConfig)}
        return StadiEngineConfig(**values, stadi_config=self.stadi, topology=self.topology), input_config


def _stadi_arg_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, field) for each StadiConfig setting; per-rank lists travel as '1,0.5' strings."""
    out = []
    for config_field in dataclasses.fields(StadiConfig):
        kind = config_field.metadata["kind"]
        annotation = {"bool": bool, "int": int, "count": "int | None", "float": float, "choice": str}.get(
            kind, "str | None")
        out.append((stadi_arg_name(config_field.name), annotation, field(default=config_field.default)))
    out.append(("stadi_config_file", "str | None", field(default=None)))
    return out


StadiArgs = dataclasses.make_dataclass("StadiArgs", _stadi_arg_fields(), bases=(_StadiArgsBehaviour,),
                                       namespace={"__module__": __name__})
StadiArgs.__doc__ = ("xFuserArgs plus STADI's fields (`use_stadi`, `stadi_mode`, ... generated from "
                     "StadiConfig); `from_cli_args` picks them up through dataclass fields.")

