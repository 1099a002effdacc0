"""Run an unmodified xDiT script with the STADI plugin loaded first.

    torchrun --nproc_per_node 2 -m stadi_xdit.run examples/pixartalpha_example.py --model ... --use_stadi
    python -m stadi_xdit.run -m some.module --args ...      # a module instead of a script

`import stadi_xdit` installs the CPU compat layer (no CUDA) and the CLI hook
(`stadi_xdit.xdit.cli_hook`), then the script runs as `__main__` with `sys.argv` as if it had been
started directly; without `--use_stadi` it behaves exactly as plain xDiT.

`stadi-xdit` (`launch`) is the matching launcher: xDiT's `xdit` command with the plugin loaded.
With xDiT's runner arguments it runs xDiT's model runner, exactly as `xdit` does; with a script
(or `-m MODULE`) first, it runs that script:

    stadi-xdit --model FLUX.1-dev --use_stadi --stadi_degree 2 --height 1024 ...     # xdit's form
    stadi-xdit [--nproc_per_node N] [--nnodes ... --master_port ...] script.py --use_stadi ...

It runs `torch.distributed.run ... -m stadi_xdit.run (-m xfuser.runner | script.py) ...` (torchrun
in the launcher's own process, so a failed rank ends the launch with its status, not torchrun's
traceback); the number of processes is `--nproc_per_node` when given, else the STADI rule of
`cli_hook.stadi_nproc_from_args` (`--stadi_degree`, x2 with CFG parallelism), else xDiT's own
degree product. torchrun's flags, the runner arguments, and what the ranks would find missing on
this machine (master address, script or module, model files, prompt, output directory) are checked
here, once, before any process starts.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook, before the script imports xfuser)
from stadi_xdit import rank_process
from stadi_xdit.cli_errors import USAGE_ERROR, StadiInputError, fail, speak_always
from stadi_xdit.rank_process import exit_without_teardown
from stadi_xdit.runtime import heartbeat
from stadi_xdit.runtime.faults import PeerFailure, report_and_exit
from stadi_xdit.xdit import cli_hook

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

LAUNCHER = "stadi-xdit"
LAUNCHER_PID = "STADI_LAUNCHER_PID"  # set for the ranks: they die with the launcher
USAGE = "usage: python -m stadi_xdit.run (SCRIPT.py | -m MODULE) [ARGS ...]"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv else 2)
    cli_hook.install()  # no-op unless STADI_XDIT_NO_CLI_HOOK turned the import-time install off
    _as_a_rank()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(USAGE)
        if _find_spec(argv[1]) is None:  # once (rank 0), not a traceback per rank
            fail("stadi_xdit.run", f"no module named {argv[1]!r}")
        sys.argv = [argv[1], *argv[2:]]
        _run_reporting_faults(lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True))
        exit_without_teardown(0)
    script = argv[0]
    if not os.path.isfile(script):
        fail("stadi_xdit.run", script_problem(script))
    sys.argv = list(argv)
    # As `python script.py` does: the script's folder first on sys.path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    _run_reporting_faults(lambda: runpy.run_path(script, run_name="__main__"))
    exit_without_teardown(0)


def _as_a_rank() -> None:
    """This process is one rank of a launch: it beats for the launcher's supervisor, dies with the
    launcher (never an orphan), and ends on Ctrl-C without a traceback (torchrun forwards SIGINT)."""
    import signal

    heartbeat.start()
    launcher = os.environ.pop(LAUNCHER_PID, None)  # not inherited by the processes this rank starts
    if launcher and launcher.isdigit() and sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != int(launcher):  # the launcher died before the line above ran
            os._exit(1)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda *_: os._exit(128 + signal.SIGINT))


def script_problem(script: str) -> str:
    """Why `script` cannot be run as a Python script (it is not a regular file), in words."""
    if os.path.isdir(script):
        return f"the script {script} is a folder, not a Python file"
    if os.path.exists(script):
        return f"the script {script} is not a regular file (a FIFO, device or socket); name a Python file"
    return f"no such script: {script}"


def _run_reporting_faults(run: Callable[[], object]) -> None:
    """A dead or stalled STADI peer, or a bad STADI input found inside xDiT (its runner's config
    dict), ends the script with one line, not a traceback."""
    try:
        run()
    except PeerFailure as error:
        report_and_exit(error)
    except StadiInputError as error:
        fail(os.path.basename(sys.argv[0]) or "stadi_xdit.run", str(error))


# --- launcher -----------------------------------------------------------------------------------

MAX_PORT = 65535


def build_launch_command(argv: Sequence[str]) -> list[str]:
    """The torchrun command `launch` runs (testable without starting anything).

    Without a script, the arguments are xDiT's `xdit` ones and the target is xDiT's model runner
    (`-m xfuser.runner`); STADI inputs are then validated here, before any process starts.
    """
    _quiet_library_notices()
    from xfuser.cli import TORCHRUN_ARGS, get_nproc_from_args

    torchrun, target, script_args = split_launch_args(argv)
    runner_mode = target == ["-m", "xfuser.runner"]
    if runner_mode:
        runner_namespace(script_args)  # unknown or malformed flags first, before counting ranks
    nnodes = torchrun_ints(torchrun)
    node_rank = int(torchrun["--node_rank"] or 0)
    check_stadi_flags_need_use_stadi(script_args)
    try:
        inferred = cli_hook.stadi_nproc_from_args(script_args, get_nproc_from_args, nnodes=nnodes, node_rank=node_rank)
    except ValueError as error:
        if torchrun["--nproc_per_node"] is None:
            fail(LAUNCHER, str(error))
        inferred = None
    nproc = torchrun["--nproc_per_node"]
    if nproc is None:
        nproc = str(inferred)
    elif inferred is not None and "--use_stadi" in script_args and int(nproc) != inferred:
        node = f" on --node_rank {node_rank}" if nnodes > 1 else " per node"
        fail(LAUNCHER, f"--nproc_per_node {nproc} disagrees with the STADI flags ({inferred} "
                       f"process{'' if inferred == 1 else 'es'}{node})")
    if runner_mode:
        check_runner_args(script_args, world_size=launch_world(script_args, int(nproc), nnodes))
    flags = [f"{name}={torchrun[name]}" for name in TORCHRUN_ARGS if name != "--nproc_per_node"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *flags,
            "-m", "stadi_xdit.run", *target, *script_args]


def launch_world(script_args: Sequence[str], nproc: int, nnodes: int) -> int:
    """The whole launch's size, which the runner's inputs are checked against. On several nodes the STADI flags
    name it where they count the ranks (`--stadi_groups`, `--stadi_degree`, per-member lists): the nodes may
    differ in size, each with its own `--nproc_per_node`, and no node's launcher sees the others'. Otherwise
    every node runs `nproc`."""
    if nnodes == 1 or not cli_hook._uses_stadi(cli_hook._flag_values(script_args)):
        return nproc * nnodes
    try:
        if cli_hook.stadi_degree_from_args(script_args) is None:
            return nproc * nnodes
        return cli_hook.stadi_launch_topology(script_args).world_size
    except ValueError as error:
        fail(LAUNCHER, str(error))


LAUNCHER_FLAGS = ("--stadi_degree",)  # STADI flags the launcher reads too, wherever they stand


def split_launch_args(argv: Sequence[str]) -> tuple[dict[str, str | None], list[str], list[str]]:
    """(torchrun's values, the target `-m xfuser.runner` / `-m MODULE` / `SCRIPT`, the target's args).

    torchrun's flags and `--stadi_degree` may come before or after the script (docs/deployment.md
    shows both orders). torchrun's are removed; `--stadi_degree` is passed on to the script (its
    STADI flags check the degree against the launch), after the script's name.
    """
    from xfuser.cli import extract_torchrun_args

    torchrun, rest = extract_torchrun_args(list(argv))
    leading: list[str] = []
    while rest and _is_launcher_flag(rest[0]):
        width = 1 if "=" in rest[0] or len(rest) == 1 else 2
        leading, rest = [*leading, *rest[:width]], rest[width:]
    if not rest or rest[0].startswith("--"):
        return torchrun, ["-m", "xfuser.runner"], [*leading, *rest]
    if rest[0] == "-m":
        if len(rest) < 2:
            fail(LAUNCHER, "-m needs a module name")
        return torchrun, rest[:2], [*leading, *rest[2:]]
    return torchrun, rest[:1], [*leading, *rest[1:]]


def _is_launcher_flag(arg: str) -> bool:
    name = arg.partition("=")[0]
    return name.startswith("--") and "--" + name[2:].replace("-", "_") in LAUNCHER_FLAGS


def check_stadi_flags_need_use_stadi(args: Sequence[str]) -> None:
    """`--stadi_*` flags without `--use_stadi` (nor a config file that switches it on) would run
    plain xDiT and ignore them: one line instead."""
    flags = cli_hook._flag_values(args)
    if "--stadi_config_file" in flags or cli_hook._uses_stadi(flags):
        return  # a config file is read, and checked, by the rank count below
    named = sorted(flag for flag in flags if flag.startswith("--stadi_"))
    if named:
        fail(LAUNCHER, f"{', '.join(named)} need{'s' if len(named) == 1 else ''} --use_stadi (without it this is a "
                       "plain xDiT run, which would ignore them)")


def _int_flag(flag: str, text: str | None, minimum: int, maximum: int | None = None, note: str = "") -> int:
    """`text` as an integer in [minimum, maximum], or one line naming the flag (torchrun would
    print its usage block, a traceback, or divide by zero)."""
    try:
        return cli_hook.checked_int(flag, text, minimum, maximum, note)
    except ValueError as error:
        fail(LAUNCHER, str(error))


def torchrun_ints(torchrun: dict[str, str | None]) -> int:
    """Check torchrun's numeric flags before torchrun sees them; returns the number of nodes."""
    nnodes_text = torchrun["--nnodes"] or ""
    if ":" in nnodes_text:  # torchrun's MIN:MAX form: the STADI rank count is fixed at launch
        fail(LAUNCHER, f"--nnodes {nnodes_text}: elastic node ranges are not supported; give one number of nodes")
    nnodes = _int_flag("--nnodes", nnodes_text, 1)
    _int_flag("--node_rank", torchrun["--node_rank"], 0, nnodes - 1, note=f" (--nnodes {nnodes})")
    _int_flag("--master_port", torchrun["--master_port"], 1, MAX_PORT)
    if torchrun["--nproc_per_node"] is not None:  # torchrun's auto/gpu/cpu would bypass the STADI count
        _int_flag("--nproc_per_node", torchrun["--nproc_per_node"], 1)
    if not (torchrun["--master_addr"] or "").strip():
        fail(LAUNCHER, f"--master_addr must name a host, got {torchrun['--master_addr']!r}")
    return nnodes


