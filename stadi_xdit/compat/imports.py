"""Import-layer fixes: let ``import xfuser`` succeed on a machine without CUDA or triton."""

from __future__ import annotations

import importlib.machinery
import sys
from types import ModuleType

BLOCK_MASK_MODULE = "xfuser.core.sparge_attention.block_mask"


def _block_mask_unavailable(*args, **kwargs):
    raise RuntimeError(
        "SpargeAttention block masks need triton and CUDA; they are unavailable under "
        "stadi_xdit's CPU compat layer"
    )


def stub_sparge_block_mask() -> None:
    """block_mask.py hard-imports triton, and a global fake triton breaks torch: stub just this module."""
    # it exposes the one name xfuser imports from it (sparge.py: get_block_map_meansim)
    if BLOCK_MASK_MODULE in sys.modules:
        return
    stub = ModuleType(BLOCK_MASK_MODULE, "CPU stand-in for xfuser's triton-only SpargeAttn block mask")
    stub.__spec__ = importlib.machinery.ModuleSpec(BLOCK_MASK_MODULE, None)
    stub.get_block_map_meansim = _block_mask_unavailable
    stub.__stadi_compat_stub__ = True
    sys.modules[BLOCK_MASK_MODULE] = stub


def patch_envs_without_accelerator(envs: ModuleType) -> None:
    """Without an accelerator envs raises NotImplementedError for the device version and backend."""
    # read by `from xfuser.envs import CUDA_VERSION` (config.py) and init_distributed_environment()
    if getattr(envs.get_torch_distributed_backend, "_stadi_cpu_compat", False):
        return
    get_device_version = envs.get_device_version
    get_backend = envs.get_torch_distributed_backend

    def cpu_get_device_version():
        try:
            return get_device_version()
        except NotImplementedError:
            return None  # CUDA_VERSION becomes Version("0.0")

    def cpu_get_torch_distributed_backend() -> str:
        try:
            return get_backend()
        except NotImplementedError:
            return "gloo"

    cpu_get_device_version._stadi_cpu_compat = True
    cpu_get_torch_distributed_backend._stadi_cpu_compat = True
    envs.get_device_version = cpu_get_device_version
    envs.get_torch_distributed_backend = cpu_get_torch_distributed_backend


def allow_sequence_parallel_on_cpu(envs: ModuleType) -> None:
    """check_long_ctx_attn() is False without CUDA, which forbids Ulysses/Ring, yet yunchang works on gloo."""
    # must run before any xfuser module copies packages_info["has_long_ctx_attn"] at import time
    info = envs.PACKAGES_CHECKER.packages_info
    if not info.get("has_long_ctx_attn"):
        try:  # what xfuser imports from yunchang on its sequence-parallel paths
            from yunchang import set_seq_parallel_pg  # noqa: F401
            from yunchang.globals import PROCESS_GROUP  # noqa: F401
            from yunchang.kernels import AttnType  # noqa: F401
        except ImportError:
            return
        info["has_long_ctx_attn"] = True
