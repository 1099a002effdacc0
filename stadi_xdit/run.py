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

It starts `torch.distributed.run ... -m stadi_xdit.run (-m xfuser.runner | script.py) ...`; the
number of processes is `--nproc_per_node` when given, else the STADI rule of
`cli_hook.stadi_nproc_from_args` (`--stadi_degree`, x2 with CFG parallelism), else xDiT's own
degree product. Runner arguments are validated here, before any process starts.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Sequence

import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook, before the script imports xfuser)
from stadi_xdit.cli_errors import StadiInputError, fail
from stadi_xdit.runtime.faults import PeerFailure, report_and_exit
from stadi_xdit.xdit import cli_hook

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
        sys.argv = [argv[1], *argv[2:]]
        _run_reporting_faults(lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True))
        return
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"stadi_xdit.run: no such script: {script}")
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

def build_launch_command(argv: Sequence[str]) -> list[str]:
    """The torchrun command `launch` runs (testable without starting anything).

    Without a script, the arguments are xDiT's `xdit` ones and the target is xDiT's model runner
    (`-m xfuser.runner`); STADI inputs are then validated here, before any process starts.
    """
    _quiet_library_notices()
    from xfuser.cli import TORCHRUN_ARGS, extract_torchrun_args, get_nproc_from_args

    torchrun, rest = extract_torchrun_args(list(argv))
    runner_mode = not rest or rest[0].startswith("--")
    if runner_mode:
        target, script_args = ["-m", "xfuser.runner"], rest
        runner_namespace(script_args)  # unknown or malformed flags first, before counting ranks
    elif rest[0] == "-m":
        if len(rest) < 2:
            fail(LAUNCHER, "-m needs a module name")
        target, script_args = rest[:2], rest[2:]
    else:
        target, script_args = rest[:1], rest[1:]
    nnodes = int(torchrun["--nnodes"])
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


def _quiet_library_notices() -> None:
    """The launcher process reports only its own errors: transformers' import notices (e.g. missing
    torchvision) would otherwise surround a one-line error. The ranks keep their logging."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


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

    from stadi_xdit.xdit.runner import stadi_runner_model

    namespace = runner_namespace(args)
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # what `validate` checks the degrees against
    try:
        config = xFuserArgs.from_runner_args(vars(namespace))
        if getattr(config, "use_stadi", False):
            from xfuser.model_executor.models.runner_models import base_model

            model = base_model.MODEL_REGISTRY.get(config.model)
            if model is None:
                fail(LAUNCHER, f"--model {config.model} is not in xDiT's model registry")
            stadi_runner_model(model, config.model)
    except ValueError as error:
        fail(LAUNCHER, str(error))
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def launch(argv: Sequence[str] | None = None) -> None:
    """Console script `stadi-xdit`: torchrun with the right process count, plugin loaded first."""
    command = build_launch_command(sys.argv[1:] if argv is None else argv)
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main()
