"""Runtime fixes: let xfuser's parallel paths run on CPU with gloo.

Each ``patch_*``/``bind_*``/``route_*`` function takes the freshly imported xfuser module it
fixes and is idempotent.  ``stadi_xdit.compat`` registers them as post-import hooks, so they
apply whenever (and only if) the xfuser module is imported.  The same fixes, as a diff against
xfuser 0.7.0, live in ``patches/xfuser-0.7.0-cpu-gloo.patch``.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.distributed as dist

_MARK = "_stadi_cpu_compat"


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


def _is_patched(fn) -> bool:
    return getattr(fn, _MARK, False)


# --------------------------------------------------------------------------- group_coordinator


def _host_synchronize(device=None) -> None:
    """gloo's Work.wait() already blocks the host until the data is in place."""


def patch_synchronize(gc: ModuleType) -> None:
    """The module-level torch.cuda.synchronize raises without CUDA; gloo waits are host-synchronous."""
    # (only the original _communicate_shapes calls it; kept for any other caller)
    if not torch.cuda.is_available():
        gc.synchronize = _host_synchronize


def patch_shm_broadcaster(gc: ModuleType) -> None:
    """broadcast_object reads self.shm_broadcaster, which nothing sets; None selects its cpu_group path."""
    if not hasattr(gc.GroupCoordinator, "shm_broadcaster"):
        gc.GroupCoordinator.shm_broadcaster = None


def _keep_send_alive(self, work, tensor) -> None:
    """Hold an isend's Work handle (and its buffer) until the send is known to be complete."""
    pending = self.__dict__.setdefault("_pending_sends", [])
    # gloo reports completion only after wait(); NCCL's is_completed() polls its event
    pending[:] = [(w, t) for w, t in pending if not w.is_completed()]
    pending.append((work, tensor))


def _drain_sends(self) -> None:
    """Wait for all kept sends; only call where every peer receives them without our help."""
    for work, _ in self.__dict__.pop("_pending_sends", []):
        if not work.is_completed():  # a second wait() on a gloo send blocks forever
            work.wait()


def patch_pipeline_isend(gc: ModuleType) -> None:
    """pipeline_isend drops the isend Work handle, and gloo cancels a send whose handle is freed."""
    # The handles are waited for when the next PipeFusion run queues its receives (every send
    # of a run is received within that run, so this cannot block) or the buffers are reset,
    # and dropped on destroy.
    cls = gc.PipelineGroupCoordinator
    if _is_patched(cls._pipeline_isend):
        return

    def keeping(orig):
        @functools.wraps(orig)
        def wrapper(self, tensor):
            work = orig(self, tensor)
            _keep_send_alive(self, work, tensor)
            return work

        return _mark(wrapper)

    def draining_first(orig, run_start_only=False):
        @functools.wraps(orig)
        def wrapper(self, *args, **kwargs):
            if not run_start_only or not (self.recv_tasks_queue or self.receiving_tasks):
                _drain_sends(self)
            return orig(self, *args, **kwargs)

        return _mark(wrapper)

    orig_destroy = cls.destroy

    @functools.wraps(orig_destroy)
    def destroy(self):
        self.__dict__.pop("_pending_sends", None)
        return orig_destroy(self)

    cls._pipeline_isend = keeping(cls._pipeline_isend)
    cls._pipeline_isend_skip = keeping(cls._pipeline_isend_skip)
    cls.add_pipeline_recv_task = draining_first(cls.add_pipeline_recv_task, run_start_only=True)
    cls.reset_buffer = draining_first(cls.reset_buffer)
    cls.destroy = _mark(destroy)


def _exchange(self, ops) -> None:
    """Run a batch of P2P ops and wait on its receives only (sends are kept alive)."""
    if not ops:
        return
    reqs = dist.batch_isend_irecv(ops)
    if len(reqs) != len(ops):  # a coalescing backend (NCCL) returns one handle for the batch
        for req in reqs:
            req.wait()
        return
    for op, req in zip(ops, reqs):
        if op.op is dist.isend:
            _keep_send_alive(self, req, op.tensor)
        else:
            req.wait()


@_mark
def _communicate_shapes(self, tensor_send_to_next=None, recv_prev=False):
    """xfuser's ``_communicate_shapes`` (dim count, then shape), waiting on receives only."""
    ops = []
    if recv_prev:
        recv_dim = torch.empty((1), device=self.device, dtype=torch.int64)
        ops.append(dist.P2POp(dist.irecv, recv_dim, self.prev_rank, self.device_group))
    if tensor_send_to_next is not None:
        send_dim = torch.tensor(tensor_send_to_next.dim(), device=self.device, dtype=torch.int64)
        ops.append(dist.P2POp(dist.isend, send_dim, self.next_rank, self.device_group))
    _exchange(self, ops)

    ops = []
    recv_shape = None
    if recv_prev:
        recv_shape = torch.empty(torch.Size(recv_dim), device=self.device, dtype=torch.int64)
        ops.append(dist.P2POp(dist.irecv, recv_shape, self.prev_rank, self.device_group))
    if tensor_send_to_next is not None:
        send_shape = torch.tensor(tensor_send_to_next.size(), device=self.device, dtype=torch.int64)
        ops.append(dist.P2POp(dist.isend, send_shape, self.next_rank, self.device_group))
    _exchange(self, ops)

    return torch.Size(recv_shape if recv_shape is not None else [0, 0, 0])


