"""The one hook that makes xDiT's own entry points speak STADI (`import stadi_xdit.xdit` installs it).

An unmodified xDiT example script does

    parser = FlexibleArgumentParser(...)
    args = xFuserArgs.add_cli_args(parser).parse_args()
    engine_config, input_config = xFuserArgs.from_cli_args(args).create_config()
    pipe = xFuserPixArtAlphaPipeline.from_pretrained(model, engine_config=engine_config)

With the hook installed, and only when `--use_stadi` is given, that same script runs STADI:

1. `xFuserArgs.add_cli_args` also adds `--use_stadi`/`--stadi_*` (idempotent per parser);
2. `xFuserArgs.from_cli_args` returns a `StadiArgs` when `args.use_stadi` is set, so
   `create_config()` yields a `StadiEngineConfig` (STADI on xDiT's data-parallel slot);
3. constructing any xFuser pipeline wrapper with such a config builds its STADI twin
   (`xFuserPixArtAlphaPipeline` -> `StadiPixArtAlphaPipeline`, ... `xFuserFluxPipeline` ->
   `StadiFluxPipeline`) through one `__new__` on `xFuserPipelineBaseWrapper`; `from_pretrained`,
   direct construction and `xDiTParallel` all go through it. A model without a STADI twin is
   refused instead of silently running plain data parallelism;
4. `xfuser.cli.get_nproc_from_args` (the `xdit` launcher's rank count) counts STADI ranks
   (`stadi_nproc_from_args`);
5. `xFuserArgs.add_runner_args` gives xDiT's model runner the STADI flags and `--warmup_steps`;
6. `xFuserArgs.from_runner_args` turns a runner config dict with STADI keys into a validated `StadiArgs`;
7. constructing a registered runner model (`xFuserModel.__new__`) with such a config builds its STADI form.

Every patch is applied right after its xfuser module is imported (so `import stadi_xdit` stays
light), is idempotent, and `uninstall()` restores the originals. Set `STADI_XDIT_NO_CLI_HOOK=1`
to import `stadi_xdit` without it. `add_stadi_cli_args` itself skips a parser that already has the
STADI flags, so `StadiArgs.add_cli_args` composes with a hooked `xFuserArgs.add_cli_args`. `patches/xfuser-0.7.0-stadi-cli-hook.patch` is the upstream
form: a plugin entry-point group `xfuser.plugins` consulted at the same seven places (and, for the
`xdit` command, at one more: `check_launch`, see `stadi_xdit.run.XditPlugin`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from stadi_xdit.cli_errors import StadiInputError, fail
from stadi_xdit.compat._hooks import when_imported
from stadi_xdit.topology import CFG_BRANCHES, REFUSED_WITH_STADI, Topology, refuse_degrees

_ENABLED = False
# (owner, attribute) -> original value (or _ABSENT), for uninstall()
_SAVED: dict[tuple[Any, str], Any] = {}
_ABSENT = object()
_MARK = "__stadi_cli_hook__"


def _replace(owner: Any, name: str, value: Any) -> None:
    key = (owner, name)
    if key not in _SAVED:
        _SAVED[key] = owner.__dict__.get(name, _ABSENT) if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)


def _marked(fn: Callable) -> Callable:
    setattr(fn, _MARK, True)
    return fn


# --- 1 + 2: flags and args class ----------------------------------------------------------------

def stadi_args_class(base: type, klass: type, args: Any) -> type | None:
    """The args class `from_cli_args` should build: StadiArgs when `--use_stadi` was given (or a
    `--stadi_config_file`, which may switch STADI on)."""
    if not (getattr(args, "use_stadi", False) or getattr(args, "stadi_config_file", None)):
        return None
    from stadi_xdit.xdit.args import StadiArgs

    if issubclass(klass, StadiArgs):
        return klass
    if klass is base:
        return StadiArgs
    raise ValueError(f"--use_stadi needs StadiArgs, but {klass.__name__}.from_cli_args cannot carry the STADI flags")


def add_flags(parser):
    """Add `--use_stadi`/`--stadi_*` (idempotent)."""
    from stadi_xdit.xdit.args import add_stadi_cli_args

    return add_stadi_cli_args(parser)


def _upstream_hook(module: ModuleType) -> bool:
    """xfuser carries the plugin hook (patches/xfuser-0.7.0-stadi-cli-hook.patch): no monkeypatch."""
    return hasattr(module, "xfuser_plugins")


def patch_xfuser_args(module: ModuleType) -> None:
    if not _ENABLED or _upstream_hook(module):
        return
    cls = module.xFuserArgs
    if getattr(cls.__dict__["add_cli_args"].__func__, _MARK, False):
        return
    original_add = cls.__dict__["add_cli_args"].__func__
    original_from = cls.__dict__["from_cli_args"].__func__
    original_add_runner = cls.__dict__["add_runner_args"].__func__
    original_from_runner = cls.__dict__["from_runner_args"].__func__

    @_marked
    def add_cli_args(parser):
        parser = original_add(parser)
        return add_flags(parser) if _ENABLED else parser

    @_marked
    def add_runner_args(parser):
        parser = original_add_runner(parser)
        return add_runner_flags(parser) if _ENABLED else parser

    @_marked
    def from_runner_args(klass, config):
        """The runner's dict -> args: STADI keys reach a validated StadiConfig, never dropped."""
        stadi = stadi_runner_args(config) if _ENABLED else None
        return stadi if stadi is not None else original_from_runner(klass, config)

    @_marked
    def from_cli_args(klass, args):
        if not _ENABLED:
            return original_from(klass, args)
        if not (getattr(args, "use_stadi", False) or getattr(args, "stadi_config_file", None)):
            from stadi_xdit.xdit.args import stadi_flags_without_use_stadi

            try:
                stadi_flags_without_use_stadi(args)
            except ValueError as error:
                fail(os.path.basename(sys.argv[0]) or "xfuser", str(error))
            return original_from(klass, args)
        # A command line is being read: a bad STADI input is one line naming the flag, printed
        # once (rank 0), before the script creates any process group; never a traceback.
        try:
            from stadi_xdit.xdit.args import launch_world_size, refuse_step_cache_outside_runner

            parsed = original_from(stadi_args_class(cls, klass, args), args)
            parsed.validate(launch_world_size())
            refuse_step_cache_outside_runner(parsed)
        except ValueError as error:
            fail(os.path.basename(sys.argv[0]) or "xfuser", str(error))
        return parsed

    add_cli_args.__doc__ = original_add.__doc__
    _replace(cls, "add_cli_args", staticmethod(add_cli_args))
    _replace(cls, "from_cli_args", classmethod(from_cli_args))
    _replace(cls, "add_runner_args", staticmethod(add_runner_args))
    _replace(cls, "from_runner_args", classmethod(from_runner_args))


