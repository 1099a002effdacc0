"""The multi-process harness: ordered results, failing ranks, deadlocks, process groups."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from stadi_xdit.offline.spawn import DistributedTestError, run_distributed


def _identity(rank, world_size, base, *, scale=1):
    # later ranks finish first, so the results arrive out of rank order
    time.sleep(0.2 * (world_size - 1 - rank))
    return {
        "rank": rank,
        "value": base * scale + rank,
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
                os.environ["STADI_TEST_FLAG"]),
        "threads": torch.get_num_threads(),
        "tensor": torch.full((2,), float(rank)),
    }


def _write_pid(folder, rank) -> None:
    temp = Path(folder) / f"rank{rank}.pid.tmp"
    temp.write_text(str(os.getpid()))
    os.replace(temp, temp.with_suffix(""))  # whole or absent, even if the rank is stopped mid-write


def _fail_on_rank_1(rank, world_size, folder):
    if rank == 1:
        deadline = time.monotonic() + 60  # a hang guard only: rank 1 fails once rank 0 is running
        while not (Path(folder) / "rank0.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ValueError("boom from the failing rank")
    _write_pid(folder, rank)
    time.sleep(60)  # must be terminated, not waited for
    (Path(folder) / "rank0.finished").write_text("awaited")


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _recv_never_sent(rank, world_size, folder):
    _write_pid(folder, rank)
    dist.init_process_group("gloo")  # env:// from the harness' variables
    if rank == 0:
        dist.recv(torch.zeros(1), src=1)  # rank 1 never sends
    else:
        dist.barrier()  # never matched either: rank 1 stays alive, so rank 0 cannot error out
    return rank


def test_results_come_back_in_rank_order():
    out = run_distributed(_identity, 3, 10, scale=2, timeout=120, env={"STADI_TEST_FLAG": 7})
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert [o["value"] for o in out] == [20, 21, 22]
    assert [o["env"] for o in out] == [(str(r), "3", str(r), "7") for r in range(3)]
    assert all(o["threads"] == 1 for o in out)
    assert [o["tensor"].tolist() for o in out] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]


def test_harness_can_init_the_process_group():
    assert run_distributed(_all_reduce, 2, init_process_group=True, timeout=120) == [3.0, 3.0]


def _gone(pid: int) -> bool:
    """The process has exited: no such process, or a zombie its parent (the forkserver) has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_failing_rank_is_reported_with_traceback(tmp_path):
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_1, 2, str(tmp_path), timeout=120)
    msg = str(info.value)
    assert "rank 1" in msg
    assert "Traceback" in msg and "ValueError: boom from the failing rank" in msg
    assert "_fail_on_rank_1" in msg
    # rank 0 was terminated, not awaited: it is gone, and it never got past its sleep
    assert _gone(int((tmp_path / "rank0.pid").read_text()))
    assert not (tmp_path / "rank0.finished").exists()


def test_deadlock_hits_the_timeout(tmp_path):
    with pytest.raises(DistributedTestError, match=r"timeout after 5s: rank\(s\) \[0, 1\]"):
        run_distributed(_recv_never_sent, 2, str(tmp_path), timeout=5)
    # the deadlocked ranks were stopped when the harness gave up on them (each that got as far as its pid)
    assert all(_gone(int(path.read_text())) for path in tmp_path.glob("rank*.pid"))


def test_rejects_local_functions():
    def local(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="module-level"):
        run_distributed(local, 2)


def test_tagged_processes_match_the_whole_tag():
    """The launcher tests find their processes by an environment tag; under pytest-xdist another test's
    processes run beside them, and `exit` must not find `exit-early`'s."""
    import os
    import subprocess

    from stadi_xdit.offline.processes import reap_leftovers, tagged_processes

    # Tags of this test alone: the launcher tests' own "exit" may be running on the other worker.
    tag = f"whole-tag-{os.getpid()}"
    proc = subprocess.Popen(["sleep", "30"], env={**os.environ, "STADI_TEST_TAG": f"{tag}-early"})
    try:
        assert tagged_processes("STADI_TEST_TAG", tag) == []
        assert tagged_processes("STADI_TEST_TAG", f"{tag}-early") == [proc.pid]
    finally:
        assert reap_leftovers("STADI_TEST_TAG", f"{tag}-early", guard_seconds=0) == [proc.pid]
        proc.wait()


def test_free_ports_are_drawn_below_the_kernels_own_range_and_are_free():
    """A rendezvous port from `free_port` is one the kernel never hands out by itself (port 0 binds, gloo's pair
    listeners, client connections), so no other test's sockets take it before the launch binds it."""
    import socket

    from stadi_xdit.offline.spawn import _ephemeral_ports, free_port

    low, _ = _ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free when drawn: binding it again works


def test_a_port_drawn_is_never_drawn_again_here_or_by_another_process():
    """Two launches drawing the same port would meet in one store (CI: a docs launch hung for 600 s, and a
    conformance launch failed at once, while the other test worker's launches ran beside them). A drawn port is
    claimed for this process's life: it draws it no more, and another process cannot claim it."""
    import subprocess
    import sys

    from stadi_xdit.offline.spawn import _CLAIMED, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports) and set(ports) <= set(_CLAIMED)
    probe = "import sys; from stadi_xdit.offline import spawn; print(spawn._claim(int(sys.argv[1])))"
    other = subprocess.run([sys.executable, "-c", probe, str(ports[0])], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "False"