def _quiet_library_notices() -> None:
    """The launcher process reports only its own errors: transformers' import notices (e.g. missing
    torchvision) would otherwise surround a one-line error, and so would xfuser's import-time debug
    lines (its runner registry's). The ranks keep their logging."""
    import logging

    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    rank_process.launcher_only(lambda: transformers_logging.set_verbosity(verbosity))
    from xfuser import logger as xfuser_logger  # after: importing xfuser loads transformers' processors

    handler = xfuser_logger._default_handler
    if handler is not None:  # one handler (stdout) serves every xfuser logger
        level = handler.level
        handler.setLevel(logging.WARNING)
        rank_process.launcher_only(lambda: handler.setLevel(level))


def runner_namespace(args: Sequence[str]):
    """`xdit` runner arguments parsed as the runner will (STADI flags included); errors are one line."""
    from xfuser.config import FlexibleArgumentParser, xFuserArgs

    from stadi_xdit.cli_errors import OneLineErrors

    class RunnerParser(OneLineErrors, FlexibleArgumentParser):
        pass

    return xFuserArgs.add_runner_args(RunnerParser(prog=LAUNCHER)).parse_args(list(args))


def check_runner_args(args: Sequence[str], world_size: int) -> None:
    """Validate `xdit` runner arguments against the launch size; a bad one is one line, exit 2."""
    from xfuser.config import xFuserArgs
    from xfuser.model_executor.models.runner_models import base_model

    from stadi_xdit.xdit.runner import stadi_runner_model

    namespace = runner_namespace(args)
    model = base_model.MODEL_REGISTRY.get(namespace.model)
    if model is None:  # first: the other checks read the model's defaults
        fail(LAUNCHER, f"--model {namespace.model} is not in xDiT's model registry")
    try:
        # STADI's args checked against the launch this command starts, not this process's own size
        config = cli_hook.stadi_runner_args(vars(namespace), world_size) or xFuserArgs.from_runner_args(
            vars(namespace))
        if getattr(config, "use_stadi", False):
            model = stadi_runner_model(model, config.model)
        check_model_capabilities(model, config)
        warn_if_output_exists(model, config)
    except ValueError as error:
        fail(LAUNCHER, str(error))


