"""The launcher's supervisor on its own (stadi_xdit/supervisor.py): cheap, with stand-in ranks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from stadi_xdit.runtime import heartbeat
from stadi_xdit.supervisor import Supervisor


def _beat(supervisor: Supervisor, rank: int, pid: int, phase: str, beat_age: float, phase_age: float,
          cause: str | None = None) -> None:
    now = time.time()
    record = {"pid": pid, "phase": phase, "since": now - phase_age, "beat": now - beat_age, "cause": cause}
    heartbeat.beat_path(supervisor.folder, rank).write_text(json.dumps(record))


@contextlib.contextmanager
def _watched(timeout: float, ranks: int = 1):
    """A supervisor and `ranks` stand-in rank processes (its children), all ended afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(ranks)]
    supervisor = Supervisor(timeout=timeout)
    try:
        yield supervisor, procs
    finally:
        supervisor.close()
        for proc in procs:
            proc.kill()
            proc.wait()


def _wait_for(condition, guard: float = 30.0) -> None:
    deadline = time.monotonic() + guard  # a hang guard only
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_silent_rank_is_named_and_killed_a_beating_one_in_save_is_spared(capsys):
    with _watched(1.0, ranks=2) as (supervisor, (stalled, saving)):
        _beat(supervisor, 1, stalled.pid, "decode", beat_age=5, phase_age=5)
        _beat(supervisor, 0, saving.pid, "save", beat_age=0, phase_age=0)
        supervisor.start()
        _wait_for(lambda: stalled.poll() is not None)
        assert stalled.poll() is not None and saving.poll() is None  # the saver may finish its file
        assert supervisor.culprit.rank == 1 and supervisor.culprit.phase == "decode"
        lines = capsys.readouterr().err.splitlines()
        assert lines == [f"stadi-xdit: error: {supervisor.culprit.line}; ending the launch"]
        assert "rank 1 stopped responding in decode" in lines[0]


