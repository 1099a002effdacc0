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
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    init_distributed_environment()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
