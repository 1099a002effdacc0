"""Runner conformance: every xDiT runner model that STADI serves, through `stadi-xdit`, in the modes users use.

A family gets these cases by declaring its runner models (`FamilySpec.hub_models`); what each model
takes is read from xfuser itself: its `ModelCapabilities` (CFG parallel, parallel VAE), whether its
`_run_pipe` passes a negative prompt, its default guidance and its output type. Per model, on the tiny
offline hub cache:

- `plain`: xDiT's runner on one process, guidance on (with a negative prompt where the model takes one);
- `exact`: STADI exact on 2 ranks with uneven bands, the same call: the same image or video;
- `parallel`: STADI exact with `--use_cfg_parallel` (where the model has CFG) and `--use_parallel_vae`
  (where it applies): the same output up to DistVAE's bf16 rounding;
- `guidance_off`: STADI's stale mode with guidance 1: it runs and saves;
- `cached`: where xDiT gives the model a step cache (`--cache_method teacache|fbcache|dbcache`, its first),
  STADI's stale mode with it, at a threshold that reuses every step it may: steps are served, and it saves;
- `ulysses`: STADI exact on 4 ranks = 2 groups x Ulysses-2 (`--ulysses_degree 2`): the same output (its odd
  token rows: the last group computes the row past the plan's 2-row units, its ranks' parts a row apart);
- `cached_ulysses`: `cached` over those groups: each group serves as one, and the output is the flat one's;
- `cached_groups`: `cached` over the unequal groups of `groups` below, launched as those: the same;
- `groups`: STADI exact on nodes of different sizes, `--stadi_groups 2,1`: two `stadi-xdit` launches with
  `--nnodes 2` (2 processes, then 1) on this machine, a group of Ulysses-2 and a single rank: the same output;
- `node_groups`: the same nodes with no flag naming the members: the pipeline groups them by node itself.

Most of a tiny run is the start-up of its processes (each imports torch, diffusers and xfuser: about
9 CPU-s), so the runs do not get a launch each. Runs of the same world size share one launch (one
for 1 rank, one for 2, one for 4, one of two nodes for 2 + 1), which runs xDiT's runner once per run, as `xdit` would, with a
fresh rendezvous for each (the runner destroys its process group when it ends). A new runner model
adds a few CPU-seconds, not another seven processes.

Videos are stored as NumPy frames (the runner's `export_to_video` needs imageio, not a dependency here).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook before xfuser)
from stadi_xdit.families import hub_models
from stadi_xdit.offline.spawn import free_port
from stadi_xdit.xdit.step_cache import STADI_CACHE_METHODS, cache_dit_settings

pytestmark = pytest.mark.cpu_only("CPU runs of the tiny offline cache")

# xDiT's runner once per run of the JSON list in argv[1], each with its own output and log files, and videos
# saved as NumPy frames under the path the runner gives. The runner ends each run by destroying its process
# group; the next run meets at its own port with its own store (torchrun's agent store would hand it the
# previous run's keys).
RUNNER_SCRIPT = """\
import json, os, runpy, sys
import numpy as np
import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook before xfuser)
from xfuser.model_executor.models.runner_models import base_model
def _save_frames(video, output_video_path, fps=10, **_):
    with open(output_video_path, "wb") as out:
        np.save(out, np.asarray(video))
    return output_video_path