BUSY_SILENT_RANK = """
import os, signal, sys, time
from stadi_xdit.runtime import heartbeat
heartbeat.start()
time.sleep(0.5)  # a beat or two first
if sys.argv[1] == "works":
    # The main thread keeps the interpreter lock for 3 s (as a long garbage collection or teardown does on a
    # loaded machine): the beat thread cannot write, while the process runs.
    sys.setswitchinterval(60)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        pass
else:
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_rank_that_runs_without_beating_is_not_stopped_and_a_stopped_one_is():
    """Silence alone is not a stop: the supervisor also looks at the process's CPU time (CI under a third test
    worker once named a rank `stopped responding in idle` after 5.1 s without a beat, while it ran)."""
    for how in ("works", "stops"):
        supervisor = Supervisor(timeout=1.0)
        try:
            env = {**os.environ, **supervisor.env(), "RANK": "0"}
            rank = subprocess.Popen([sys.executable, "-c", BUSY_SILENT_RANK, how], env=env)
            supervisor.start()
            rank.wait(timeout=60)
        finally:
            supervisor.close()
        if how == "works":
            assert supervisor.culprit is None and rank.returncode == 0
        else:
            assert supervisor.culprit is not None and "rank 0 stopped responding in startup" in supervisor.culprit.line


def test_a_silent_rank_is_named_before_a_live_rank_that_waits_for_it(capsys):
    """Both past the timeout at one poll (a late poll on a loaded machine; CI on 5ab2aa0 named rank 0): rank 0
    beats but makes no progress (waiting in xDiT's group set-up for rank 1), rank 1 is stopped. Rank 1 is named."""
    with _watched(1.0, ranks=2) as (supervisor, (waiting, stopped)):
        _beat(supervisor, 0, waiting.pid, "process-group", beat_age=0, phase_age=9)
        _beat(supervisor, 1, stopped.pid, "load", beat_age=5, phase_age=5)
        supervisor.start()
        _wait_for(lambda: supervisor.culprit is not None)
        assert supervisor.culprit.rank == 1 and "rank 1 stopped responding in load" in supervisor.culprit.line


def test_a_live_stall_past_the_timeout_is_named(capsys):
    with _watched(1.0) as (supervisor, (stuck,)):
        _beat(supervisor, 0, stuck.pid, "load", beat_age=0, phase_age=5)
        supervisor.start()
        _wait_for(lambda: supervisor.culprit is not None)
        assert "rank 0 stalled in load" in supervisor.culprit.line


def _beat_record(supervisor: Supervisor, rank: int, pid: int, phase: str, phase_age: float, progress_age: float):
    now = time.time()
    record = {"pid": pid, "phase": phase, "since": now - phase_age, "beat": now, "progress": now - progress_age,
              "cause": None}
    heartbeat.beat_path(supervisor.folder, rank).write_text(json.dumps(record))


def test_idle_is_unbounded_while_a_peer_works_and_bounded_once_none_does(capsys):
    """Rank 0 idles (done) while rank 1 decodes long past the timeout, reporting progress: neither is ended.
    Once rank 1 has exited (its output saved), rank 0's teardown is bounded by the timeout."""
    with _watched(1.0, ranks=2) as (supervisor, (waiting, decoding)):
        supervisor.start()
        for _ in range(25):  # 2.5 s of polls: rank 1 is 60 s into its decode, its last block began just now
            _beat_record(supervisor, 0, waiting.pid, "idle", phase_age=60, progress_age=60)
            _beat_record(supervisor, 1, decoding.pid, "decode", phase_age=60, progress_age=0)
            time.sleep(0.1)
        assert supervisor.culprit is None and waiting.poll() is None and decoding.poll() is None
        decoding.kill()
        decoding.wait()
        ended = time.monotonic()
        while waiting.poll() is None and time.monotonic() - ended < 30:  # rank 0 still beats, idle
            _beat_record(supervisor, 0, waiting.pid, "idle", phase_age=60, progress_age=60)
            time.sleep(0.1)
        assert waiting.poll() is not None and time.monotonic() - ended >= 1.0
        assert supervisor.culprit.rank == 0 and "rank 0 stalled in idle" in supervisor.culprit.line
        assert "after every rank finished its work" in capsys.readouterr().err


def test_a_rank_waiting_in_xdits_load_for_a_peer_that_still_loads_is_not_a_stall(capsys):
    """xDiT's replicated load reads on rank 0 and broadcasts: on a loaded machine rank 0 waited past a 5 s timeout
    for rank 1, which was still loading, and a working launch was ended (a suite run with three workers). While a
    peer progresses the waiting rank is spared; once none does, the launch ends naming a rank in load."""
    with _watched(1.0, ranks=2) as (supervisor, (waiting, loading)):
        supervisor.start()
        for _ in range(15):  # 1.5 s of polls: rank 0 has waited 5 s, rank 1 reads its weights
            _beat_record(supervisor, 0, waiting.pid, "load", phase_age=5, progress_age=5)
            _beat_record(supervisor, 1, loading.pid, "load", phase_age=5, progress_age=0)
            time.sleep(0.1)
        assert supervisor.culprit is None
        _beat_record(supervisor, 1, loading.pid, "load", phase_age=5, progress_age=5)
        _wait_for(lambda: supervisor.culprit is not None)
        assert "stalled in load" in supervisor.culprit.line


def test_a_phase_without_progress_is_a_stall_and_startup_has_no_limit(capsys):
    with _watched(1.0, ranks=2) as (supervisor, (importing, stuck)):
        supervisor.start()
        for _ in range(15):
            _beat_record(supervisor, 0, importing.pid, "startup", phase_age=60, progress_age=60)
            _beat_record(supervisor, 1, stuck.pid, "decode", phase_age=0.5, progress_age=0.5)
            time.sleep(0.1)  # 1.5 s in a fresh decode: the beats keep its phase young, so no stall yet
        assert supervisor.culprit is None
        _beat_record(supervisor, 1, stuck.pid, "decode", phase_age=5, progress_age=5)
        _wait_for(lambda: supervisor.culprit is not None)
        assert supervisor.culprit.rank == 1 and "without progress" in supervisor.culprit.line


def test_a_deleted_heartbeat_folder_does_not_switch_supervision_off(capsys):
    """A /tmp cleaner removes the folder: the last records still count (a silent rank is still found), and a
    rank's next beat makes the folder again."""
    import shutil

    with _watched(1.0) as (supervisor, (stopped,)):
        _beat(supervisor, 0, stopped.pid, "stadi step 3", beat_age=0, phase_age=0)
        supervisor.start()
        _wait_for(lambda: 0 in supervisor._known)  # read once (a fixed sleep lost that race on a loaded machine)
        shutil.rmtree(supervisor.folder)
        _wait_for(lambda: supervisor.culprit is not None)
        assert supervisor.culprit.rank == 0 and "stopped responding in stadi step 3" in supervisor.culprit.line


def test_the_rank_that_failed_first_is_not_the_one_that_reported_it():
    supervisor = Supervisor(timeout=5.0)
    try:
        _beat(supervisor, 0, 1, "stadi step 3", 0, 0, cause="peer")
        _beat(supervisor, 1, 1, "stadi step 2", 0, 0)
        _beat(supervisor, 2, 1, "stadi step 3", 0, 0)
        supervisor.died_at = {0: 10.0, 1: 11.0, 2: 12.0}
        assert supervisor.first_failure([0, 1, 2]) == 1  # rank 0 only reported rank 1
        assert supervisor.first_failure([0]) is None  # nothing but a report: torchrun's own order
    finally:
        supervisor.close()


def test_a_rank_stopped_by_torchrun_in_the_same_poll_is_not_named_before_the_one_that_failed():
    """Rank 1 raised (exit 1) and torchrun's SIGTERM ended rank 0 within one poll: both were first seen
    dead at once, and rank 1 is the one that failed (it used to be rank 0, the lower number)."""
    supervisor = Supervisor(timeout=5.0)
    try:
        _beat(supervisor, 0, 1, "idle", 0, 0)
        _beat(supervisor, 1, 1, "save", 0, 0)
        supervisor.died_at = {0: 10.0, 1: 10.0}
        assert supervisor.first_failure([0, 1], stopped_by_the_agent=[0]) == 1
        assert supervisor.first_failure([0, 1]) == 0  # no signal known: the lower rank of a tie
        supervisor.died_at = {0: 10.0, 1: 11.0}  # both stopped by a signal: the earlier death
        assert supervisor.first_failure([0, 1], stopped_by_the_agent=[0, 1]) == 0
    finally:
        supervisor.close()


def test_a_rank_ended_by_the_launch_after_its_peers_gave_up_is_named_with_its_phase():
    supervisor = Supervisor(timeout=5.0)
    try:
        now = time.time()
        _beat(supervisor, 1, 1, "gather step 4", 0, 0, cause="peer")
        supervisor.died_at = {1: now, 0: now}  # seen dead in the same poll
        _beat(supervisor, 0, 1, "profile-cache write", beat_age=0, phase_age=5.2)  # stuck since before the wait
        assert supervisor.ended_after_its_peers(0) == "profile-cache write"
        _beat(supervisor, 0, 1, "stadi step 3", beat_age=0, phase_age=0.1)  # killed mid-step: reported at once
        assert supervisor.ended_after_its_peers(0) is None
    finally:
        supervisor.close()


def test_a_failing_launch_that_torchrun_does_not_end_is_ended_by_the_supervisor(tmp_path):
    """The backstop: a survivor exited because of a peer, and the launch still runs past the grace."""
    script = textwrap.dedent("""
        import json, subprocess, sys, time
        from stadi_xdit.runtime import heartbeat
        from stadi_xdit.supervisor import Supervisor
        stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        supervisor = Supervisor(timeout=30.0)
        now = time.time()
        for rank, pid, cause in ((0, 999999, "peer"), (1, stopped.pid, None)):
            record = {"pid": pid, "phase": "stadi step 1", "since": now, "beat": now, "cause": cause}
            heartbeat.beat_path(supervisor.folder, rank).write_text(json.dumps(record))
        print(stopped.pid, flush=True)
        supervisor.start()
        time.sleep(60)  # a wedged torchrun agent
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        "stadi-xdit: error: rank 1 failed first (its peers reported it); ending the launch"
    pid = int(proc.stdout.split()[0])
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False)
    assert state.stdout.strip()[:1] in ("", "Z"), state.stdout  # the stand-in rank was killed


WORKING_RANK = """
import os, sys, time
from stadi_xdit.runtime import heartbeat
heartbeat.start()
heartbeat.phase(sys.argv[2])
end = time.monotonic() + 3.0
if sys.argv[1] == "works":
    while time.monotonic() < end:  # deserializing weights, encoding a video: the process computes, no block runs
        sum(range(10000))
else:
    time.sleep(3.0)  # a lock, a hung read: no CPU, no bytes read
heartbeat.phase("setup")
"""


@pytest.mark.parametrize("phase", ["load", "save", "cleanup"])
def test_work_past_the_timeout_outside_the_model_is_not_a_stall_and_a_silent_one_is(phase):
    """While loading, saving (a PNG or a video encoded) and cleaning up (the runner's teardown), the beat
    counts the rank's own CPU time and bytes read as progress (issue 36: a file read that makes progress
    is never killed for being slow; a loaded machine's teardown once took past a 5 s timeout and its rank
    was named as stalled); a rank asleep there is still a stall."""
    _check_work_is_progress(WORKING_RANK, f"rank 0 stalled in {phase}", phase)


def _check_work_is_progress(stand_in: str, stall_line: str, *args: str) -> None:
    """The stand-in rank `stand_in` run as `works` finishes unsupervised past a 1 s timeout; as `sleeps` it is
    ended, named by `stall_line`."""
    for how in ("works", "sleeps"):
        supervisor = Supervisor(timeout=1.0)
        try:
            env = {**os.environ, **supervisor.env(), "RANK": "0"}
            rank = subprocess.Popen([sys.executable, "-c", stand_in, how, *args], env=env)
            supervisor.start()
            rank.wait(timeout=60)
            stalled = supervisor.culprit
        finally:
            supervisor.close()
        if how == "works":
            assert stalled is None and rank.returncode == 0
        else:
            assert stalled is not None and stall_line in stalled.line and rank.returncode != 0


COMPILING_RANK = """
import subprocess, sys, time
from stadi_xdit.runtime import heartbeat
heartbeat.start()
heartbeat.phase("warmup step 0")
heartbeat.count_process_work(True)  # torch.compile's start callback (stadi_xdit/runtime/compile.py)
work = "end = time.monotonic() + 3.0\\nwhile time.monotonic() < end: sum(range(10000))"
# Inductor compiles in worker processes while the rank waits for them: the work is a child's.
subprocess.run([sys.executable, "-c", "import time\\n" + (work if sys.argv[1] == "works" else "time.sleep(3.0)")])
heartbeat.count_process_work(False)
heartbeat.phase("warmup step 1")
"""


def test_a_compile_that_works_past_the_timeout_is_not_a_stall_and_a_silent_one_is(capsys):
    """While torch.compile compiles, the beat counts the CPU time of the rank and its compile workers (child
    processes) as progress: no block starts for minutes, yet the rank works. A compile worker asleep is a stall."""
    _check_work_is_progress(COMPILING_RANK, "rank 0 stalled in warmup step 0")