def warn_if_output_exists(model: type, config: Any) -> None:
    """One line before the run when --output_directory already holds what this run will save under the
    same names (xDiT's runner replaces files silently): its outputs, named by the model's own
    `get_output_name` (the STADI form's names carry the strategy), and timings.json."""
    from pathlib import Path

    from stadi_xdit.cli_errors import warn

    probe = settings_probe(model, config)
    defaults = getattr(model, "default_input_values", None)
    size = {key: getattr(config, key, None) or getattr(defaults, key, None) for key in ("height", "width")}
    name = probe.get_output_name(size)
    folder = Path(config.output_directory)
    if not os.path.isdir(folder):  # nothing to replace; check_output_directory says what is wrong with it
        return
    existing = sorted(path.name for path in folder.glob(f"{name}_*.*") if path.suffix in (".png", ".mp4"))
    existing += ["timings.json"] if (folder / "timings.json").is_file() else []  # every run writes this name
    if existing:
        warn(LAUNCHER, f"--output_directory {config.output_directory} already holds {', '.join(existing)}; "
                       f"this run replaces {'it' if len(existing) == 1 else 'them'}")


def check_model_capabilities(model: type, config: object) -> None:
    """The capability check xDiT's runner model makes in every rank (`xFuserModel._validate_config`),
    made once here: e.g. `--use_cfg_parallel` on a model without CFG parallelism, or a `--cache_method`
    it does not list."""
    from xfuser.model_executor.models.runner_models.base_model import ModelCapabilities

    from stadi_xdit.xdit.args import check_cache_config
    from stadi_xdit.xdit.step_cache import cache_dit_settings

    for key in ModelCapabilities.__annotations__:
        value = getattr(config, key, None)
        if getattr(model.capabilities, key):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            if value > 1:
                raise ValueError(f"--model {config.model} does not support --{key} {value}")
        elif value:
            raise ValueError(f"--model {config.model} does not support --{key}")
    method = getattr(config, "cache_method", None)
    if not method:
        check_cache_config(method, getattr(config, "cache_config", None))
        return
    methods = list(model.settings.step_cache_config or {}) if model.capabilities.supports_step_caching else []
    if method not in methods:
        raise ValueError(f"--model {config.model} does not support --cache_method {method}"
                         + (f" (it supports {', '.join(methods)})" if methods else " (no step caching)"))
    cache_dit = cache_dit_settings(model.settings.step_cache_config, method) is not None
    if cache_dit and _find_spec("cache_dit") is None:  # else every rank's traceback, after the load
        raise ValueError(f"--cache_method {method} runs through cache-dit, which is not installed "
                         "(pip install cache-dit)")
    check_cache_config(method, getattr(config, "cache_config", None), cache_dit=cache_dit)  # read in every rank