base_model.export_to_video = _save_frames
for run in json.loads(open(sys.argv[1]).read()):
    os.environ.update(MASTER_PORT=str(run["port"]), TORCHELASTIC_USE_AGENT_STORE="False")
    sys.stdout.flush(), sys.stderr.flush()
    with open(f"{run['log']}.rank{os.environ['RANK']}", "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    sys.argv = ["xfuser.runner", *run["argv"]]
    runpy.run_module("xfuser.runner", run_name="__main__", alter_sys=True)
    sys.stdout.flush(), sys.stderr.flush()
"""

STADI_EXACT = ["--use_stadi", "--stadi_exact", "--stadi_speeds", "3,5", "--warmup_steps", "1"]
# Modes launched as several nodes (torchrun --nnodes): their number (each node's count from the STADI flags), or
# each node's count where no flag names the members.
NODES = {"groups": 2, "cached_groups": 2, "node_groups": (2, 1)}


@dataclass(frozen=True)
class RunnerRun:
    model: str
    mode: str
    nodes: tuple[int, ...]  # processes per node (torchrun --nproc_per_node of each --node_rank)
    argv: list[str]

    @property
    def name(self) -> str:
        return f"{self.model}-{self.mode}"


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
    modes = {"plain": guided, "exact": [*guided, *STADI_EXACT, "--stadi_degree", "2"], "parallel": parallel,
             "guidance_off": [*common, "--guidance_scale", "1", "--use_stadi", "--stadi_degree", "2",
                              "--warmup_steps", "1"]}
    modes["ulysses"] = [*guided, *STADI_EXACT, "--stadi_degree", "2", "--ulysses_degree", "2"]
    modes["groups"] = [*guided, *STADI_EXACT, "--stadi_groups", "2,1"]
    modes["node_groups"] = [*guided, "--use_stadi", "--stadi_exact", "--warmup_steps", "1"]
    methods = [m for m in model.settings.step_cache_config or {} if m in STADI_CACHE_METHODS]
    if methods and model.capabilities.supports_step_caching:
        # 6 steps: the warmup step computes (a new call), its band stays, and the rank's last computes: 4 served.
        # cache-dit's engine: without its own warmup steps and step mask, and a served step skips the 2nd block.
        method = methods[0]
        settings = {"residual_diff_threshold": 1e6}
        if cache_dit_settings(model.settings.step_cache_config, method) is not None:
            settings.update(max_warmup_steps=0, scm_policy=None, Fn_compute_blocks=1)
        modes["cached"] = [*guided[:guided.index("--num_inference_steps")], "--num_inference_steps", "6",
                           *guided[guided.index("--num_inference_steps") + 2:], "--use_stadi", "--stadi_degree", "2",
                           "--stadi_speeds", "1,1", "--warmup_steps", "1", "--cache_method", method,
                           "--cache_config", json.dumps(settings)]
        modes["cached_ulysses"] = [*modes["cached"], "--ulysses_degree", "2"]
        modes["cached_groups"] = [*modes["cached"], "--stadi_groups", "2,1"]
    return modes


def runner_runs(model_names) -> list[RunnerRun]:
    """Every mode of every model, with the processes per node `stadi-xdit` would launch it on (its own rule)."""
    from xfuser.cli import get_nproc_from_args

    from stadi_xdit.xdit.cli_hook import stadi_nproc_from_args

    def nodes(mode: str, argv: list[str]) -> tuple[int, ...]:
        nnodes = NODES.get(mode, 1)
        if isinstance(nnodes, tuple):
            return nnodes
        return tuple(stadi_nproc_from_args(argv, get_nproc_from_args, nnodes=nnodes, node_rank=node)
                     for node in range(nnodes))

    return [RunnerRun(model, mode, nodes(mode, argv), argv)
            for model in model_names for mode, argv in runner_modes(model).items()]


def _output(path: Path) -> np.ndarray:
    """A saved image, or a video's frames (stored as NumPy, see RUNNER_SCRIPT), as floats."""
    if path.suffix == ".png":
        return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    return np.load(path).astype(np.float64)


def _saved(folder: Path, run: RunnerRun) -> Path:
    """The one image or video the runner saved for `run`."""
    (path,) = [p for p in (folder / run.name).iterdir() if p.suffix in (".png", ".mp4")]
    return path


def _assert_same_output(model_name: str, what: str, output: np.ndarray, against: str, reference: np.ndarray) -> None:
    """The same output up to bf16 rounding (head shards, DistVAE): a few levels of 255 on these tiny models."""
    print(f"[runner conformance] {model_name} {what}: {np.abs(output - reference).max():.0f}/255 at most from {against}")
    assert np.abs(output - reference).max() <= 16, what
    assert np.linalg.norm(output - reference) / np.linalg.norm(reference) <= 1e-2, what


def _log(folder: Path, run: RunnerRun) -> str:
    """Every rank's log of one run, rank 0 first."""
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob(f"{run.name}.log.rank*")))


