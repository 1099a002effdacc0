"""The real `stadi-xdit` launcher under faults (issue 21): a rank stalled in any phase, a killed rank,
Ctrl-C and SIGKILL of the launcher. The launcher exits within --stadi_timeout plus its margin, names
the rank that failed first, prints at most one line of its own, and leaves no process behind.

Faults come from the heartbeat's test hook (`STADI_FAULT=PHASE:RANK[:HOW]`, runtime/heartbeat.py).
The subprocess timeout is only a hang guard; no test asserts elapsed seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stadi_xdit.offline.processes import ranks_denoising, reap_leftovers
from stadi_xdit.offline.spawn import free_port
from stadi_xdit.supervisor import MARGIN_SECONDS

pytestmark = pytest.mark.cpu_only("CPU runs of the tiny offline cache")

TIMEOUT = 5  # --stadi_timeout: the smallest accepted
STARTUP_GUARD = 240  # imports and the tiny model on 2 shared cores, generously: only a hang guard
RUN = ["--model", "FLUX.1-dev", "--use_stadi", "--stadi_degree", "2", "--height", "128", "--width", "128",
       "--max_sequence_length", "16", "--warmup_steps", "1", "--prompt", "a cat", "--stadi_timeout", str(TIMEOUT)]


@pytest.fixture(scope="module")
def hub(make_hub_cache) -> Path:
    return make_hub_cache(["FLUX.1-dev"])


def _command(tmp_path: Path, steps: int, extra: list[str] = ()) -> list[str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return [sys.executable, "-c", "from stadi_xdit.run import launch; launch()", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *RUN, "--num_inference_steps", str(steps),
            "--output_directory", str(out), *extra]


def _env(hub: Path, tmp_path: Path, tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                             "STADI_FAULT")}
    env.update(HF_HOME=str(hub), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
               TMPDIR=str(tmp_path), STADI_TEST_TAG=tag, STADI_FAULT_STAMP=str(tmp_path / "fault"), **extra)
    return env


def _no_leftovers(tag: str) -> None:
    """Every process of the launch ends (within a hang guard; what is left is killed and reported)."""
    left = reap_leftovers("STADI_TEST_TAG", tag)
    assert not left, f"processes left behind: {left}"


def _launcher_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("stadi-xdit")]


@pytest.mark.parametrize("fault,phase", [("decode:1", "decode"), ("load:1", "load"), ("stadi step:1", "stadi step")])
def test_a_stopped_rank_ends_the_launch_naming_it(hub, tmp_path, fault, phase):
    """Rank 1 stops (SIGSTOP) in decode / model load / a STADI step: the launcher names rank 1 and the phase."""
    tag = f"stall-{phase.replace(' ', '-')}"
    proc = subprocess.run(_command(tmp_path, 4), env=_env(hub, tmp_path, tag, STADI_FAULT=f"{fault}:stop"),
                          capture_output=True, text=True, timeout=STARTUP_GUARD + TIMEOUT + MARGIN_SECONDS,
                          check=False)
    _no_leftovers(tag)
    lines = _launcher_lines(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (tmp_path / "fault").exists(), f"the launch ended before the fault fired:\n{proc.stderr[-3000:]}"
    assert (tmp_path / "fault").read_text().split(" ", 1)[1].startswith(phase)  # the fault did fire there
    assert len(lines) == 1 and f"rank 1 stopped responding in {phase}" in lines[0], lines
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    survivors = [line for line in proc.stderr.splitlines() if line.startswith("stadi: peer")]
    assert all("peer rank 1 " in line for line in survivors), survivors


def test_a_rank_that_fails_first_is_named_not_the_survivor(hub, tmp_path):
    tag = "exit"
    proc = subprocess.run(_command(tmp_path, 4), env=_env(hub, tmp_path, tag, STADI_FAULT="stadi step:1:exit"),
                          capture_output=True, text=True, timeout=STARTUP_GUARD + TIMEOUT + MARGIN_SECONDS,
                          check=False)
    _no_leftovers(tag)
    lines = _launcher_lines(proc.stderr)
    assert proc.returncode == 1 and lines == ["stadi-xdit: error: rank 1 exited with status 1"], proc.stderr[-3000:]


def _started(tmp_path: Path, proc: subprocess.Popen) -> None:
    """Wait (hang guard) until both ranks are in STADI's denoising loop, from their heartbeats."""
    deadline = time.monotonic() + STARTUP_GUARD
    while time.monotonic() < deadline and proc.poll() is None:
        if ranks_denoising(tmp_path):
            return
        time.sleep(0.05)
    pytest.fail(f"the ranks did not reach the denoising loop (launcher status {proc.poll()})")


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets that process `pid` listens on (from /proc, like `ss -ltn`)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