def add_runner_flags(parser):
    """STADI's flags on the runner's parser, plus `--warmup_steps` (the runner has none; STADI
    measures each rank's speed in the warmup)."""
    if "--warmup_steps" not in parser._option_string_actions:
        parser.add_argument("--warmup_steps", type=int, default=1,
                            help="Synchronous warmup steps (STADI measures each rank's speed in them).")
    return add_flags(parser)


def stadi_runner_args(config: Any, world_size: int | None = None) -> Any | None:
    """STADI's args for a runner config dict, or None when it asks for no STADI.

    Misspelled `stadi_*` keys and bad values raise `StadiInputError` (one line) instead of being
    dropped; the shape is checked with the model's default size where the dict gives none, and the
    degrees against a launch of `world_size` processes (None: this process's own launch, as a rank).
    """
    if not isinstance(config, dict):
        return None
    import dataclasses

    from stadi_xdit.xdit.args import StadiArgs, launch_world_size, require_prompt
    from stadi_xdit.xdit.runner import check_runner_keys, with_model_defaults

    try:
        check_runner_keys(config)
        check_runner_switch(config, "use_stadi")  # "no" is truthy: it must not switch STADI on
        if not (config.get("use_stadi") or config.get("stadi_config_file")):
            from stadi_xdit.xdit.args import stadi_flags_without_use_stadi

            stadi_flags_without_use_stadi(config)
            return None
        check_runner_switches(config)
        known = {f.name for f in dataclasses.fields(StadiArgs)}
        args = StadiArgs(**{k: v for k, v in with_model_defaults(config).items() if k in known})
        # with the family's own launch checks (e.g. Wan's --num_frames)
        args.validate(launch_world_size() if world_size is None else world_size)
        if world_size is None:  # a dict in the runner's own process: no launcher checked its text
            require_prompt(args)
    except ValueError as error:
        raise StadiInputError(" ".join(str(error).split())) from None
    show_resolved_settings(config, args.stadi)
    return args


