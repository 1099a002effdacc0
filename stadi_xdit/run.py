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

import os
import runpy
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook, before the script imports xfuser)
from stadi_xdit.cli_errors import USAGE_ERROR, StadiInputError, fail
from stadi_xdit.runtime.faults import PeerFailure, report_and_exit
from stadi_xdit.xdit import cli_hook

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

LAUNCHER = "stadi-xdit"
USAGE = "usage: python -m stadi_xdit.run (SCRIPT.py | -m MODULE) [ARGS ...]"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv else 2)
    cli_hook.install()  # no-op unless STADI_XDIT_NO_CLI_HOOK turned the import-time install off
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(USAGE)
        if _find_spec(argv[1]) is None:  # once (rank 0), not a traceback per rank
            fail("stadi_xdit.run", f"no module named {argv[1]!r}")
        sys.argv = [argv[1], *argv[2:]]
        _run_reporting_faults(lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True))
        return
    script = argv[0]
    if not os.path.isfile(script):
        fail("stadi_xdit.run", f"no such script: {script}")
    sys.argv = list(argv)
    # As `python script.py` does: the script's folder first on sys.path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    _run_reporting_faults(lambda: runpy.run_path(script, run_name="__main__"))


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
    try:
        inferred = cli_hook.stadi_nproc_from_args(script_args, get_nproc_from_args, nnodes=nnodes)
    except ValueError as error:
        if torchrun["--nproc_per_node"] is None:
            fail(LAUNCHER, str(error))
        inferred = None
    nproc = torchrun["--nproc_per_node"]
    if nproc is None:
        nproc = str(inferred)
    elif inferred is not None and "--use_stadi" in script_args and int(nproc) != inferred:
        fail(LAUNCHER, f"--nproc_per_node {nproc} disagrees with the STADI flags ({inferred} processes per node)")
    if runner_mode:
        check_runner_args(script_args, world_size=int(nproc) * nnodes)
    flags = [f"{name}={torchrun[name]}" for name in TORCHRUN_ARGS if name != "--nproc_per_node"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *flags,
            "-m", "stadi_xdit.run", *target, *script_args]


def split_launch_args(argv: Sequence[str]) -> tuple[dict[str, str | None], list[str], list[str]]:
    """(torchrun's values, the target `-m xfuser.runner` / `-m MODULE` / `SCRIPT`, the target's args)."""
    from xfuser.cli import extract_torchrun_args

    torchrun, rest = extract_torchrun_args(list(argv))
    if not rest or rest[0].startswith("--"):
        return torchrun, ["-m", "xfuser.runner"], rest
    if rest[0] == "-m":
        if len(rest) < 2:
            fail(LAUNCHER, "-m needs a module name")
        return torchrun, rest[:2], rest[2:]
    return torchrun, rest[:1], rest[1:]


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

    transformers_logging.set_verbosity_error()
    from xfuser import logger as xfuser_logger  # after: importing xfuser loads transformers' processors

    if xfuser_logger._default_handler is not None:  # one handler (stdout) serves every xfuser logger
        xfuser_logger._default_handler.setLevel(logging.WARNING)


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
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # what `validate` checks the degrees against
    try:
        config = xFuserArgs.from_runner_args(vars(namespace))
        model = base_model.MODEL_REGISTRY.get(config.model)
        if model is None:
            fail(LAUNCHER, f"--model {config.model} is not in xDiT's model registry")
        if getattr(config, "use_stadi", False):
            model = stadi_runner_model(model, config.model)
        check_model_capabilities(model, config)
        warn_if_output_exists(model, config)
    except ValueError as error:
        fail(LAUNCHER, str(error))
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


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
    existing = sorted(path.name for path in folder.glob(f"{name}_*.*") if path.suffix in (".png", ".mp4"))
    existing += ["timings.json"] if (folder / "timings.json").is_file() else []  # every run writes this name
    if existing:
        warn(LAUNCHER, f"--output_directory {config.output_directory} already holds {', '.join(existing)}; "
                       f"this run replaces {'it' if len(existing) == 1 else 'them'}")


