"""Runner conformance: every xDiT runner model that STADI serves, through `stadi-xdit`, in the modes users use.

A family gets these cases by declaring its runner models (`FamilySpec.hub_models`); what each model
takes is read from xfuser itself: its `ModelCapabilities` (CFG parallel, parallel VAE), whether its
`_run_pipe` passes a negative prompt, its default guidance and its output type. Per model, one
concurrent batch of launches on the tiny offline hub cache:

- `plain`: xDiT's runner on one process, guidance on (with a negative prompt where the model takes one);
- `exact`: STADI exact on 2 ranks with uneven bands, the same call: the same image or video;
- `parallel`: STADI exact with `--use_cfg_parallel` (where the model has CFG) and `--use_parallel_vae`
  (where it applies): the same output up to DistVAE's bf16 rounding;
- `guidance_off`: STADI's stale mode with guidance 1: it runs and saves.

Videos are stored as NumPy frames (the runner's `export_to_video` needs imageio, not a dependency here).
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from PIL import Image

import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook before xfuser)
from stadi_xdit.families import hub_models
from stadi_xdit.offline.spawn import free_port

pytestmark = pytest.mark.cpu_only("CPU runs of the tiny offline cache")

# The runner, with videos saved as NumPy frames under the path it is given.
RUNNER_SCRIPT = """\
import runpy
import numpy as np
import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook before xfuser)
from xfuser.model_executor.models.runner_models import base_model
def _save_frames(video, output_video_path, fps=10, **_):
    with open(output_video_path, "wb") as out:
        np.save(out, np.asarray(video))
    return output_video_path
base_model.export_to_video = _save_frames
runpy.run_module("xfuser.runner", run_name="__main__", alter_sys=True)
"""

STADI_EXACT = ["--use_stadi", "--stadi_exact", "--stadi_speeds", "3,5", "--warmup_steps", "1"]


@pytest.fixture(scope="module")
def hub(make_hub_cache):
    return make_hub_cache(sorted(hub_models()))


def runner_modes(model_name: str) -> dict[str, list[str]]:
    """Launch name -> the flags of that mode for runner model `model_name` (see the module docstring)."""
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    from stadi_xdit.run import runner_passes

    model = MODEL_REGISTRY[model_name]
    guidance = model.default_input_values.guidance_scale or 4.0
    common = ["--model", model_name, *hub_models()[model_name].tiny_call, "--max_sequence_length", "16",
              "--prompt", "a red cat", "--num_inference_steps", "3"]
    guided = [*common, "--guidance_scale", str(guidance)]
    if runner_passes(model, "negative_prompt"):
        guided += ["--negative_prompt", "blurry"]
    parallel = [*guided, *STADI_EXACT, "--stadi_degree", "2"]
    if model.capabilities.use_cfg_parallel:
        parallel.append("--use_cfg_parallel")
    if model.capabilities.use_parallel_vae:
        parallel.append("--use_parallel_vae")
    return {"plain": guided, "exact": [*guided, *STADI_EXACT, "--stadi_degree", "2"], "parallel": parallel,
            "guidance_off": [*common, "--guidance_scale", "1", "--use_stadi", "--stadi_degree", "2",
                             "--warmup_steps", "1"]}


def _output(folder) -> np.ndarray:
    (path,) = [p for p in folder.iterdir() if p.suffix in (".png", ".mp4")]
    if path.suffix == ".png":
        return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    return np.load(path).astype(np.float64)


@pytest.mark.parametrize("model_name", sorted(hub_models()))
def test_served_runner_model_runs_and_saves_in_every_mode(hub, tmp_path, model_name):
    from stadi_xdit.run import build_launch_command

    script = tmp_path / "runner.py"
    script.write_text(RUNNER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HOME=str(hub), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    modes = runner_modes(model_name)
    procs = {}
    for name, args in modes.items():  # all at once: most of each run is start-up
        out = tmp_path / name
        out.mkdir()
        command = build_launch_command(["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                                        *args, "--output_directory", str(out)])
        procs[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       cwd=tmp_path)
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{model_name} {name}: {' '.join(modes[name])}\n{logs[name][-4000:]}"
    assert "STADI plan" not in logs["plain"] and all("STADI plan" in logs[name] for name in modes if name != "plain")
    assert "STADI rank 1: 3 model evaluations (plan: 3)" in logs["exact"], logs["exact"][-3000:]
    assert (tmp_path / "exact" / "timings.json").is_file()  # the runner's own timings, saved too
    if "--use_parallel_vae" in modes["parallel"]:
        assert "Parallel VAE decoder enabled" in logs["parallel"], logs["parallel"][-3000:]
    outputs = {name: _output(tmp_path / name) for name in modes}  # one output each, named as the runner does
    plain = outputs["plain"]
    assert all(output.shape == plain.shape for output in outputs.values())
    assert np.array_equal(outputs["exact"], plain), np.abs(outputs["exact"] - plain).max()
    # DistVAE decodes row shards with halos and all-reduced GroupNorm statistics in bf16: not bit-exact
    # (a few levels of 255 on these tiny models), but the same output.
    assert np.abs(outputs["parallel"] - plain).max() <= 16
    assert np.linalg.norm(outputs["parallel"] - plain) / np.linalg.norm(plain) <= 1e-2
    assert not np.array_equal(outputs["guidance_off"], plain)  # guidance 1 is another call, and it saved
    assert not list(tmp_path.glob(".*partial*")), "a temporary save was left behind"