def show_resolved_settings(config: dict[str, Any], stadi: Any) -> None:
    """Write the STADI settings that will run (a --stadi_config_file's included) back into the runner's
    dict: xDiT's runner logs that same dict after building its args, which would otherwise show the
    parser's defaults (`use_stadi: False`) for settings that came from the file."""
    import dataclasses

    from stadi_xdit.xdit.args import stadi_arg_name

    for setting in dataclasses.fields(stadi):
        config[stadi_arg_name(setting.name)] = getattr(stadi, setting.name)


def check_runner_switch(config: dict[str, Any], key: str) -> None:
    """A runner dict's on/off key holds a bool (or None for the default): a string such as "no" would
    read as true."""
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"runner config key {key!r} must be True or False, got {value!r}")


def check_runner_switches(config: dict[str, Any]) -> None:
    """Every boolean xDiT/STADI flag in a STADI runner dict is a bool (STADI's checks read them)."""
    import dataclasses

    from stadi_xdit.xdit.args import StadiArgs

    for f in dataclasses.fields(StadiArgs):
        if f.type in (bool, "bool") and f.name in config:
            check_runner_switch(config, f.name)


# --- 3b: runner model choice (xfuser.runner's registry) -------------------------------------------

def stadi_model_class(cls: type, config: Any) -> type | None:
    """The runner model class to build instead of `cls` for `config` (None: `cls`)."""
    from stadi_xdit.xdit.runner import runner_config_uses_stadi, stadi_runner_model

    if not runner_config_uses_stadi(config) or getattr(cls, "__stadi_runner_model__", False):
        return None
    try:
        return stadi_runner_model(cls, getattr(config, "model", None))
    except ValueError as error:
        raise StadiInputError(str(error)) from None


def _choose_class_on_construction(base: type, config_arg: str, config_position: int,
                                  choose: Callable[[type, Any], type | None]) -> None:
    """Give `base` a `__new__` that constructs `choose(cls, config)` (a subclass) instead of `cls`.

    Python then runs that class's `__init__(*args, **kwargs)` on the instance, so construction
    arguments reach the STADI class unchanged; every way of building one (from_pretrained, direct
    calls, registries) ends in the class call, so this one place covers them all.
    """
    if getattr(base.__dict__.get("__new__"), _MARK, False):
        return

    @_marked
    def __new__(cls, *args, **kwargs):
        config = kwargs.get(config_arg, args[config_position] if len(args) > config_position else None)
        if _ENABLED:
            cls = choose(cls, config) or cls
        return object.__new__(cls)

    _replace(base, "__new__", __new__)


def patch_runner_model_choice(base_model: ModuleType) -> None:
    if _ENABLED and not _upstream_hook(base_model):
        _choose_class_on_construction(base_model.xFuserModel, "config", 0, stadi_model_class)


# --- 3: pipeline choice -------------------------------------------------------------------------

def engine_config_uses_stadi(engine_config: Any) -> bool:
    """Whether an xDiT engine config carries STADI's settings with --use_stadi on."""
    stadi = getattr(engine_config, "stadi_config", None)
    return bool(stadi is not None and stadi.use_stadi)


def stadi_twin(cls: type) -> type | None:
    """The STADI pipeline class for xFuser wrapper `cls` (from the family registry), or None."""
    from stadi_xdit.registry import twin_for

    twin = twin_for(cls.__name__)
    return twin if twin is not None and issubclass(twin, cls) else None


def stadi_pipeline_class(cls: type, engine_config: Any) -> type | None:
    """The class to construct instead of xFuser wrapper `cls` for `engine_config` (None: `cls`)."""
    if not engine_config_uses_stadi(engine_config):
        return None
    from stadi_xdit.xdit.pipelines import StadiPipelineMixin

    if issubclass(cls, StadiPipelineMixin):
        return cls
    twin = stadi_twin(cls)
    if twin is None:
        from stadi_xdit.registry import twins

        supported = ", ".join(sorted(twins()))
        raise ValueError(f"--use_stadi does not support {cls.__name__}; STADI runs {supported}")
    return twin


def patch_pipeline_choice(base_module: ModuleType) -> None:
    if _ENABLED and not _upstream_hook(base_module):
        _choose_class_on_construction(base_module.xFuserPipelineBaseWrapper, "engine_config", 1,
                                      stadi_pipeline_class)


# --- 4: the `xdit` launcher's rank count --------------------------------------------------------