def launch_by_nodes(runs: list[RunnerRun], hub: Path, folder: Path) -> dict[tuple[int, ...], tuple[str, int]]:
    """Every run, one launch per layout of nodes (one `stadi-xdit` per node), all launches at once: each launch's
    output and exit status (its nodes' together: the first failed node's status)."""
    from stadi_xdit.run import build_launch_command

    script = folder / "runner.py"
    script.write_text(RUNNER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HOME=str(hub), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    by_nodes = defaultdict(list)
    for run in runs:
        (folder / run.name).mkdir()
        by_nodes[run.nodes].append({"argv": [*run.argv, "--output_directory", str(folder / run.name)],
                                    "port": free_port(), "log": str(folder / f"{run.name}.log")})
    procs = {}
    for nodes, plan in by_nodes.items():
        runs_file = folder / f"runs{'-'.join(map(str, nodes))}.json"
        runs_file.write_text(json.dumps(plan))
        port = str(free_port())
        procs[nodes] = [subprocess.Popen(build_launch_command(
            ["--nproc_per_node", str(nproc), "--nnodes", str(len(nodes)), "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port, str(script), str(runs_file)]),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder)
            for node, nproc in enumerate(nodes)]
    launches = {}
    for nodes, node_procs in procs.items():
        outputs = [proc.communicate(timeout=900)[0] for proc in node_procs]
        launches[nodes] = ("".join(outputs), next((p.returncode for p in node_procs if p.returncode), 0))
    return launches


def test_every_served_runner_model_runs_and_saves_in_every_mode(hub, tmp_path):
    """One test, not one per model: the launches are shared, and pytest's workers would each start them."""
    runs = runner_runs(sorted(hub_models()))
    launches = launch_by_nodes(runs, hub, tmp_path)
    failures = []
    for model_name in sorted(hub_models()):
        try:
            check_served_model(model_name, runs, launches, tmp_path)
        except AssertionError as failure:
            failures.append(f"{model_name}: {failure}")
    assert not failures, "\n\n".join(failures)


def check_served_model(model_name: str, runs: list[RunnerRun], launches: dict[tuple[int, ...], tuple[str, int]],
                       folder: Path) -> None:
    launch_runs = runs
    runs = {run.mode: run for run in runs if run.model == model_name}
    for run in runs.values():
        output, status = launches[run.nodes]
        if status:  # the launch's runs go one after the other: the one that failed names itself in its log
            failed = [other for other in launch_runs if other.nodes == run.nodes and "Traceback" in _log(folder, other)]
            shown = failed[0] if failed else run
            raise AssertionError(f"{model_name} {run.mode}: its launch failed in {shown.name}: {' '.join(shown.argv)}"
                                 f"\n{_log(folder, shown)[-4000:]}\n{output[-3000:]}")
    logs = {mode: _log(folder, run) for mode, run in runs.items()}
    assert all(("STADI plan" in logs[mode]) == ("--use_stadi" in run.argv) for mode, run in runs.items())
    assert "STADI rank 1: 3 model evaluations (plan: 3)" in logs["exact"], logs["exact"][-3000:]
    assert ": 2 ranks, " in logs["ulysses"] and "(align 2)" in logs["ulysses"], logs["ulysses"][-3000:]
    assert "STADI rank 1 (Ulysses rank 1): 3 model evaluations (plan: 3)" in logs["ulysses"], logs["ulysses"][-3000:]
    assert all(line in logs[mode] for mode in ("groups", "node_groups")
               for line in ("STADI rank 0 (Ulysses rank 1): 3 model evaluations (plan: 3)",
                            "STADI rank 1: 3 model evaluations (plan: 3)", "method=head_shards")), logs["groups"][-3000:]
    assert (folder / runs["exact"].name / "timings.json").is_file()  # the runner's own timings, saved too
    if "--use_parallel_vae" in runs["parallel"].argv:
        assert "Parallel VAE decoder enabled" in logs["parallel"], logs["parallel"][-3000:]
    outputs = {mode: _output(_saved(folder, run)) for mode, run in runs.items()}  # one each, named by the runner
    plain = outputs["plain"]
    assert all(output.shape == plain.shape for output in outputs.values())
    assert np.array_equal(outputs["exact"], plain), np.abs(outputs["exact"] - plain).max()
    # Ulysses inside STADI groups: each rank attends with half of the heads over the whole image, as one process
    # does; the runner computes in bf16, where attention over a head shard may round otherwise. On nodes of
    # different sizes the group of 2 attends with half of the heads, the single rank with all of them.
    _assert_same_output(model_name, "ulysses", outputs["ulysses"], "plain", plain)
    _assert_same_output(model_name, "groups 2,1 on two nodes", outputs["groups"], "plain", plain)
    assert "_stadi-full-exact_g2-1_n3_" in _saved(folder, runs["groups"]).name
    assert "STADI groups from the nodes' sizes: [2, 1]" in logs["node_groups"], logs["node_groups"][-3000:]
    _assert_same_output(model_name, "node_groups", outputs["node_groups"], "plain", plain)
    assert "_stadi-full-exact_g2-1_n3_" in _saved(folder, runs["node_groups"]).name
    # DistVAE decodes row shards with halos and all-reduced GroupNorm statistics in bf16: not bit-exact
    # (a few levels of 255 on these tiny models), but the same output.
    _assert_same_output(model_name, "parallel", outputs["parallel"], "plain", plain)
    assert not np.array_equal(outputs["guidance_off"], plain)  # guidance 1 is another call, and it saved
    if "cached" in runs:
        method = runs["cached"].argv[runs["cached"].argv.index("--cache_method") + 1]
        served = "6 model evaluations (plan: 6), 4 served by the step cache"
        assert all(f"STADI rank {rank}: {served}" in logs["cached"] for rank in (0, 1)), logs["cached"][-3000:]
        assert f"_stadi-full_{method}_n2_" in _saved(folder, runs["cached"]).name
        # Over Ulysses groups each group serves as one: the same forwards on its ranks, and the same output as the
        # flat cached run up to the head shards' bf16 rounding (as for `ulysses` above). Over unequal groups, which
        # STADI builds itself, the group of 2 still decides as one.
        for mode, label, ranks in (("cached_ulysses", "u2", ((0, 0), (0, 1), (1, 0), (1, 1))),
                                   ("cached_groups", "g2-1", ((0, 0), (0, 1), (1, None)))):
            assert all(f"STADI rank {member}{'' if part is None else f' (Ulysses rank {part})'}: {served}"
                       in logs[mode] for member, part in ranks), logs[mode][-3000:]
            assert f"_stadi-full_{label}_{method}_n{len(ranks)}_" in _saved(folder, runs[mode]).name
            _assert_same_output(model_name, mode, outputs[mode], "the flat cached run", outputs["cached"])
    assert not [path for run in runs.values() for path in (folder / run.name).glob(".*partial*")], \
        "a temporary save was left behind"