# --- what the ranks would find missing (checked by `launch`, not by building the command) ---------

def check_launch_environment(argv: Sequence[str]) -> None:
    """Inputs that depend on this machine, checked once before torchrun: the master address, the
    script or module, the model files, the prompt and the output directory. Each is one line."""
    torchrun, target, script_args = split_launch_args(argv)
    if int(torchrun["--nnodes"] or 1) == 1:
        check_local_master(torchrun["--master_addr"] or "", int(torchrun["--master_port"] or 0))
    if target == ["-m", "xfuser.runner"]:
        uses_stadi = cli_hook._uses_stadi(cli_hook._flag_values(script_args))
        check_runner_environment(runner_namespace(script_args),
                                 cli_hook.stadi_groups_from_args(script_args) if uses_stadi else None)
    elif target[0] == "-m":
        check_module(target[1])
    else:
        check_script(target[0])


def check_local_master(addr: str, port: int) -> None:
    """With one node, the master is this machine: an address that is not (torchrun would wait its
    900 s rendezvous for it) or a port already taken is one line."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        fail(LAUNCHER, f"--master_addr {addr} does not resolve: {error}")
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((sockaddr[0], 0))  # any port: is this address one of ours?
        except OSError:
            continue
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((sockaddr[0], port))
        except OSError as error:
            busy = error.errno == errno.EADDRINUSE
            fail(LAUNCHER, f"--master_port {port} is already in use on {addr}; pick a free port" if busy
                 else f"--master_port {port} cannot be opened on {addr}: {error.strerror or error}")
        return
    fail(LAUNCHER, f"--master_addr {addr} is not an address of this machine; with --nnodes 1 the master "
                   "must be local (e.g. 127.0.0.1)")


def check_script(script: str) -> None:
    if os.path.isdir(script):
        fail(LAUNCHER, f"script {script} is a directory, not a Python file")
    if not os.path.isfile(script):
        fail(LAUNCHER, script_problem(script))


def check_module(module: str) -> None:
    """`-m MODULE` names an importable module (a package needs a `__main__`), found the way the ranks
    will (current directory first) without running it."""
    sys.path.insert(0, os.getcwd())  # `python -m` puts the current directory first
    try:
        spec = _find_spec(module)
        package_main = spec is None or spec.submodule_search_locations is None or _find_spec(f"{module}.__main__")
    finally:
        sys.path.remove(os.getcwd())
    if spec is None:
        fail(LAUNCHER, f"-m {module}: no module named {module!r}")
    if not package_main:
        fail(LAUNCHER, f"-m {module} is a package without a __main__ module")


def _find_spec(name: str):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a missing parent package, or an empty or relative name
        return None


def check_runner_environment(namespace, group_sizes: tuple[int, ...] | None = None) -> None:
    """What xDiT's runner refuses in every rank, or fails on after the run: no prompt, model files
    missing, truncated or not in an offline Hugging Face cache, a size past the model's position
    table, heads that the Ulysses degree or a `--stadi_groups` size does not divide, an output
    directory that cannot be written or has no room for the images."""
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    if namespace.prompt is None and getattr(namespace, "dataset_path", None) is None:
        fail(LAUNCHER, f"--model {namespace.model} needs --prompt (or --dataset_path)")
    model = MODEL_REGISTRY.get(namespace.model)
    check_call_inputs(namespace, model)
    # The model's own repo first (its transformer config holds the position limit), then a pipe_name.
    folders = [check_model_files(namespace.model, repo) for repo in (model_repos(model, namespace) if model else ())]
    size = _call_size(namespace, model)
    if folders and folders[0] is not None and size is not None:
        check_position_limit(namespace.model, folders[0], *size)
    if folders and folders[0] is not None:
        check_model_heads(namespace.model, folders[0], getattr(namespace, "ulysses_degree", 1), group_sizes)
    check_output_directory(namespace.output_directory, _output_bytes(namespace, size))
    if getattr(getattr(model, "settings", None), "model_output_type", None) == "video":
        check_video_writer(namespace.model)


def model_repos(model: type, namespace) -> list[str]:
    """The hub repos runner model `model` loads for these arguments: its settings' `model_name` as the
    model's own `_customize_settings` leaves it (Wan2.2-T2V, HunyuanVideo and Qwen-Image-Edit pick it
    there, from --model and --task), and a separate `pipe_name` where the model sets one."""
    probe = settings_probe(model, namespace)
    repos = [probe.settings.model_name, getattr(probe, "pipe_name", None)]
    return [repo for repo in dict.fromkeys(repos) if repo]


def settings_probe(model: type, config: Any) -> Any:
    """A bare instance of runner model `model` with its settings as its `_customize_settings` leaves them
    for `config` (parsed runner args): only that hook runs, no loading and no validation."""
    import copy

    probe = object.__new__(model)
    probe.settings, probe.config = copy.deepcopy(model.settings), config
    probe._customize_settings(config)
    return probe


def check_call_inputs(namespace, model: type | None) -> None:
    """The call's own inputs, which xDiT's parser takes as given: a bare `--prompt`, text that is
    not UTF-8 (the tokenizer fails in every rank), a NaN guidance (CFG silently off), a negative
    prompt that the model's runner never passes to its pipeline."""
    for flag in ("--prompt", "--negative_prompt"):
        values = getattr(namespace, flag[2:], None)
        if values is None:
            continue
        items = values if isinstance(values, list) else [values]
        if not items:
            fail(LAUNCHER, f"{flag} needs a value (text in quotes)")
        for item in items:
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                fail(LAUNCHER, f"{flag} is not valid UTF-8 text (byte {_bad_byte(item, error)} at position "
                               f"{error.start}); pass it in the terminal's UTF-8 encoding")
    guidance = getattr(namespace, "guidance_scale", None)
    if guidance is not None and not math.isfinite(guidance):
        fail(LAUNCHER, f"--guidance_scale must be a finite number, got {guidance}")
    if getattr(namespace, "negative_prompt", None) and model is not None \
            and not runner_passes(model, "negative_prompt"):
        fail(LAUNCHER, f"--model {namespace.model} does not use --negative_prompt (its pipeline call takes none); "
                       "drop it")