def _flag_values(args: Sequence[str]) -> dict[str, str | None]:
    """`--flag value` / `--flag=value` / bare `--flag` -> {'--flag': value or None}, dashes as underscores."""
    values: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            name = "--" + name[2:].replace("-", "_")
            if eq:
                values[name] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                values[name] = args[i + 1]
                i += 1
            else:
                values[name] = None
        i += 1
    return values


def _count(text: str | None) -> int | None:
    return None if not text else len(text.split(","))


def _file_settings(flags: dict[str, str | None]) -> Any:
    """The `--stadi_config_file` settings, or None without one."""
    path = flags.get("--stadi_config_file")
    if not path:
        return None
    from stadi_xdit.config import StadiConfig

    return StadiConfig.from_file(path)


def stadi_groups_from_args(args: Sequence[str]) -> tuple[int, ...] | None:
    """`--stadi_groups` (the flag, then `--stadi_config_file`), parsed; None when neither gives it."""
    from stadi_xdit.config import parse_counts

    flags = _flag_values(args)
    if flags.get("--stadi_groups"):
        return parse_counts(flags["--stadi_groups"], "--stadi_groups")
    settings = _file_settings(flags)
    return None if settings is None else settings.groups


def stadi_degree_from_args(args: Sequence[str]) -> int | None:
    """Members per CFG branch: `--stadi_degree`, else the number of `--stadi_groups`, else the length of a per-rank
    list flag (flags, then file)."""
    flags = _flag_values(args)
    settings = _file_settings(flags)
    counts = {}
    if flags.get("--stadi_degree"):
        counts["--stadi_degree"] = checked_int("--stadi_degree", flags["--stadi_degree"], minimum=1)
    elif settings is not None and settings.degree is not None:
        counts["--stadi_degree"] = settings.degree
    groups = stadi_groups_from_args(args)
    if groups is not None:
        counts["--stadi_groups"] = len(groups)
    for flag, field in (("--stadi_speeds", "speeds"), ("--stadi_emulate_slowdown", "emulate_slowdown")):
        if flags.get(flag):
            counts[flag] = _count(flags[flag])
        elif settings is not None and getattr(settings, field) is not None:
            counts[flag] = len(getattr(settings, field))
    if len(set(counts.values())) > 1:
        raise ValueError(f"STADI rank counts disagree: {', '.join(f'{k} -> {v}' for k, v in counts.items())}")
    return next(iter(counts.values()), None)


def checked_int(flag: str, text: str | None, minimum: int, maximum: int | None = None, note: str = "") -> int:
    """`text` of a command-line flag (not parsed by argparse here) as an integer in [minimum, maximum],
    or a one-line ValueError naming the flag."""
    try:
        value = int(text or "")
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{flag} must be an integer {bound}{note}, got {text!r}")
    return value


def _uses_stadi(flags: dict[str, str | None]) -> bool:
    if "--use_stadi" in flags and flags["--use_stadi"] not in ("False", "false", "0"):
        return True
    settings = _file_settings(flags)
    return settings is not None and settings.use_stadi


def stadi_launch_topology(args: Sequence[str]) -> Topology:
    """The launch that STADI flags describe (`Topology.for_stadi_degree`, or `for_group_sizes` with
    `--stadi_groups`)

        world = members x (2 if --use_cfg_parallel else 1) x --ulysses_degree [+ --vae_parallel_size]
        world = sum(--stadi_groups) x (2 if --use_cfg_parallel else 1) [+ --vae_parallel_size]

    where members is `--stadi_degree N`, else the number of `--stadi_groups`, else the number of values of
    `--stadi_speeds` / `--stadi_emulate_slowdown` (flags first, then `--stadi_config_file`). xDiT's own rule would
    count 1 (or 2) here, since STADI's degree is not one of its degree flags. A ValueError (one line) when the
    flags cannot say.
    """
    flags = _flag_values(args)
    # --ulysses_degree is counted here; whether the model's family runs Ulysses inside STADI groups is checked
    # with the other inputs (`StadiArgs.validate`), which knows the family.
    refuse_degrees({name: flags.get(f"--{name}") for name in REFUSED_WITH_STADI if name != "ulysses_degree"})
    ulysses = checked_int("--ulysses_degree", flags["--ulysses_degree"], minimum=1) if flags.get("--ulysses_degree") else 1
    degree = stadi_degree_from_args(args)
    if degree is None:
        raise ValueError("with --use_stadi the launcher cannot infer the number of ranks: pass --nproc_per_node, "
                         "or --stadi_degree N (ranks per CFG branch), --stadi_groups, or per-rank --stadi_speeds")
    cfg_on = "--use_cfg_parallel" in flags and flags["--use_cfg_parallel"] not in ("False", "false")
    cfg = CFG_BRANCHES if cfg_on else 1
    vae = checked_int("--vae_parallel_size", flags["--vae_parallel_size"], minimum=0) if flags.get("--vae_parallel_size") else 0
    groups = stadi_groups_from_args(args)
    if groups is not None:
        return Topology.for_group_sizes(groups, cfg_degree=cfg, vae_ranks=vae, ulysses_degree=ulysses)
    return Topology.for_stadi_degree(degree, cfg_degree=cfg, vae_ranks=vae, ulysses_degree=ulysses)


