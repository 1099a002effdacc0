"""Run an unmodified xDiT script with the STADI plugin loaded first.

    torchrun --nproc_per_node 2 -m stadi_xdit.run examples/pixartalpha_example.py --model ... --use_stadi
    python -m stadi_xdit.run -m some.module --args ...      # a module instead of a script

`import stadi_xdit` installs the CPU compat layer (no CUDA) and the CLI hook
(`stadi_xdit.xdit.cli_hook`), then the script runs as `__main__` with `sys.argv` as if it had been
started directly; without `--use_stadi` it behaves exactly as plain xDiT.

`stadi-xdit` (`launch`) is the matching launcher, xDiT's `xdit` command for scripts:

    stadi-xdit [--nproc_per_node N | --stadi_degree N] [--nnodes ... --master_port ...] \\
        script.py --use_stadi [--use_cfg_parallel] [--stadi_speeds 1,0.5] ...

It starts `torch.distributed.run ... -m stadi_xdit.run script.py ...`; the number of processes is
`--nproc_per_node` when given, else the STADI rule of `cli_hook.stadi_nproc_from_args`
(STADI degree x 2 with CFG parallelism), else xDiT's own degree product.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Sequence

import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook, before the script imports xfuser)
from stadi_xdit.runtime.faults import PeerFailure, report_and_exit
from stadi_xdit.xdit import cli_hook

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
    """A dead or stalled STADI peer ends the script with one line naming it, not a traceback."""
    try:
        run()
    except PeerFailure as error:
        report_and_exit(error)


# --- launcher -----------------------------------------------------------------------------------

def _take(args: list[str], flag: str) -> str | None:
    """Remove `flag value` / `flag=value` from `args` (dashes or underscores); return the value."""
    names = {flag, flag.replace("_", "-")}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                del args[i]
                return value
            if i + 1 < len(args):
                value = args[i + 1]
                del args[i:i + 2]
                return value
            raise SystemExit(f"{flag} needs a value")
    return None


def build_launch_command(argv: Sequence[str]) -> list[str]:
    """The torchrun command `launch` runs (testable without starting anything)."""
    from xfuser.cli import TORCHRUN_ARGS, extract_torchrun_args, get_nproc_from_args

    args = list(argv)
    stadi_degree = _take(args, "--stadi_degree")  # a launcher flag: the script never sees it
    torchrun, rest = extract_torchrun_args(args)
    if not rest:
        raise SystemExit("stadi-xdit: name a script (SCRIPT.py or -m MODULE) after the launcher flags")
    if rest[0] == "-m":
        target, script_args = rest[:2], rest[2:]
    else:
        target, script_args = rest[:1], rest[1:]
    rule_args = script_args + ([f"--stadi_degree={stadi_degree}"] if stadi_degree else [])
    nnodes = int(torchrun["--nnodes"])
    try:
        inferred = cli_hook.stadi_nproc_from_args(rule_args, get_nproc_from_args, nnodes=nnodes)
    except ValueError as error:
        if torchrun["--nproc_per_node"] is None:
            raise SystemExit(f"stadi-xdit: {error}") from None
        inferred = None
    nproc = torchrun["--nproc_per_node"]
    if nproc is None:
        nproc = str(inferred)
    elif inferred is not None and "--use_stadi" in script_args and int(nproc) != inferred:
        raise SystemExit(f"stadi-xdit: --nproc_per_node {nproc} disagrees with the STADI flags "
                         f"({inferred} processes per node)")
    flags = [f"{name}={torchrun[name]}" for name in TORCHRUN_ARGS if name != "--nproc_per_node"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *flags,
            "-m", "stadi_xdit.run", *target, *script_args]


def launch(argv: Sequence[str] | None = None) -> None:
    """Console script `stadi-xdit`: torchrun with the right process count, plugin loaded first."""
    command = build_launch_command(sys.argv[1:] if argv is None else argv)
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main()
