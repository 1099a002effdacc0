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
    """block_mask.py hard-imports triton (absent on CPU); a fake top-level triton breaks torch,
    so only this module is replaced, exposing the one name xfuser imports from it
    (``sparge.py``: ``get_block_map_meansim``)."""
    if BLOCK_MASK_MODULE in sys.modules:
        return
    stub = ModuleType(BLOCK_MASK_MODULE, "CPU stand-in for xfuser's triton-only SpargeAttn block mask")
    stub.__spec__ = importlib.machinery.ModuleSpec(BLOCK_MASK_MODULE, None)
    stub.get_block_map_meansim = _block_mask_unavailable
    stub.__stadi_compat_stub__ = True
    sys.modules[BLOCK_MASK_MODULE] = stub


def patch_envs_without_accelerator(envs: ModuleType) -> None:
    """xfuser.envs raises NotImplementedError for the device version and the distributed
    backend when no accelerator is present (read by ``from xfuser.envs import CUDA_VERSION``
    and ``init_distributed_environment``): report no device version and gloo instead, and
    declare yunchang usable so sequence parallelism (Ulysses/Ring) is allowed on CPU."""
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

    envs.get_device_version = cpu_get_device_version
    envs.get_torch_distributed_backend = cpu_get_torch_distributed_backend

    # check_long_ctx_attn() returns False whenever CUDA is absent, although yunchang's
    # process-group bookkeeping and torch's ring attention run fine on gloo.
    info = envs.PACKAGES_CHECKER.packages_info
    if not info.get("has_long_ctx_attn"):
        try:
            import yunchang  # noqa: F401
            from yunchang.globals import PROCESS_GROUP  # noqa: F401
        except ImportError:
            return
        info["has_long_ctx_attn"] = True
