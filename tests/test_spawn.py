"""The multi-process harness: ordered results, failing ranks, deadlocks, process groups."""

from __future__ import annotations

import os
import time

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


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from the failing rank")
    time.sleep(60)  # must be terminated, not waited for


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _recv_never_sent(rank, world_size):
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


def test_failing_rank_is_reported_with_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_1, 2, timeout=120)
    msg = str(info.value)
    assert "rank 1" in msg
    assert "Traceback" in msg and "ValueError: boom from the failing rank" in msg
    assert "_fail_on_rank_1" in msg
    assert time.monotonic() - start < 50  # rank 0 was terminated, not awaited


def test_deadlock_hits_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"timeout after 10s: rank\(s\) \[0, 1\]"):
        run_distributed(_recv_never_sent, 2, timeout=10)
    assert time.monotonic() - start < 30


def test_rejects_local_functions():
    def local(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="module-level"):
        run_distributed(local, 2)
