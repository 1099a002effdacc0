"""The CPU compat layer: imports, idempotence, the version guard and each runtime patch.

The P2P fixes (kept isend handles, receive-only waits in ``_communicate_shapes``) need two
pipeline stages; they are exercised end to end by the PipeFusion cases of test_baselines.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import stadi_xdit.xdit  # noqa: F401  (applies the compat layer: this machine has no CUDA)
from stadi_xdit import compat
from stadi_xdit.compat import _hooks, imports, runtime
from stadi_xdit.offline.spawn import run_distributed

pytestmark = pytest.mark.cpu_only("the compat layer is CPU-only")


def test_fresh_process_imports_xfuser_after_stadi_xdit():
    script = textwrap.dedent(
        """
        import json, sys
        import stadi_xdit.xdit
        from stadi_xdit.compat import is_applied
        lazy = "xfuser" not in sys.modules
        import xfuser
        import xfuser.model_executor.pipelines
        import xfuser.envs as envs
        from xfuser.core.sparge_attention import block_mask
        print(json.dumps({
            "applied": is_applied(),
            "lazy": lazy,
            "triton": "triton" in sys.modules,
            "stub": getattr(block_mask, "__stadi_compat_stub__", False),
            "cuda_version": str(envs.CUDA_VERSION),
            "backend": envs.get_torch_distributed_backend(),
            "long_ctx": envs.PACKAGES_CHECKER.get_packages_info()["has_long_ctx_attn"],
            "pipelines": hasattr(xfuser, "xFuserPixArtAlphaPipeline") and hasattr(xfuser, "xFuserFluxPipeline"),
        }))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts == {
        "applied": True,
        "lazy": True,  # importing stadi_xdit does not import xfuser
        "triton": False,  # no global fake triton
        "stub": True,
        "cuda_version": "0.0",
        "backend": "gloo",
        "long_ctx": True,
        "pipelines": True,
    }


def test_applying_twice_is_harmless():
    from xfuser import envs
    from xfuser.core.distributed import group_coordinator as gc

    before = (gc.PipelineGroupCoordinator._pipeline_isend, gc.PipelineGroupCoordinator.reset_buffer,
              envs.get_torch_distributed_backend, sys.modules[imports.BLOCK_MASK_MODULE])
    compat.apply_cpu_compat()
    compat.apply_cpu_compat()
    # the patch functions themselves are idempotent too
    for patch in runtime.RUNTIME_PATCHES["xfuser.core.distributed.group_coordinator"]:
        patch(gc)
    imports.patch_envs_without_accelerator(envs)
    imports.allow_sequence_parallel_on_cpu(envs)
    imports.stub_sparge_block_mask()
    after = (gc.PipelineGroupCoordinator._pipeline_isend, gc.PipelineGroupCoordinator.reset_buffer,
             envs.get_torch_distributed_backend, sys.modules[imports.BLOCK_MASK_MODULE])
    assert after == before
    assert compat.is_applied()
    assert sys.meta_path.count(_hooks._FINDER) == 1
    for hooks in _hooks._HOOKS.values():
        assert len({_hooks._key(h) for h in hooks}) == len(hooks)


@pytest.mark.parametrize("found", ["0.6.9", None])
def test_version_guard_names_pinned_and_found(monkeypatch, found):
    def fake_version(name):
        assert name == "xfuser"
        if found is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return found

    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    monkeypatch.setattr(compat, "_APPLIED", False)
    with pytest.raises(ImportError) as info:
        compat.apply_cpu_compat()
    msg = str(info.value)
    assert "\n" not in msg
    assert "xfuser==0.7.0" in msg and f"found xfuser {found or 'none'}" in msg


def test_block_mask_stub_raises_clearly():
    from xfuser.core.sparge_attention.sparge import get_block_map_meansim

    with pytest.raises(RuntimeError, match="triton"):
        get_block_map_meansim(None, None)