def patch_communicate_shapes(gc: ModuleType) -> None:
    """Both pipeline ends send shapes first and a gloo send waits for the peer's receive: deadlock."""
    # the replacement waits on its receives only and keeps the sends alive
    cls = gc.PipelineGroupCoordinator
    if not _is_patched(cls._communicate_shapes):
        cls._communicate_shapes = _communicate_shapes


# --------------------------------------------------------------------------- attention


def bind_yunchang_process_group(mod: ModuleType) -> None:
    """usp/usp_legacy/head_balance/fp8_comms bind yunchang's PROCESS_GROUP only under CUDA (else None)."""
    if getattr(mod, "PROCESS_GROUP", None) is None:
        from yunchang.globals import PROCESS_GROUP

        mod.PROCESS_GROUP = PROCESS_GROUP


def route_sdpa_flash_to_cpu(ab: ModuleType) -> None:
    """SDPA_FLASH's aten kernel has no CPU version; its CPU twin also returns the LSE ring attention needs."""
    # (SDPA_MATH returns attention probabilities in place of the LSE, so it cannot stand in)
    registry = ab.ATTENTION_FUNCTION_REGISTRY
    key = ab.AttentionBackendType.SDPA_FLASH
    orig = registry[key]
    if _is_patched(orig):
        return

    @functools.wraps(orig)
    def sdpa_flash(query, key, value, dropout_p, is_causal, attention_kwargs=None):
        if query.device.type != "cpu":
            return orig(query, key, value, dropout_p, is_causal, attention_kwargs=attention_kwargs)
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal
        )
        return output, lse

    registry[key] = _mark(sdpa_flash)


# --------------------------------------------------------------------------- pipelines


def patch_flux_prepare_run(flux: ModuleType) -> None:
    """prepare_run seeds a torch.Generator(device="cuda"); use xfuser's own device like the base class."""
    cls = flux.xFuserFluxPipeline
    if _is_patched(cls.prepare_run):
        return
    orig = cls.prepare_run

    @functools.wraps(orig)
    def prepare_run(self, input_config, steps: int = 3, sync_steps: int = 1):
        from xfuser.core.distributed import get_runtime_state
        from xfuser.envs import get_device_name

        prompt = [""] * input_config.batch_size if input_config.batch_size > 1 else ""
        warmup_steps = get_runtime_state().runtime_config.warmup_steps
        get_runtime_state().runtime_config.warmup_steps = sync_steps
        self.__call__(
            height=input_config.height,
            width=input_config.width,
            prompt=prompt,
            num_inference_steps=steps,
            max_sequence_length=input_config.max_sequence_length,
            generator=torch.Generator(device=get_device_name()).manual_seed(42),
            output_type=input_config.output_type,
        )
        get_runtime_state().runtime_config.warmup_steps = warmup_steps

    cls.prepare_run = _mark(prepare_run)


# --------------------------------------------------------------------------- step caching (cache-dit)


def patch_cache_dit_agreement(adapter: ModuleType) -> None:
    """dbcache makes cache-dit's skip decision agree on every rank (rank 0's, broadcast over the world
    group), from a tensor on torch.cuda.current_device(), which raises without CUDA: the same broadcast
    from the world group's own device."""
    if _is_patched(adapter._install_sp_can_cache_sync):
        return

    def install_agreement() -> None:
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
            return
        if adapter._SP_SYNC_PATCHED:
            return
        from cache_dit.caching.cache_contexts.cache_manager import CachedContextManager
        from xfuser.core.distributed import get_world_group

        decide = CachedContextManager.can_cache

        @torch.compiler.disable
        def can_cache(self, *args, **kwargs):
            own = decide(self, *args, **kwargs)
            world = get_world_group()
            agreed = torch.tensor([1 if own else 0], dtype=torch.int32, device=world.device)
            world.broadcast(agreed, src=0)
            if agreed.item() and not getattr(self, "_xdit_cache_warmed", False):
                dist.barrier(group=world.device_group)  # as xDiT: once, before the first cached step
                self._xdit_cache_warmed = True
            return bool(agreed.item())

        CachedContextManager.can_cache = can_cache
        adapter._SP_SYNC_PATCHED = True

    adapter._install_sp_can_cache_sync = _mark(install_agreement)


# module name -> patches to run right after it is imported
RUNTIME_PATCHES: dict[str, tuple] = {
    "xfuser.core.distributed.group_coordinator": (
        patch_synchronize,
        patch_shm_broadcaster,
        patch_pipeline_isend,
        patch_communicate_shapes,
    ),
    "xfuser.core.distributed.attention_backend": (route_sdpa_flash_to_cpu,),
    "xfuser.model_executor.layers.usp": (bind_yunchang_process_group,),
    "xfuser.model_executor.layers.usp_legacy": (bind_yunchang_process_group,),
    "xfuser.core.sparge_attention.head_balance": (bind_yunchang_process_group,),
    "xfuser.core.distributed.fp8_comms": (bind_yunchang_process_group,),
    "xfuser.model_executor.pipelines.pipeline_flux": (patch_flux_prepare_run,),
    "xfuser.model_executor.cache.adapters.cache_dit": (patch_cache_dit_agreement,),
}