def check_model_capabilities(model: type, config: object) -> None:
    """The capability check xDiT's runner model makes in every rank (`xFuserModel._validate_config`),
    made once here: e.g. `--use_cfg_parallel` on a model without CFG parallelism."""
    from xfuser.model_executor.models.runner_models.base_model import ModelCapabilities

    for key in ModelCapabilities.__annotations__:
        value = getattr(config, key, None)
        if getattr(model.capabilities, key):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            if value > 1:
                raise ValueError(f"--model {config.model} does not support --{key} {value}")
        elif value:
            raise ValueError(f"--model {config.model} does not support --{key}")


# --- what the ranks would find missing (checked by `launch`, not by building the command) ---------

def check_launch_environment(argv: Sequence[str]) -> None:
    """Inputs that depend on this machine, checked once before torchrun: the master address, the
    script or module, the model files, the prompt and the output directory. Each is one line."""
    torchrun, target, script_args = split_launch_args(argv)
    if int(torchrun["--nnodes"] or 1) == 1:
        check_local_master(torchrun["--master_addr"] or "", int(torchrun["--master_port"] or 0))
    if target == ["-m", "xfuser.runner"]:
        check_runner_environment(runner_namespace(script_args))
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
        fail(LAUNCHER, f"no such script: {script}")


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


def check_runner_environment(namespace) -> None:
    """What xDiT's runner refuses in every rank, or fails on after the run: no prompt, model files
    not in an offline Hugging Face cache, an output directory that cannot be written."""
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    if namespace.prompt is None and getattr(namespace, "dataset_path", None) is None:
        fail(LAUNCHER, f"--model {namespace.model} needs --prompt (or --dataset_path)")
    model = MODEL_REGISTRY.get(namespace.model)
    for repo in model_repos(model, namespace) if model is not None else ():
        check_model_files(namespace.model, repo)
    check_output_directory(namespace.output_directory)
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


def check_model_files(name: str, repo: str) -> None:
    """With HF_HUB_OFFLINE, the runner model's hub repo must already be in the cache (online, the
    ranks download it)."""
    if os.path.isdir(repo):
        if not os.path.isfile(os.path.join(repo, "model_index.json")):
            fail(LAUNCHER, f"--model {name}: {repo} has no model_index.json (not a diffusers pipeline folder)")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    if not isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        fail(LAUNCHER, f"--model {name}: {repo} is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                       "and HF_HUB_OFFLINE is set")


def check_video_writer(name: str) -> None:
    """A video model's runner saves an MP4 through diffusers' `export_to_video` after the whole run;
    without imageio or OpenCV that save fails and the finished video is lost."""
    from diffusers.utils.import_utils import is_imageio_available, is_opencv_available

    if not (is_imageio_available() or is_opencv_available()):
        fail(LAUNCHER, f"--model {name} saves an MP4, which needs imageio (pip install imageio imageio-ffmpeg) "
                       "or OpenCV; neither is installed")


def check_output_directory(path: str) -> None:
    """The runner saves into `--output_directory` after the whole run and does not create it."""
    from stadi_xdit.paths import output_dir_problem

    problem = output_dir_problem(path)
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

def launch(argv: Sequence[str] | None = None) -> None:
    """Console script `stadi-xdit`: torchrun with the right process count, plugin loaded first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_launch_command(argv)
    check_launch_environment(argv)
    raise SystemExit(run_torchrun(command[command.index("torch.distributed.run") + 1:]))


def run_torchrun(args: Sequence[str]) -> int:
    """torchrun in this process, so that a failed rank ends the launch with that rank's status (2: an
    input error its rank 0 already printed in one line) instead of torchrun's ChildFailedError traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _quiet_torchrun_logs()
    try:
        run(parse_args(list(args)))
    except ChildFailedError as error:
        return failed_rank_status(error)
    except SignalException as error:  # Ctrl-C / SIGTERM: the workers are already stopped
        return 128 + int(error.sigval)
    return 0


def failed_rank_status(error: ChildFailedError) -> int:
    """The exit status for a failed launch, with at most one line of our own."""
    import signal

    rank, failure = error.get_first_failure()
    code = failure.exitcode
    if code == USAGE_ERROR:  # the rank has reported the input in one line
        return USAGE_ERROR
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
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    main()