def _bad_byte(text: str, error: UnicodeEncodeError) -> str:
    char = text[error.start]
    return f"0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else repr(char)


def runner_passes(model: type, argument: str) -> bool:
    """Whether the runner model's `_run_pipe` hands `argument` to its pipeline (read from its source;
    True when the source cannot be read, so nothing is refused on a guess)."""
    import inspect

    try:
        return argument in inspect.getsource(model._run_pipe)
    except (OSError, TypeError):
        return True


def _call_size(namespace, model: type | None) -> tuple[int, int] | None:
    defaults = getattr(model, "default_input_values", None)
    height = namespace.height or getattr(defaults, "height", None)
    width = namespace.width or getattr(defaults, "width", None)
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def _output_bytes(namespace, size: tuple[int, int] | None) -> int:
    """What the saved images need at most (an RGB PNG is at most about its raw size); 0 for video."""
    if size is None or getattr(namespace, "num_frames", None):
        return 0
    prompts = namespace.prompt if isinstance(namespace.prompt, list) else [namespace.prompt]
    images = max(1, len(prompts)) * max(1, getattr(namespace, "num_images_per_prompt", None) or 1)
    return images * size[0] * size[1] * 3 + (1 << 16)


def check_position_limit(name: str, folder: str, height: int, width: int) -> None:
    """A transformer with a fixed position table (SD3's `pos_embed_max_size`) refuses larger images
    in every rank after loading; the limit is in its config."""
    import json

    from stadi_xdit.paths import read_regular_file

    try:
        config = json.loads(read_regular_file(os.path.join(folder, "transformer", "config.json"), limit=1 << 20))
        vae = json.loads(read_regular_file(os.path.join(folder, "vae", "config.json"), limit=1 << 20))
    except (OSError, ValueError):
        return
    limit, patch = config.get("pos_embed_max_size"), config.get("patch_size") or 1
    if not isinstance(limit, int) or not isinstance(patch, int) or patch < 1:
        return
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    largest = limit * patch * scale
    for flag, value in (("--height", height), ("--width", width)):
        if value > largest:
            fail(LAUNCHER, f"{flag} {value} is past --model {name}'s position table (pos_embed_max_size {limit} x "
                           f"patch {patch} x VAE scale {scale}): at most {largest} px")


