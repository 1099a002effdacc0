"""xfuser 0.7.0's model runner (``python -m xfuser.runner``, behind ``xdit``) on CPU under the compat layer.

The tiny pipelines are written once into an offline hub cache (``stadi_xdit.offline.hub_cache``)
under the runners' real repo ids; every run goes through xDiT's own ``MODEL_REGISTRY``,
``ModelLoader``, timing, saving and cleanup. The runner never imports stadi_xdit, so a two-line
launcher imports ``stadi_xdit.xdit`` first and runs ``xfuser.runner`` as ``__main__``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import stadi_xdit.xdit  # noqa: F401  (applies the compat layer: this machine has no CUDA)
from stadi_xdit.compat import runner as fixes
from stadi_xdit.offline.hub_cache import HUB_MODELS, hub_snapshot_dir, main
from stadi_xdit.offline.spawn import free_port

pytestmark = pytest.mark.cpu_only("the compat layer is CPU-only")

REPO = Path(__file__).resolve().parents[1]
PATCHES = [REPO / "patches" / "xfuser-0.7.0-cpu-gloo.patch", REPO / "patches" / "xfuser-0.7.0-runner-cpu.patch"]

TIMEOUT = 300
SIZE = ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--max_sequence_length", "16"]

LAUNCHER = textwrap.dedent(
    """
    import runpy, sys
    import stadi_xdit.xdit  # applies the CPU compat layer before any xfuser import
    sys.argv = ["xfuser.runner", *sys.argv[1:]]
    runpy.run_module("xfuser.runner", run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def hub(make_hub_cache) -> Path:
    home = make_hub_cache(HUB_MODELS)
    (home / "launch_runner.py").write_text(LAUNCHER)
    return home


def _run_runner(hub: Path, out: Path, args: list[str], nproc: int = 1, launcher: list[str] | None = None,
                **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HOME=str(hub), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
               **extra_env)
    launcher = launcher or [str(hub / "launch_runner.py")]
    if nproc == 1:  # what xDiT's runner sets for one process, but a free port: not its fixed 12355, which
        # two such tests on two pytest workers would both take (EADDRINUSE)
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port()), *launcher]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, *launcher, *args, "--output_directory", str(out)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_hub_cache_layout(hub):
    for name in HUB_MODELS:
        snapshot = hub_snapshot_dir(hub, HUB_MODELS[name])
        assert (snapshot / "model_index.json").is_file()
        assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name
    assert HUB_MODELS == {"FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
                          "SD3.5": "stabilityai/stable-diffusion-3.5-large", "Qwen-Image": "Qwen/Qwen-Image",
                          "Wan2.1-T2V": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}
    assert (hub_snapshot_dir(hub, HUB_MODELS["Qwen-Image"]) / "text_encoder").is_dir()


def test_hub_cache_rejects_unknown_model_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--models", "FLUX.1-dev,Nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--models" in err and "Nope" in err
    assert all(name in err for name in HUB_MODELS)
    assert not (tmp_path / "hub").exists()


FLUX_ARGS = ["--model", "FLUX.1-dev", *SIZE, "--prompt", "a red cube"]


