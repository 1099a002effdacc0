"""A dead or stalled peer: every survivor exits within --stadi_timeout with one line naming the peer."""

from __future__ import annotations

import time

import pytest
import torch

from stadi_xdit.offline.spawn import DistributedTestError, run_distributed
from stadi_xdit.xdit.build import build_stadi_pipeline

PROMPT = "a red cat"
TIMEOUT = 5  # --stadi_timeout of the faulty runs


def _faulty_run(rank: int, world: int, fault: str, stamp_file: str, cache: str | None) -> dict:
    """Rank 1 dies or stalls at `fault`; rank 0 returns its one-line report and rank 1's stamp, read after it."""
    import os

    import stadi_xdit.xdit  # noqa: F401
    from stadi_xdit.families.pixart import tiny_pixart_pipeline
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline
    from stadi_xdit.runtime.faults import PeerFailure
    from stadi_xdit.xdit import pipelines

    def fail_now() -> None:
        with open(stamp_file, "w") as handle:
            handle.write(f"rank {rank} failed ({fault})")
        if fault.startswith("kill"):
            os._exit(1)  # a crashed process: its sockets close
        time.sleep(300)  # a hung device: never reaches the next collective

    pipe = build_stadi_pipeline(StadiPixArtAlphaPipeline, tiny_pixart_pipeline(), size=128, steps=6, warmup_steps=2,
                                stadi_mode="full", stadi_speeds=None if cache else "1,0.5", stadi_timeout=TIMEOUT,
                                stadi_profile_cache=cache)
    if rank == 1 and fault.endswith("cache"):  # before the profile cache's first collective
        pipelines.hardware_identity = fail_now
    calls = []

    def fail_on_third_forward(*_):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            fail_now()

    pipe.module.transformer.register_forward_pre_hook(fail_on_third_forward)
    try:
        pipe(prompt=PROMPT, height=128, width=128, num_inference_steps=6, output_type="latent",
             generator=torch.Generator().manual_seed(1), use_resolution_binning=False)
    except PeerFailure as error:  # in sequence: rank 1 wrote its stamp before it failed, so it is there now
        with open(stamp_file) as handle:
            return {"message": str(error), "stamp": handle.read()}
    return {"message": None}


@pytest.mark.parametrize("fault,cache", [("kill", False), ("stall", False), ("stall-cache", True)])
def test_survivor_names_the_peer_within_the_timeout(tmp_path, fault, cache):
    stamp = str(tmp_path / "fault-stamp")
    cache_file = str(tmp_path / "speeds.json") if cache else None
    try:  # the harness' 120 s is the hang guard: the survivor must get out on its own, far sooner
        results = run_distributed(_faulty_run, 2, fault, stamp, cache_file, timeout=120, faulty_ranks=(1,))
        report = results[0]
    except DistributedTestError as error:  # a stalled rank 1 never returns: rank 0's report is in the error
        pytest.fail(f"survivor did not report the fault: {error}")
    message = report["message"]
    assert message is not None, "the faulty run finished normally"
    assert "\n" not in message and message.startswith("stadi: peer rank 1 (global rank 1)")
    assert f"--stadi_timeout {TIMEOUT} s" in message
    assert ("died" if fault == "kill" else "stopped responding") in message
    assert ("profile-cache" if cache else "step") in message
    # rank 1 never finished its run (it died or hung at the fault); rank 0 reported after rank 1 failed
    assert results[1] is None
    assert report["stamp"] == f"rank 1 failed ({fault})"


def _one_second_comm(rank: int, world: int):
    """A 2-rank group with --stadi_timeout 1 s whose timed-out gloo waits are re-armed while a peer works."""
    from datetime import timedelta

    from stadi_xdit.runtime.comm import BandComm
    from stadi_xdit.runtime.faults import PeerWatch

    return BandComm(None, rank, world, timedelta(seconds=1), watch=PeerWatch([0, 1], rank, 1.0, rewaits=True))


