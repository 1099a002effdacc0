"""The `--faults` group of `probe_bad_inputs.py`: the real `stadi-xdit` with the tiny FLUX.1-dev under
the faults of issue 21, each case classified clean / traceback / hang / silent / accepted / lost.

Every case also prints its fault-to-exit time (from the fault's own time stamp, or the moment a
signal was sent, to the launcher's exit) and the launcher's lines, for the closing note.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stadi_xdit.offline.processes import beats_under, ranks_denoising, reap_leftovers
from stadi_xdit.offline.spawn import free_port  # below the ephemeral range: no other socket takes it first
from stadi_xdit.supervisor import MARGIN_SECONDS

TIMEOUT = 5.0
STARTUP_GUARD = 300.0
BOUND = TIMEOUT + MARGIN_SECONDS


def _rank_pid(folder: Path, rank: int) -> int:
    return beats_under(folder)[rank]["pid"]


def launch(hub: Path, tag: str, *, fault: str | None = None, action: Callable[[Path, subprocess.Popen], None] | None
           = None, extra: list[str] = (), steps: int = 4, out: Path | None = None, cwd: Path | None = None) -> dict:
    """One launch; `action(private_tmp, proc)` runs once both ranks are denoising (its moment is the fault's)."""
    private = Path(tempfile.mkdtemp(prefix=f"probe-{tag}-"))
    out = out or private / "out"
    out.mkdir(exist_ok=True)
    stamp = private / "fault"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "STADI_FAULT")}
    env.update(HF_HOME=str(hub), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
               TMPDIR=str(private), STADI_PROBE_TAG=tag, STADI_FAULT_STAMP=str(stamp))
    if fault:
        env["STADI_FAULT"] = fault
    command = [sys.executable, "-c", "from stadi_xdit.run import launch; launch()", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--model", "FLUX.1-dev", "--use_stadi", "--stadi_degree", "2",
               "--height", "128", "--width", "128", "--max_sequence_length", "16", "--warmup_steps", "1",
               "--prompt", "a cat", "--stadi_timeout", f"{TIMEOUT:g}", "--num_inference_steps", str(steps),
               "--output_directory", str(out), *extra]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            cwd=cwd or private)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line.rstrip()) for line in proc.stderr))
    reader.start()
    fault_time = None
    if action is not None:
        deadline = time.monotonic() + STARTUP_GUARD
        while time.monotonic() < deadline and proc.poll() is None and not ranks_denoising(private):
            time.sleep(0.02)
        fault_time = time.time()
        action(private, proc)
    try:
        rc: int | str = proc.wait(timeout=STARTUP_GUARD + BOUND)
    except subprocess.TimeoutExpired:
        rc = "hang"
        proc.kill()
        proc.wait()
    ended = time.time()
    reader.join(10)
    if stamp.exists() and (fault_time is None or fault):  # an injected fault's own moment beats the action's
        fault_time = float(stamp.read_text().split()[0])
    left = reap_leftovers("STADI_PROBE_TAG", tag, guard_seconds=15)
    return {"rc": rc, "lines": [line for _, line in lines], "leftovers": left, "out": out, "private": private,
            "fault_to_exit": None if fault_time is None else ended - fault_time,
            "images": sorted(str(p) for p in [*out.glob("*.png"), *(cwd or private).glob("*.png")])}


def classify(result: dict, *, status: int | None, needle: str | None, image: bool | None) -> tuple[str, str]:
    """clean / traceback / hang / silent / accepted / lost for one launch, and its one-line summary."""
    lines = result["lines"]
    ours = [line for line in lines if line.startswith(("stadi-xdit", "stadi: peer", "stadi: warning", "stadi: error"))]
    seconds = result["fault_to_exit"]
    summary = (f"rc={result['rc']} fault->exit {seconds:.1f} s; " if seconds is not None else f"rc={result['rc']}; ") + \
        " | ".join(ours)[:400]
    (result["private"] / "stderr.txt").write_text("\n".join(lines))
    summary += f" [stderr: {result['private'] / 'stderr.txt'}]"
    if result["rc"] == "hang" or result["leftovers"] or (seconds is not None and seconds > BOUND and status != 0):
        return "hang", summary + f" (leftovers {result['leftovers']})"
    if any("Traceback" in line or "KeyboardInterrupt" in line for line in lines):
        return "traceback", summary
    if image is True and not result["images"]:
        return "lost", summary
    if status is not None and result["rc"] != status:
        return ("accepted" if result["rc"] == 0 else "traceback"), summary
    launcher = [line for line in lines if line.startswith("stadi-xdit")]
    if needle is not None:
        if not launcher:
            return "silent", summary
        if len(launcher) != 1 or needle not in launcher[0]:
            return "traceback", summary
    return "clean", summary


def _signal_rank(sig: int) -> Callable[[Path, subprocess.Popen], None]:
    return lambda private, proc: os.kill(_rank_pid(private, 1), sig)


def _signal_launcher(sig: int) -> Callable[[Path, subprocess.Popen], None]:
    return lambda private, proc: proc.send_signal(sig)


