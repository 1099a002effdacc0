"""Runner fixes: let xfuser 0.7.0's model runner (``xdit`` -> ``python -m xfuser.runner``) run on CPU.

The runner builds a registered ``xFuserModel`` (``runner_models/*.py``), loads it through
``ModelLoader`` and times each call with CUDA events. Its default path (no quantization, FSDP,
replicated-broadcast load or offload) assumes CUDA in four places, and ``--use_torch_compile`` in
a fifth; each fix below names the xfuser 0.7.0 lines it replaces. ``stadi_xdit.compat`` registers
them as post-import hooks (``RUNNER_PATCHES``), and ``patches/xfuser-0.7.0-runner-cpu.patch``
carries the same fixes as a diff.

``xfuser/runner.py`` itself runs as ``__main__`` (``-m`` or ``runpy``), where no import hook can
reach it, so its one CUDA call (``torch.cuda.synchronize()`` in ``cleanup``) is fixed on
``torch.cuda`` instead, and only while CUDA is unavailable.
"""

from __future__ import annotations

import functools
import time
from types import ModuleType

import torch

from stadi_xdit.compat.runtime import _is_patched, _mark


def _local_device(local_rank: int) -> torch.device:
    """This rank's device: ``cuda:<local_rank>`` where xfuser sees CUDA/ROCm, else the host."""
    from xfuser.envs import get_device

    return get_device(local_rank)


# --------------------------------------------------------------------------- placement


def place_pipeline_on_local_device(placement: ModuleType) -> None:
    """place_pipeline_components moves the pipeline to the literal f"cuda:{local_rank}"."""
    # replaces runner_models/loading/placement.py:83  model.pipe = model.pipe.to(f"cuda:{local_rank}")
    # (the rest mirrors place_pipeline_components line for line; the quantization walks it
    # calls are CUDA/ROCm features and stay as they are)
    if _is_patched(placement.place_pipeline_components):
        return
    orig = placement.place_pipeline_components

    @functools.wraps(orig)
    def place_pipeline_components(loader) -> None:
        model = loader.model
        local_rank = placement.get_world_group().local_rank
        offload_requested = (
            model.config.enable_model_cpu_offload
            or model.config.enable_sequential_cpu_offload
            or model.config.enable_group_cpu_offload
        )
        loader.fill_eager_transformers()
        if loader.replicated_broadcast_load():
            loader.broadcast_fill_replicated(offload_requested)
        adapter = loader.backends.fp8
        if adapter is not None and adapter.converts_before_device_move:
            placement._convert_fp8_on_host(loader, adapter, local_rank, offload_requested)
        if not offload_requested:
            model.pipe = model.pipe.to(_local_device(local_rank))
        if model.config.use_fp4_gemms:
            if placement._is_cuda():
                placement.setup_nvfp4_gemms(loader, local_rank)
            else:
                placement.setup_mxfp4_gemms(loader, local_rank)
        elif getattr(model.config, "use_fp6_gemms", False):
            placement.setup_mxfp6_gemms(loader, local_rank)
        if adapter is not None and not adapter.converts_before_device_move and not model.config.use_fp4_gemms:
            placement._convert_fp8_on_device(loader, adapter, local_rank)
        if model.config.use_int8_gemms:
            placement._convert_int8_on_device(loader, local_rank)

    placement.place_pipeline_components = _mark(place_pipeline_components)


# --------------------------------------------------------------------------- base_model


def onload_to_local_device(base_model: ModuleType) -> None:
    """xFuserModel._local_onload_device returns the literal cuda:{local_rank} for CPU offload."""
    # replaces runner_models/base_model.py:395  return torch.device(f"cuda:{get_world_group().local_rank}")
    cls = base_model.xFuserModel
    if _is_patched(cls._local_onload_device):
        return
    orig = cls._local_onload_device

    @functools.wraps(orig)
    def _local_onload_device(self) -> torch.device:
        return _local_device(base_model.get_world_group().local_rank)

    cls._local_onload_device = _mark(_local_onload_device)


