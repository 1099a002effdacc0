"""Make the pinned xfuser import and run on a machine without CUDA (CPU + gloo).

``stadi_xdit`` calls :func:`apply_cpu_compat` on import when CUDA is absent; on CUDA machines
nothing is patched.  The import-layer fixes (``imports.py``) and the runtime fixes
(``runtime.py``) run as post-import hooks on the xfuser modules they fix, so applying the
layer does not import xfuser itself.  ``patches/xfuser-0.7.0-cpu-gloo.patch`` carries the
same fixes as a diff against xfuser 0.7.0.
"""

from __future__ import annotations

import importlib.metadata

from stadi_xdit.compat import imports, runner, runtime
from stadi_xdit.compat._hooks import when_imported

__all__ = ["PINNED_XFUSER_VERSION", "apply_cpu_compat", "bootstrap", "check_xfuser_version", "is_applied"]

PINNED_XFUSER_VERSION = "0.7.0"

_APPLIED = False


def check_xfuser_version() -> None:
    """Refuse to patch any xfuser other than the pinned one (checked without importing it)."""
    try:
        found = importlib.metadata.version("xfuser")
    except importlib.metadata.PackageNotFoundError:
        found = "none"
    if found != PINNED_XFUSER_VERSION:
        raise ImportError(
            f"stadi_xdit's CPU compat layer is pinned to xfuser=={PINNED_XFUSER_VERSION}, "
            f"but found xfuser {found}"
        )


def apply_cpu_compat() -> None:
    """Install all CPU fixes for xfuser (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    check_xfuser_version()
    imports.stub_sparge_block_mask()
    when_imported("xfuser.envs", imports.patch_envs_without_accelerator)
    when_imported("xfuser.envs", imports.allow_sequence_parallel_on_cpu)
    for module_name, patches in [*runtime.RUNTIME_PATCHES.items(), *runner.RUNNER_PATCHES.items()]:
        for patch in patches:
            when_imported(module_name, patch)
    _APPLIED = True


def bootstrap() -> None:
    """The CPU fixes where there is no CUDA, nothing on CUDA machines; before anything imports xfuser.
    (The CLI hook is separate: `stadi_xdit.xdit` installs it.)"""
    import torch

    if not torch.cuda.is_available():
        apply_cpu_compat()


def is_applied() -> bool:
    """Whether :func:`apply_cpu_compat` has run in this process."""
    return _APPLIED