def check_model_heads(name: str, folder: str, degree: object, group_sizes: tuple[int, ...] | None = None) -> None:
    """Heads that `--ulysses_degree`, or a `--stadi_groups` size, cannot divide (xDiT refuses them in every rank
    after loading; STADI's groups too), read from the transformer's config in the model folder."""
    import json

    from stadi_xdit.paths import read_regular_file
    from stadi_xdit.topology import check_group_heads, check_ulysses_heads

    if (not isinstance(degree, int) or degree <= 1) and not group_sizes:
        return
    try:
        config = json.loads(read_regular_file(os.path.join(folder, "transformer", "config.json"), limit=1 << 20))
    except (OSError, ValueError):
        return  # an unreadable config is the model files' check's to name
    heads = config.get("num_attention_heads") if isinstance(config, dict) else None
    try:
        check_ulysses_heads(heads, degree if isinstance(degree, int) else 1, f"--model {name}")
        check_group_heads(heads, group_sizes or (), f"--model {name}")
    except ValueError as error:
        fail(LAUNCHER, str(error))


def check_model_files(name: str, repo: str) -> str | None:
    """The model folder (a local one, or the hub repo's snapshot in the Hugging Face cache) holds
    every file the pipeline loads, whole; returns it (None: online and not cached yet)."""
    from stadi_xdit.paths import model_folder_problem

    if os.path.isdir(repo):
        if not os.path.isfile(os.path.join(repo, "model_index.json")):
            fail(LAUNCHER, f"--model {name}: {repo} has no model_index.json (not a diffusers pipeline folder)")
        folder = repo
    else:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "model_index.json")
        if not isinstance(cached, str):
            fill = (f"fill it with `huggingface-cli download {repo}` on a machine with network access, or point "
                    "HF_HOME at a cache that holds it")
            if constants.HF_HUB_OFFLINE:
                fail(LAUNCHER, f"--model {name}: {repo} is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                               f"and HF_HUB_OFFLINE is set; {fill}")
            problem = _hub_unreachable(repo)
            if problem:
                fail(LAUNCHER, f"--model {name}: {repo} is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                               f"and the hub cannot be reached ({problem}); {fill}")
            return None
        folder = os.path.dirname(cached)
    problem = model_folder_problem(folder)
    if problem:
        fail(LAUNCHER, f"--model {name}: the model folder {folder} {problem}")
    return folder


def check_video_writer(name: str) -> None:
    """A video model's runner saves an MP4 through diffusers' `export_to_video` after the whole run;
    without imageio or OpenCV that save fails and the finished video is lost."""
    from diffusers.utils.import_utils import is_imageio_available, is_opencv_available

    if not (is_imageio_available() or is_opencv_available()):
        fail(LAUNCHER, f"--model {name} saves an MP4, which needs imageio (pip install imageio imageio-ffmpeg) "
                       "or OpenCV; neither is installed")


HUB_PROBE_SECONDS = 5.0


def _hub_unreachable(repo: str) -> str | None:
    """Why the ranks could not download `repo` (no network, no such repo, a gated one), or None."""
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, timeout=HUB_PROBE_SECONDS)
    except Exception as error:  # noqa: BLE001 - requests' and the hub's errors alike end the launch here
        return " ".join(f"{type(error).__name__}: {error}".split())[:160]
    return None


def check_output_directory(path: str, needed_bytes: int = 0) -> None:
    """The runner saves into `--output_directory` after the whole run and does not create it; the
    images must fit there (a full disk would end a finished run with a 0-byte PNG)."""
    from stadi_xdit.paths import free_space_problem, output_dir_problem

    problem = output_dir_problem(path) or (free_space_problem(path, needed_bytes) if needed_bytes else None)
    if problem:
        fail(LAUNCHER, f"--output_directory: {problem}")


class XditPlugin(cli_hook.XfuserPlugin):
    """The plugin for an xfuser carrying patches/xfuser-0.7.0-stadi-cli-hook.patch (entry point
    `stadi_xdit.run:XditPlugin`): the hook's answers, plus this launcher's checks for the literal `xdit`
    command, so that `xdit ARGS` refuses what `stadi-xdit ARGS` refuses, before torchrun starts, and
    creates --output_directory (xDiT's runner would fail on a missing one after the whole run)."""

    @staticmethod
    def check_launch(args: Sequence[str]) -> None:
        build_launch_command(args)
        check_launch_environment(args)


# --- running torchrun ------------------------------------------------------------------------------

# Variables a launcher may inherit (a Kubernetes PyTorchJob pod sets them) that describe a rank,
# which the launcher is not: they would silence its errors (cli_errors.is_speaking_rank).
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def launch(argv: Sequence[str] | None = None) -> None:
    """Console script `stadi-xdit`: torchrun with the right process count, plugin loaded first."""
    speak_always()  # the launcher is never a rank, whatever RANK its environment holds
    for name in RANK_VARIABLES:
        os.environ.pop(name, None)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_launch_command(argv)
    check_launch_environment(argv)
    check_fault_injection()
    try:
        start = rank_process.rank_start()
    except ValueError as error:
        fail(LAUNCHER, str(error))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks die with this process
    status = run_torchrun(command[command.index("torch.distributed.run") + 1:], launch_timeout(argv),
                          bind_store=int(split_launch_args(argv)[0]["--nnodes"] or 1) == 1,
                          fork=start == "fork")
    exit_without_teardown(status)


def launch_timeout(argv: Sequence[str]) -> float | None:
    """`--stadi_timeout` of a STADI launch (flag, else config file, else its default); None without STADI."""
    from stadi_xdit.config import StadiConfig

    flags = cli_hook._flag_values(split_launch_args(argv)[2])
    try:  # a script's flags reach no parser in the launcher: checked here as the ranks will
        if not cli_hook._uses_stadi(flags):
            return None
        if flags.get("--stadi_timeout") is not None:
            try:
                seconds = float(flags["--stadi_timeout"])
            except ValueError:
                raise ValueError(f"--stadi_timeout must be a number of seconds, got "
                                 f"{flags['--stadi_timeout']!r}") from None
            return StadiConfig(use_stadi=True, timeout_seconds=seconds).timeout_seconds
        settings = cli_hook._file_settings(flags)
    except ValueError as error:
        fail(LAUNCHER, str(error))
    return (settings or StadiConfig()).timeout_seconds


def check_fault_injection() -> None:
    """`STADI_FAULT` (tests' stall hooks, `runtime/heartbeat.py`) is refused in one line when malformed."""
    text = os.environ.get(heartbeat.ENV_FAULT)
    if text:
        try:
            heartbeat.parse_faults(text)
        except ValueError as error:
            fail(LAUNCHER, str(error))


def run_torchrun(args: Sequence[str], timeout: float | None = None, bind_store: bool = False,
                 fork: bool = False) -> int:
    """torchrun in this process, so that a failed rank ends the launch with that rank's status (2: an
    input error its rank 0 already printed in one line) instead of torchrun's ChildFailedError traceback.

    With a STADI `timeout`, a supervisor (`stadi_xdit.supervisor`) watches every rank's heartbeat and
    ends a stalled launch within `timeout` + `MARGIN_SECONDS`; torchrun's 30 s stop grace becomes
    `STOP_GRACE_SECONDS`. With one node the rendezvous store listens on the master address only.
    With `fork`, the ranks are forks of this process (`stadi_xdit.rank_process`), not new interpreters.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from stadi_xdit.supervisor import Supervisor

    _quiet_torchrun_logs()
    supervisor = Supervisor(timeout, LAUNCHER) if timeout else None
    restore = _patch_torchrun(bind_store)
    unfork = rank_process.fork_ranks(main) if fork else (lambda: None)
    if supervisor is not None:
        os.environ.update(supervisor.env())
        supervisor.start()
    _forward_job_control(supervisor)
    try:
        run(parse_args(list(args)))
    except ChildFailedError as error:
        return failed_rank_status(error, supervisor)
    except SignalException as error:  # Ctrl-C / SIGTERM: the workers are already stopped
        import signal

        sys.stderr.write(f"{LAUNCHER}: stopped by {signal.Signals(int(error.sigval)).name}; every rank ended\n")
        return 128 + int(error.sigval)
    finally:
        unfork()
        restore()
        if supervisor is not None:
            supervisor.close()
    return 0


def _patch_torchrun(bind_store: bool) -> Callable[[], None]:
    """torchrun's agent, in this process only: a short stop grace (a stopped rank ignores SIGTERM,
    and torchrun would wait 30 s for it), and with one node a rendezvous store bound to the master
    address instead of every interface. Returns the undo."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    from stadi_xdit.supervisor import STOP_GRACE_SECONDS

    shutdown, store = LocalElasticAgent._shutdown, static_tcp_rendezvous.TCPStore

    def short_shutdown(self, death_sig=None, timeout=30):
        import signal

        return shutdown(self, death_sig or signal.SIGTERM, min(timeout, STOP_GRACE_SECONDS))

    LocalElasticAgent._shutdown = short_shutdown
    if bind_store:
        static_tcp_rendezvous.TCPStore = _bound_store_factory(store)

    def restore() -> None:
        LocalElasticAgent._shutdown = shutdown
        static_tcp_rendezvous.TCPStore = store

    return restore