class HostEvent:
    """A ``torch.cuda.Event`` stand-in on the host clock: CPU kernels finish before they return."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._time: float | None = None

    def record(self, stream=None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        """Nothing is queued: the host has already done the work."""

    def wait(self, stream=None) -> None:
        """Nothing is queued."""

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: HostEvent) -> float:
        """Milliseconds from this event to ``end_event``, like ``torch.cuda.Event.elapsed_time``."""
        if self._time is None or end_event._time is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        return (end_event._time - self._time) * 1000.0


class _HostTimedCuda(ModuleType):
    """``torch.cuda`` as base_model sees it on CPU: host-clock events, everything else unchanged."""

    Event = HostEvent

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithHostTimedCuda(ModuleType):
    """``torch`` as base_model sees it on CPU: only ``torch.cuda`` differs (see _HostTimedCuda)."""

    def __init__(self):
        super().__init__("torch", "torch, with host-clock torch.cuda.Event (stadi_xdit CPU compat)")
        self.cuda = _HostTimedCuda("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch, name)


def time_runs_on_host(base_model: ModuleType) -> None:
    """run() and _run_timed_pipe() time with torch.cuda.Event, which cannot be built without CUDA."""
    # replaces runner_models/base_model.py:815-816 and :993-994  torch.cuda.Event(enable_timing=True)
    # (with :1002 end.synchronize() and :847/:1004 elapsed_time()); only base_model's own name
    # `torch` is rebound, and only while CUDA is unavailable
    if torch.cuda.is_available() or _is_patched(base_model.torch):
        return
    base_model.torch = _mark(_TorchWithHostTimedCuda())


# --------------------------------------------------------------------------- torch.cuda


def synchronize_without_cuda(_module: ModuleType) -> None:
    """torch.cuda.synchronize() raises without CUDA; the runner calls it around every timed run."""
    # replaces base_model.py:817/:840/:996 and runner.py:93 (cleanup) torch.cuda.synchronize(): with
    # no device there is no queued work to wait for. runner.py runs as __main__, out of reach of
    # import hooks, hence a patch on torch.cuda itself; it delegates whenever CUDA is available.
    if _is_patched(torch.cuda.synchronize):
        return
    orig = torch.cuda.synchronize

    @functools.wraps(orig)
    def synchronize(device=None) -> None:
        if torch.cuda.is_available():
            orig(device)

    torch.cuda.synchronize = _mark(synchronize)


# --------------------------------------------------------------------------- envs


def no_gpu_arch_without_cuda(envs: ModuleType) -> None:
    """PACKAGES_CHECKER._on_rdna4/_on_mi3xx ask torch.cuda.current_device(), which raises without CUDA."""
    # replaces envs.py:399 and :404  device = torch.cuda.current_device(): without a GPU the
    # answer is False (read by e.g. flux.py:93 _get_compile_mode under --use_torch_compile)
    cls = type(envs.PACKAGES_CHECKER)
    for name in ("_on_mi3xx", "_on_rdna4"):
        orig = getattr(cls, name)
        if _is_patched(orig):
            continue

        def on_arch(self, _orig=orig) -> bool:
            return torch.cuda.is_available() and _orig(self)

        functools.update_wrapper(on_arch, orig)
        setattr(cls, name, _mark(on_arch))


# module name -> patches to run right after it is imported
RUNNER_PATCHES: dict[str, tuple] = {
    "xfuser.envs": (no_gpu_arch_without_cuda,),
    "xfuser.model_executor.models.runner_models.loading.placement": (place_pipeline_on_local_device,),
    # xfuser/runner.py imports base_model before it defines anything
    "xfuser.model_executor.models.runner_models.base_model": (
        onload_to_local_device,
        time_runs_on_host,
        synchronize_without_cuda,
    ),
}