def stadi_nproc_from_args(args: Sequence[str], fallback: Callable[[list[str]], int] | None = None,
                          nnodes: int = 1, node_rank: int = 0) -> int:
    """Processes on node `node_rank` of `nnodes` for a launch: xDiT's degree product, or with `--use_stadi` the
    STADI rule (`stadi_launch_topology`), spread over the nodes (`Topology.processes_per_node`)."""
    flags = _flag_values(args)
    if not _uses_stadi(flags):
        if fallback is None:
            raise ValueError("no --use_stadi and no fallback rule")
        return fallback(list(args))
    return stadi_launch_topology(args).processes_per_node(nnodes, node_rank)


def patch_launcher(cli: ModuleType) -> None:
    if not _ENABLED or _upstream_hook(cli):
        return
    original = cli.get_nproc_from_args
    if getattr(original, _MARK, False):
        return

    @_marked
    def get_nproc_from_args(args):
        return stadi_nproc_from_args(args, original) if _ENABLED else original(args)

    get_nproc_from_args.__doc__ = original.__doc__
    _replace(cli, "get_nproc_from_args", get_nproc_from_args)


# --- the upstream form: an `xfuser.plugins` entry point -------------------------------------------

class XfuserPlugin:
    """STADI as an xDiT plugin, for xfuser with `patches/xfuser-0.7.0-stadi-cli-hook.patch`.

    Registered through its subclass `stadi_xdit.run:XditPlugin` (`[project.entry-points."xfuser.plugins"]`),
    which adds the launcher's checks for the `xdit` command.
    """

    add_cli_args = staticmethod(add_flags)

    @staticmethod
    def args_class(klass: type, args: Any) -> type | None:
        from xfuser.config import xFuserArgs

        return stadi_args_class(xFuserArgs, klass, args)

    pipeline_class = staticmethod(stadi_pipeline_class)
    add_runner_args = staticmethod(add_runner_flags)
    model_class = staticmethod(stadi_model_class)

    @staticmethod
    def from_runner_args(klass: type, config: Any) -> Any | None:
        return stadi_runner_args(config)

    @staticmethod
    def nproc(args: Sequence[str]) -> int | None:
        if not _uses_stadi(_flag_values(args)):
            return None
        return stadi_nproc_from_args(args)


# --- install / uninstall ------------------------------------------------------------------------

_PATCHES = {
    "xfuser.config.args": patch_xfuser_args,
    "xfuser.model_executor.pipelines.base_pipeline": patch_pipeline_choice,
    "xfuser.model_executor.models.runner_models.base_model": patch_runner_model_choice,
    "xfuser.cli": patch_launcher,
}


def install() -> None:
    """Register the hook (idempotent); modules already imported are patched now."""
    global _ENABLED
    _ENABLED = True
    for module_name, patch in _PATCHES.items():
        when_imported(module_name, patch)  # runs once per module object
        module = sys.modules.get(module_name)
        if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            patch(module)  # again after an uninstall(): the post-import hook has already run


def uninstall() -> None:
    """Restore every patched attribute; xDiT behaves as if `stadi_xdit` had never been imported."""
    global _ENABLED
    _ENABLED = False
    for (owner, name), original in reversed(list(_SAVED.items())):
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _SAVED.clear()


def is_installed() -> bool:
    return _ENABLED


if os.environ.get("STADI_XDIT_NO_CLI_HOOK", "") in ("", "0"):
    install()

__all__ = [
    "XfuserPlugin",
    "add_flags",
    "engine_config_uses_stadi",
    "install",
    "is_installed",
    "stadi_args_class",
    "stadi_degree_from_args",
    "stadi_groups_from_args",
    "stadi_launch_topology",
    "stadi_nproc_from_args",
    "stadi_pipeline_class",
    "stadi_twin",
    "uninstall",
]