def _bound_store_factory(store_class):
    """A TCPStore constructor whose server listens on its host address only: torch binds the
    store's port on every interface, where anyone who can reach it could write to it."""
    import socket

    def make(host, port, world_size=None, is_master=False, timeout=None, **kwargs):
        if not is_master:
            return store_class(host, port, world_size, is_master, timeout, **kwargs)
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(address)
        except OSError as error:
            listener.close()
            fail(LAUNCHER, f"--master_port {port} cannot be opened on {host}: {error.strerror or error}")
        listener.listen(1024)
        try:
            server = store_class(host, port, world_size, is_master, timeout, master_listen_fd=listener.detach(),
                                 **kwargs)
        except TypeError:  # a torch without master_listen_fd
            return store_class(host, port, world_size, is_master, timeout, **kwargs)
        return server

    return make


def _forward_job_control(supervisor) -> None:
    """Ctrl-Z stops the ranks too (they run in their own sessions), and `fg` resumes them; the time
    stopped does not count against --stadi_timeout."""
    import signal

    from stadi_xdit.supervisor import child_pids, signal_children

    if threading_is_main() and hasattr(signal, "SIGTSTP"):
        def on_stop(*_):
            ranks = child_pids()
            signal_children(ranks, signal.SIGSTOP)
            signal.signal(signal.SIGTSTP, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTSTP)  # stop here; returns after SIGCONT
            signal.signal(signal.SIGTSTP, on_stop)
            if supervisor is not None:
                supervisor.resumed()
            signal_children(ranks, signal.SIGCONT)

        signal.signal(signal.SIGTSTP, on_stop)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def failed_rank_status(error: ChildFailedError, supervisor=None) -> int:
    """The exit status for a failed launch, with at most one line of our own, naming the rank that
    failed first: the one the supervisor ended, else one that did not exit because of a peer."""
    import signal

    if supervisor is not None and supervisor.culprit is not None:
        return 1  # its line is printed
    stopped = [rank for rank, failure in error.failures.items() if failure.exitcode == -signal.SIGTERM]
    first = supervisor.first_failure(error.failures, stopped) if supervisor is not None else None
    if first is not None and first in error.failures:
        rank, failure = first, error.failures[first]
    else:
        rank, failure = error.get_first_failure()
    code = failure.exitcode
    if code == USAGE_ERROR:  # the rank has reported the input in one line
        return USAGE_ERROR
    phase = supervisor.ended_after_its_peers(rank) if supervisor is not None and code < 0 else None
    if phase is not None:  # torchrun's SIGTERM ended it after its peers' bounded waits gave up
        fail(LAUNCHER, f"rank {rank} stopped responding in {phase} (its peers gave up after --stadi_timeout "
                       f"{supervisor.timeout:g} s)", status=1)
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
        fail(LAUNCHER, f"rank {rank} {how}", status=1)
    fail(LAUNCHER, f"rank {rank} exited with status {code}", status=code if code > 0 else 1)


def _quiet_torchrun_logs() -> None:
    """torchrun's agent logs each failure again (and its SIGTERMs to the other ranks); the launcher
    reports the failure itself. LOGLEVEL, torchrun's own switch, keeps them."""
    import logging

    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logger = logging.getLogger(name)
            rank_process.launcher_only(lambda logger=logger, level=logger.level: logger.setLevel(level))
            logger.setLevel(logging.CRITICAL)


if __name__ == "__main__":
    main()