@pytest.fixture(scope="module")
def flux_one_process(hub, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux1")
    _run_runner(hub, out, FLUX_ARGS)
    return out


def test_runner_flux_one_process(flux_one_process):
    assert _image(flux_one_process / "flux_1_dev_u1r1_tc_False_64x64_0.png").shape == (64, 64, 3)
    assert (flux_one_process / "timings.json").is_file()


def test_runner_flux_ulysses_two_processes_matches_one(hub, flux_one_process, tmp_path):
    _run_runner(hub, tmp_path, [*FLUX_ARGS, "--ulysses_degree", "2"], nproc=2)
    ref = _image(flux_one_process / "flux_1_dev_u1r1_tc_False_64x64_0.png")
    got = _image(tmp_path / "flux_1_dev_u2r1_tc_False_64x64_0.png")
    # bf16 both ways; Ulysses only moves heads between ranks, so the images agree
    assert np.abs(ref - got).max() <= 8


def test_runner_dbcache_on_two_processes_agrees_with_one(hub, tmp_path):
    """xDiT's dbcache (cache-dit) makes every rank take rank 0's skip decision, broadcast from a tensor that
    xfuser puts on the CUDA device; on CPU the compat layer puts it on the world group's device. Ulysses-2 then
    serves the same steps as one process (cache-dit logs them on rank 0), and the images agree as Ulysses' do.
    (The tiny models have 2 blocks, which xDiT's dbcache presets compute all; with the first block alone computed,
    a served step skips the second.)"""
    args = ["--model", "SD3.5", "--height", "64", "--width", "64", "--num_inference_steps", "12",
            "--max_sequence_length", "16", "--prompt", "a red cube", "--cache_method", "dbcache",
            "--cache_config", '{"residual_diff_threshold": 1.0, "Fn_compute_blocks": 1}']
    served = "get transformer_blocks_Fn_residual_buffer"  # cache-dit's debug line for a step it served
    one = _run_runner(hub, tmp_path / "one", args, CACHE_DIT_LOG_LEVEL="debug")
    two = _run_runner(hub, tmp_path / "two", [*args, "--ulysses_degree", "2"], nproc=2, CACHE_DIT_LOG_LEVEL="debug")
    served_one = (one.stdout + one.stderr).count(served)
    assert served_one > 0 and (two.stdout + two.stderr).count(served) == served_one
    ref = _image(tmp_path / "one" / "stable_diffusion_3_5_large_u1r1_tc_False_64x64_0.png")
    got = _image(tmp_path / "two" / "stable_diffusion_3_5_large_u2r1_tc_False_64x64_0.png")
    assert np.abs(ref - got).max() <= 16  # bf16 both ways, as for Flux above


@pytest.mark.parametrize(("model", "output_name"), [("SD3.5", "stable_diffusion_3_5_large"),
                                                    ("Qwen-Image", "qwen_image")])
def test_runner_other_models_one_process(hub, tmp_path, model, output_name):
    _run_runner(hub, tmp_path, ["--model", model, *SIZE, "--prompt", "a red cube"])
    assert _image(tmp_path / f"{output_name}_u1r1_tc_False_64x64_0.png").shape == (64, 64, 3)


def test_runner_patches_in_process(monkeypatch):
    from xfuser.envs import PACKAGES_CHECKER
    from xfuser.model_executor.models.runner_models import base_model
    from xfuser.model_executor.models.runner_models.loading import placement

    # the hub cache uses the registered runner models' own repo ids (the package registers them all)
    assert {name: base_model.MODEL_REGISTRY[name].settings.model_name for name in HUB_MODELS} == HUB_MODELS
    assert getattr(placement.place_pipeline_components, "_stadi_cpu_compat", False)
    assert not PACKAGES_CHECKER._on_rdna4() and not PACKAGES_CHECKER._on_mi3xx()
    assert getattr(base_model.xFuserModel._local_onload_device, "_stadi_cpu_compat", False)
    torch.cuda.synchronize()  # a no-op without CUDA, not an AssertionError
    start, end = base_model.torch.cuda.Event(enable_timing=True), base_model.torch.cuda.Event(enable_timing=True)
    assert isinstance(start, fixes.HostEvent)
    # the host clock the events read, stepped by hand: elapsed_time is the milliseconds between the records
    with monkeypatch.context() as clock:
        clock.setattr(fixes, "time", SimpleNamespace(perf_counter=iter([7.0, 7.25]).__next__))
        start.record()
        end.record()
    end.synchronize()
    assert start.elapsed_time(end) == 250.0 and end.elapsed_time(start) == -250.0
    assert base_model.torch.float32 is torch.float32  # everything but cuda.Event is torch's own
    # idempotent
    before = (placement.place_pipeline_components, base_model.torch, torch.cuda.synchronize,
              type(PACKAGES_CHECKER)._on_rdna4)
    for module_name, patches in fixes.RUNNER_PATCHES.items():
        for patch in patches:
            patch(sys.modules[module_name])
    assert before == (placement.place_pipeline_components, base_model.torch, torch.cuda.synchronize,
                      type(PACKAGES_CHECKER)._on_rdna4)


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch tool")
def test_patched_xfuser_runs_the_runner_without_stadi_xdit(hub, flux_one_process, tmp_path, patched_xfuser):
    """The two diffs carry the same fixes: plain `python -m xfuser.runner` works on a patched copy."""
    site = patched_xfuser(tmp_path / "site", PATCHES)
    out = tmp_path / "out"
    # the unpatched install dies at `import triton`, so success means the patched copy ran
    _run_runner(hub, out, FLUX_ARGS, launcher=["-m", "xfuser.runner"], PYTHONPATH=str(site))
    ref = _image(flux_one_process / "flux_1_dev_u1r1_tc_False_64x64_0.png")
    assert np.array_equal(ref, _image(out / "flux_1_dev_u1r1_tc_False_64x64_0.png"))