def _gather_or_failure(comm, rank: int, step: int) -> str:
    """Both ranks' values, or the survivor's one-line report."""
    import torch

    from stadi_xdit.runtime.faults import PeerFailure

    try:
        comm.enter("stadi", step)
        gathered = comm.all_gather(torch.full((1,), float(rank)), [1, 1], dim=0)
    except PeerFailure as error:
        return str(error)
    return f"gathered {gathered.tolist()}"


def _wait_for_a_slow_peer(rank: int, world: int, peer_works: bool) -> str:
    """Rank 1 joins an all-gather 2.5 timeouts late: working (reporting progress, as its model's blocks do)
    or silent; rank 0 waits for it with --stadi_timeout 1 s."""
    import time

    from stadi_xdit.runtime import heartbeat

    comm = _one_second_comm(rank, world)
    if rank == 1:
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            if peer_works:
                heartbeat.progress()
            time.sleep(0.05)
    return _gather_or_failure(comm, rank, 3)


@pytest.mark.parametrize("peer_works", [True, False], ids=["working", "silent"])
def test_a_wait_lasts_while_the_peer_works_and_ends_on_silence(peer_works):
    """--stadi_timeout bounds silence, not a slow peer's work (issue 36): a gloo wait is waited on again while
    the peer reports progress; a silent peer is named after the timeout, as before."""
    results = run_distributed(_wait_for_a_slow_peer, 2, peer_works, init_process_group=True, timeout=120,
                              faulty_ranks=(1,) if not peer_works else ())
    if peer_works:
        assert results == ["gathered [0.0, 1.0]", "gathered [0.0, 1.0]"]
    else:
        assert results[0].startswith("stadi: peer rank 1 (global rank 1) stopped responding during stadi step 3")


def _wait_through_a_stop(rank: int, world: int) -> str:
    """Rank 0 waits for rank 1 (silent, 3.2 s late, --stadi_timeout 1 s) and is itself stopped for 2.5 s of
    it, as Ctrl-Z then `fg` do; only the 0.7 s it ran count against its peer."""
    import os
    import subprocess
    import time

    comm = _one_second_comm(rank, world)
    if rank == 0:
        subprocess.Popen(["bash", "-c", f"sleep 0.3; kill -STOP {os.getpid()}; sleep 2.5; kill -CONT {os.getpid()}"])
    else:
        time.sleep(3.2)
    return _gather_or_failure(comm, rank, 1)


def test_time_a_waiting_rank_was_stopped_is_not_its_peers_silence():
    """Ctrl-Z stops every rank and `fg` resumes them: a wait that spanned the stop used to time out at once,
    blaming the peer (the documented caveat of round three)."""
    assert run_distributed(_wait_through_a_stop, 2, init_process_group=True, timeout=120) == \
        ["gathered [0.0, 1.0]", "gathered [0.0, 1.0]"]


class RecordingStore:
    """The store surface PeerWatch reads: each read notes the timeout it ran under."""

    def __init__(self, timeout):
        self.timeout, self.values, self.read_timeouts = timeout, {}, []

    def set_timeout(self, timeout) -> None:
        self.timeout = timeout

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        self.read_timeouts.append(self.timeout)
        return all(key in self.values for key in keys)

    def get(self, key: str) -> bytes:
        self.read_timeouts.append(self.timeout)
        return self.values[key]


def test_peer_checks_read_the_store_briefly_and_give_it_back_its_timeout():
    """A liveness check runs while the job goes on, and a failure report may be caught by a caller: both read
    with a short timeout (a store whose host is gone must not hang them) and restore the store's own."""
    import time
    from datetime import timedelta

    from stadi_xdit.runtime.faults import PeerWatch

    own = timedelta(seconds=300)
    store = RecordingStore(own)
    watch = PeerWatch([0, 1], 0, 5.0, _store=store)
    store.set("stadi/alive/1", f"{time.time():.3f}")
    store.set("stadi/progress/1", "4 stadi 2 0")
    assert watch.a_peer_works()
    report = str(watch.failure(RuntimeError("timed out"), 5.0))
    assert "rank 1" in report and "stadi step 2" in report, report
    assert store.timeout == own
    assert store.read_timeouts and all(t < own for t in store.read_timeouts)