def test_ctrl_c_ends_every_rank_in_one_line_and_the_store_is_not_on_every_interface(hub, tmp_path):
    tag = "sigint"
    proc = subprocess.Popen(_command(tmp_path, 40), env=_env(hub, tmp_path, tag), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        _started(tmp_path, proc)
        listening = _listening_addresses(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT + MARGIN_SECONDS + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _no_leftovers(tag)
    assert listening, "the launcher hosts the rendezvous store"
    wildcard = [address for address in listening if address.split(":")[0].strip("0") == ""]
    assert not wildcard, f"listening on a wildcard address: {listening}"
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert _launcher_lines(stderr) == ["stadi-xdit: stopped by SIGINT; every rank ended"]


def test_sigkill_of_the_launcher_leaves_no_rank_behind(hub, tmp_path):
    tag = "sigkill"
    proc = subprocess.Popen(_command(tmp_path, 40), env=_env(hub, tmp_path, tag), stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    try:
        _started(tmp_path, proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _no_leftovers(tag)
    assert not list((tmp_path / "out").glob("*.png"))  # the ranks did not run on to the end


def _fault_run(hub: Path, tmp_path: Path, tag: str, fault: str, steps: int = 4) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(tmp_path, steps), env=_env(hub, tmp_path, tag, STADI_FAULT=fault),
                          capture_output=True, text=True, timeout=STARTUP_GUARD + 4 * TIMEOUT + MARGIN_SECONDS,
                          check=False)
    _no_leftovers(tag)
    return proc


def test_a_slow_but_working_rank_longer_than_the_timeout_finishes_and_saves(hub, tmp_path):
    """Rank 1 (the runner's output rank) spends twice --stadi_timeout in its first warmup step, then in its
    decode, reporting progress: work, not a stall. Its peer keeps waiting in the warmup's K/V gather while
    it hears of the progress. The decode used to be ended as 'stalled in decode', losing the finished
    denoise, and the warmup step as 'stalled in warmup step 0'."""
    proc = _fault_run(hub, tmp_path, "slow-rank", "warmup step:1:slow,decode:1:slow")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fault").read_text().split(" ", 1)[1].startswith("decode")  # the slow decode did run
    assert not _launcher_lines(proc.stderr) and len(list((tmp_path / "out").glob("*.png"))) == 1


def test_a_rank_wedged_after_the_output_is_saved_is_ended_and_the_output_kept(hub, tmp_path):
    """Rank 0 is done with its part (idle) and wedges there, never reaching its teardown: once rank 1 has
    saved and no rank works any more, the launch ends within the timeout, naming rank 0; the image stays."""
    proc = _fault_run(hub, tmp_path, "wedged-teardown", "idle:0:sleep")
    lines = _launcher_lines(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and "rank 0 stalled in idle" in lines[0] and "finished its work" in lines[0], lines
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_supervision_survives_its_folder_deleted_mid_run(hub, tmp_path):
    """A /tmp cleaner deletes the heartbeat folder while the ranks denoise; a later stall is still found."""
    import shutil

    tag = "folder-deleted"
    proc = subprocess.Popen(_command(tmp_path, 40), env=_env(hub, tmp_path, tag, STADI_FAULT="decode:1:sleep"),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        _started(tmp_path, proc)
        (folder,) = tmp_path.glob("stadi-heartbeat-*")
        # Like a /tmp cleaner: a beat written between the listing and the rmdir leaves the folder standing.
        shutil.rmtree(folder, ignore_errors=True)
        _, stderr = proc.communicate(timeout=STARTUP_GUARD + TIMEOUT + MARGIN_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
    _no_leftovers(tag)
    lines = _launcher_lines(stderr)
    assert proc.returncode == 1 and len(lines) == 1 and "rank 1 stalled in decode" in lines[0], stderr[-3000:]


NESTED_SCRIPT = """\
import subprocess, sys
inner = subprocess.run([sys.executable, "-m", "stadi_xdit.run", sys.argv[1]], capture_output=True, text=True)
print("inner:", inner.returncode, inner.stdout.strip(), flush=True)
"""


def test_the_launchers_variables_do_not_leak_into_what_a_rank_starts(tmp_path):
    """A script run by stadi-xdit runs `python -m stadi_xdit.run other.py` itself: the inner run is not taken
    for a rank of the launch (it used to exit 1 with no output, its parent not being the launcher)."""
    outer, inner = tmp_path / "outer.py", tmp_path / "inner.py"
    outer.write_text(NESTED_SCRIPT)
    inner.write_text("import os\nprint('ran', os.environ.get('STADI_LAUNCHER_PID'), os.environ.get('STADI_HEARTBEAT_DIR'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", "from stadi_xdit.run import launch; launch()", "--nproc_per_node", "1",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(outer), str(inner)],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=STARTUP_GUARD,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inner: 0 ran None None" in proc.stdout, proc.stdout[-2000:]
