"""Start torch.distributed for STADI with a bounded timeout, then xDiT's world group on top."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from xfuser.core.distributed import init_distributed_environment


def init_distributed(timeout_seconds: float) -> torch.device:
    """gloo on CPU, NCCL on CUDA; returns this rank's device.

    The default group is created here, with `timeout_seconds`, so that a dead or stalled peer
    turns into an error on the others; xDiT then finds it initialised and only adds its groups.
    Started without a launcher (`python script.py`, no RANK in the environment) it is a world of
    one process, as xDiT's runner allows for single-GPU runs.
    """
    single_process = "RANK" not in os.environ
    if single_process:
        # What torchrun would export for one process; xDiT reads RANK/WORLD_SIZE/LOCAL_RANK itself.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # One process needs no rendezvous: an in-process store, no MASTER_ADDR/MASTER_PORT to pick.
        store = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if single_process else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds), **store)
    init_distributed_environment()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