def _delete_heartbeat_folder(private: Path, proc: subprocess.Popen) -> None:
    """What a /tmp cleaner does: the launcher's heartbeat folder is deleted mid-run."""
    for folder in private.glob("stadi-heartbeat-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _stop_and_resume(private: Path, proc: subprocess.Popen) -> None:
    """Ctrl-Z (SIGTSTP) to the launcher, stopped longer than --stadi_timeout, then `fg` (SIGCONT)."""
    proc.send_signal(signal.SIGTSTP)
    time.sleep(TIMEOUT + 3)
    proc.send_signal(signal.SIGCONT)


def _full_disk_case(hub: Path) -> tuple[str, str]:
    """The output folder's filesystem fills up during the run: the image goes to the launch folder."""
    mount = Path(tempfile.mkdtemp(prefix="probe-full-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                      check=False).returncode != 0:
        return "clean", "skipped: cannot mount a small tmpfs here (not root?)"
    try:
        def fill(private, proc):
            try:
                with open(mount / "filler", "wb", buffering=0) as handle:
                    while True:
                        handle.write(b"\0" * 4096)
            except OSError:  # ENOSPC: the disk is full now
                pass

        launch_dir = Path(tempfile.mkdtemp(prefix="probe-launch-"))
        result = launch(hub, "full-disk", action=fill, steps=30, out=mount, cwd=launch_dir)
        verdict = classify(result, status=0, needle=None, image=True)
        if verdict[0] == "clean" and not any("saved it to" in line for line in result["lines"]):
            return "lost", verdict[1]
        return verdict
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)


def _folder_removed_case(hub: Path) -> tuple[str, str]:
    out = Path(tempfile.mkdtemp(prefix="probe-gone-"))
    result = launch(hub, "folder-gone", action=lambda private, proc: shutil.rmtree(out), steps=30, out=out)
    return classify(result, status=0, needle=None, image=True)


def _lock_held_case(hub: Path) -> tuple[str, str]:
    """A stalled process holds the profile cache's lock: the run still finishes and saves its image."""
    folder = Path(tempfile.mkdtemp(prefix="probe-lock-"))
    cache = folder / "speeds.json"
    lock = open(folder / "speeds.json.lock", "w")  # noqa: SIM115 - held for the whole launch
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        result = launch(hub, "lock-held", extra=["--stadi_profile_cache", str(cache)], steps=4)
    finally:
        lock.close()
    verdict = classify(result, status=0, needle=None, image=True)
    if verdict[0] == "clean" and not any("locked by another process" in line for line in result["lines"]):
        return "silent", verdict[1]
    return verdict


def fault_cases(hub: Path) -> list[Callable[[], tuple[str, str]]]:
    """The issue's launcher faults; each call returns (outcome, summary line)."""
    def case(tag: str, *, status: int, needle: str | None, image: bool | None = None, **kwargs):
        def run() -> tuple[str, str]:
            return classify(launch(hub, tag, **kwargs), status=status, needle=needle, image=image)
        run.is_fault = True
        run.label = tag
        return run

    cases = [
        case("process-group-stall", fault="process-group:1:stop", status=1,
             needle="rank 1 stopped responding in process-group"),
        case("load-stall", fault="load:1:stop", status=1, needle="rank 1 stopped responding in load"),
        case("stadi-stall", fault="stadi step:1:stop", status=1, needle="rank 1 stopped responding in stadi step"),
        case("decode-stall", fault="decode:1:stop", status=1, needle="rank 1 stopped responding in decode"),
        case("decode-live-stall", fault="decode:1:sleep", status=1, needle="rank 1 stalled in decode"),
        case("cache-write-stall", fault="profile-cache write:0:sleep", status=1,
             needle="in profile-cache write", extra=["--stadi_profile_cache", "speeds.json"]),
        case("rank-raises", fault="stadi step:1:exit", status=1, needle="rank 1 exited with status 1"),
        case("rank-sigkill", action=_signal_rank(signal.SIGKILL), steps=30, status=1,
             needle="rank 1 was killed by SIGKILL"),
        case("rank-sigterm", action=_signal_rank(signal.SIGTERM), steps=30, status=1,
             needle="rank 1 was killed by SIGTERM"),
        case("launcher-ctrl-c", action=_signal_launcher(signal.SIGINT), steps=30, status=130,
             needle="stopped by SIGINT"),
        case("launcher-sigterm", action=_signal_launcher(signal.SIGTERM), steps=30, status=143,
             needle="stopped by SIGTERM"),
        case("launcher-sigkill", action=_signal_launcher(signal.SIGKILL), steps=30, status=-9, needle=None),
        case("launcher-ctrl-z-then-fg", action=_stop_and_resume, steps=30, status=0, needle=None, image=True),
        # issue 36: slow work is not a stall; teardown is bounded; a deleted heartbeat folder; two failing ranks
        case("slow-decode-finishes", fault="decode:1:slow", status=0, needle=None, image=True),
        case("slow-warmup-step-finishes", fault="warmup step:1:slow", status=0, needle=None, image=True),
        case("teardown-wedged", fault="idle:0:sleep", status=1, needle="rank 0 stalled in idle", image=True),
        case("stall-after-heartbeat-folder-deleted", fault="decode:1:sleep", action=_delete_heartbeat_folder,
             status=1, needle="rank 1 stalled in decode"),
        case("saving-rank-exits-peer-stopped", fault="save:1:exit", status=1, needle="rank 1 exited with status 1"),
    ]
    for label, function in (("full-disk", _full_disk_case), ("folder-removed", _folder_removed_case),
                            ("lock-held", _lock_held_case)):
        def run(function=function) -> tuple[str, str]:
            return function(hub)
        run.is_fault = True
        run.label = label
        cases.append(run)
    return cases
