"""How `stadi-xdit` starts its ranks (`stadi_xdit.rank_process`): on CPU, forks of the launcher that
run as executed ranks would; executed ones with `STADI_RANK_START=exec` (the CUDA path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stadi_xdit import cli_errors, rank_process
from stadi_xdit.offline.spawn import free_port
from stadi_xdit.run import launch

REPO = Path(__file__).resolve().parents[1]

# What a rank sees of its own process, and the ends a normal exit delivers (a late non-daemon
# thread, an exit handler, output left without a newline).
RANK_SCRIPT = """\
import atexit, json, os, pathlib, signal, sys, threading, time
from stadi_xdit import cli_errors
out = pathlib.Path(sys.argv[1])
rank = int(os.environ["RANK"])
parent = pathlib.Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
seen = {
    "forked": pathlib.Path("/proc/self/cmdline").read_bytes() == parent,
    "argv": sys.argv[1:],
    "world": os.environ["WORLD_SIZE"],
    "own_session": os.getsid(0) == os.getpid(),
    "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    "path0_is_cwd": sys.path[0] == os.getcwd(),
    "speaks": cli_errors.is_speaking_rank(),
    "write_through": sys.stdout.write_through,
}
(out / f"rank{rank}.json").write_text(json.dumps(seen))
threading.Thread(target=lambda: (time.sleep(0.5), (out / f"thread{rank}").write_text("late"))).start()
atexit.register(lambda: (out / f"atexit{rank}").write_text("ran"))
sys.stdout.write(f"rank {rank} without a newline;")
if rank == 1 and len(sys.argv) > 2:
    raise RuntimeError(sys.argv[2])
"""


def _launch(tmp_path: Path, start: str, *script_args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", STADI_RANK_START=start, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", "from stadi_xdit.run import launch; launch()", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path),
               *script_args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env, check=False)


@pytest.mark.parametrize("start", ["auto", "exec"])
def test_a_rank_runs_as_an_executed_one_whether_forked_or_not(tmp_path, start):
    """`auto` on this CPU machine forks the ranks; `exec` executes them (the CUDA path). Either way a rank
    has its own session, default signal handlers, `-u` streams, `-m`'s path and its own rank's voice,
    and its exit delivers what a normal exit does."""
    out = _launch(tmp_path, start)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"forked": start == "auto", "argv": [str(tmp_path)], "world": "2", "own_session": True,
                        "sigterm_default": True, "path0_is_cwd": True, "speaks": rank == 0,
                        "write_through": True}, seen
        assert (tmp_path / f"thread{rank}").read_text() == "late"
        assert (tmp_path / f"atexit{rank}").read_text() == "ran"
        assert f"rank {rank} without a newline;" in out.stdout


def test_a_forked_rank_that_raises_prints_its_traceback_and_the_launch_names_it(tmp_path):
    out = _launch(tmp_path, "fork", "boom from rank 1")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "RuntimeError: boom from rank 1" in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("stadi-xdit")] == [
        "stadi-xdit: error: rank 1 exited with status 1"]
    assert (tmp_path / "atexit1").read_text() == "ran"  # its exit handlers ran all the same


def test_a_bad_rank_start_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_errors, "_ALWAYS_SPEAKS", False)
    monkeypatch.setenv(rank_process.ENV_RANK_START, "spawn")
    (tmp_path / "ok.py").write_text("")
    with pytest.raises(SystemExit) as info:
        launch(["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "ok.py"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and lines == [
        "stadi-xdit: error: STADI_RANK_START='spawn': choose one of auto, fork, exec"], lines


@pytest.mark.parametrize("value,start", [("fork", "fork"), ("exec", "exec"), (" ", "fork"), ("auto", "fork")])
def test_rank_start_without_an_accelerator(value, start, monkeypatch):
    import torch

    monkeypatch.setenv(rank_process.ENV_RANK_START, value)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert rank_process.rank_start() == start
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert rank_process.rank_start() == ("fork" if value == "fork" else "exec")


def test_only_a_stadi_rank_command_is_forked():
    python = sys.executable
    assert rank_process.rank_args([python, "-u", "-m", "stadi_xdit.run", "-m", "xfuser.runner", "--model", "m"]) == [
        "-m", "xfuser.runner", "--model", "m"]
    assert rank_process.rank_args([python, "-u", "-m", "other.module"]) is None
    assert rank_process.rank_args([python, "script.py"]) is None