def test_envs_report_cpu_facts():
    from packaging.version import Version
    from xfuser import envs
    from xfuser.config.config import CUDA_VERSION

    assert CUDA_VERSION == Version("0.0")
    assert envs.get_torch_distributed_backend() == "gloo"
    assert envs.get_device_name() == "cpu"


def test_sdpa_flash_returns_output_and_lse_on_cpu():
    from xfuser.core.distributed.attention_backend import ATTENTION_FUNCTION_REGISTRY, AttentionBackendType

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen) for _ in range(3))
    k, v = k[:, :, :5], v[:, :, :5]  # key length != query length, as in a ring step
    out, lse = ATTENTION_FUNCTION_REGISTRY[AttentionBackendType.SDPA_FLASH](q, k, v, 0.0, False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert lse.shape == (2, 3, 7)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, dim=-1))


def test_process_group_is_bound_in_sequence_parallel_modules():
    from xfuser.core.distributed import fp8_comms
    from xfuser.core.sparge_attention import head_balance
    from xfuser.model_executor.layers import usp
    from yunchang.globals import PROCESS_GROUP

    assert usp.PROCESS_GROUP is PROCESS_GROUP
    assert head_balance.PROCESS_GROUP is PROCESS_GROUP
    assert fp8_comms.PROCESS_GROUP is PROCESS_GROUP


def test_synchronize_is_a_host_no_op():
    from xfuser.core.distributed import group_coordinator as gc

    # the module's own name is the host no-op (torch.cuda.synchronize would raise here), and it returns
    assert gc.synchronize is runtime._host_synchronize
    assert gc.synchronize() is None


class _FakeWork:
    def __init__(self, completed: bool):
        self.completed, self.waits = completed, 0

    def is_completed(self):
        return self.completed

    def wait(self):
        self.waits += 1
        self.completed = True


def test_kept_sends_are_pruned_and_never_waited_twice():
    owner = SimpleNamespace()
    done, pending = _FakeWork(True), _FakeWork(False)
    runtime._keep_send_alive(owner, done, torch.zeros(1))
    runtime._keep_send_alive(owner, pending, torch.zeros(1))
    assert [w for w, _ in owner._pending_sends] == [pending]  # the completed one was dropped
    runtime._keep_send_alive(owner, done, torch.zeros(1))
    runtime._drain_sends(owner)
    # a second wait() on a completed gloo send blocks forever, so completed works are skipped
    assert (pending.waits, done.waits) == (1, 0)
    assert not hasattr(owner, "_pending_sends")


def test_flux_prepare_run_uses_a_cpu_generator(monkeypatch):
    import xfuser.core.distributed as xdist
    from xfuser import xFuserFluxPipeline
    from xfuser.config import InputConfig

    state = SimpleNamespace(runtime_config=SimpleNamespace(warmup_steps=7))
    monkeypatch.setattr(xdist, "get_runtime_state", lambda: state)
    calls = []

    def fake_call(**kwargs):
        calls.append((kwargs, state.runtime_config.warmup_steps))

    pipe = SimpleNamespace(__call__=fake_call)
    xFuserFluxPipeline.prepare_run(pipe, InputConfig(height=64, width=64, batch_size=1), steps=2)
    (kwargs, warmup_during), = calls
    assert kwargs["generator"].device.type == "cpu"
    assert (kwargs["num_inference_steps"], warmup_during, state.runtime_config.warmup_steps) == (2, 1, 7)


def _broadcast_object_rank(rank, world_size):
    from xfuser.core.distributed import get_world_group, init_distributed_environment

    init_distributed_environment()  # env:// from the harness, backend from the patched envs
    obj = {"plan": [3, 5], "rank": rank} if rank == 0 else None
    return get_world_group().broadcast_object(obj, src=0)


def test_broadcast_object_works_without_shm_broadcaster():
    assert run_distributed(_broadcast_object_rank, 2, timeout=120) == [{"plan": [3, 5], "rank": 0}] * 2
