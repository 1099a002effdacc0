"""Bad inputs to `stadi-xdit` (the `xdit` launcher with the plugin) and to xDiT's runner config dict:
each ends with one line naming the flag (exit status 2), before torchrun or any process starts.

Cheap: commands are only built and checked (`build_launch_command`, `check_launch_environment`),
never run; the offline hub cache is a bare `model_index.json` in the hub layout.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path

import pytest

import stadi_xdit.xdit  # noqa: F401  (compat layer and CLI hook before xfuser)
from stadi_xdit.offline.hub_cache import HUB_MODELS, hub_snapshot_dir
from stadi_xdit.run import build_launch_command, check_launch_environment, failed_rank_status

# xDiT's runner registry binds its log handler to the stderr of the moment it is first imported:
# import it now, not inside a test whose captured stderr is closed afterwards.
importlib.import_module("xfuser.model_executor.models.runner_models.base_model")

FLUX = ["--model", "FLUX.1-dev", "--use_stadi", "--stadi_degree", "2", "--height", "128", "--width", "128",
        "--num_inference_steps", "3", "--warmup_steps", "1"]
SCRIPT = ["ex.py", "--model", "tiny", "--use_stadi"]


def _one_line_exit(call, capsys, needle: str) -> str:
    """`call()` exits with status 2 and exactly one stderr line holding `needle`."""
    with pytest.raises(SystemExit) as info:
        call()
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and needle in lines[0], (info.value.code, lines)
    assert lines[0].startswith("stadi-xdit: error: ")
    return lines[0]


# --- torchrun's flags (R01-R10, R14) ---------------------------------------------------------------

@pytest.mark.parametrize("torchrun,needle", [
    (["--nproc_per_node", "x"], "--nproc_per_node must be an integer >= 1, got 'x'"),
    (["--nproc_per_node=auto"], "--nproc_per_node must be an integer >= 1, got 'auto'"),
    (["--nproc_per_node", "0"], "--nproc_per_node must be an integer >= 1, got '0'"),
    (["--nproc_per_node", "-2"], "--nproc_per_node must be an integer >= 1, got '-2'"),
    (["--nnodes", "x"], "--nnodes must be an integer >= 1, got 'x'"),
    (["--nnodes", "0"], "--nnodes must be an integer >= 1, got '0'"),
    (["--nnodes", "1:2"], "--nnodes 1:2: elastic node ranges are not supported"),
    (["--node_rank", "3"], "--node_rank must be an integer in [0, 0] (--nnodes 1), got '3'"),
    (["--nnodes", "2", "--node_rank", "-1"], "--node_rank must be an integer in [0, 1]"),
    (["--master_port", "abc"], "--master_port must be an integer in [1, 65535], got 'abc'"),
    (["--master_port", "99999"], "--master_port must be an integer in [1, 65535], got '99999'"),
    (["--master_addr", ""], "--master_addr must name a host"),
])
def test_torchrun_flags_are_named(torchrun, needle, capsys):
    _one_line_exit(lambda: build_launch_command([*torchrun, *FLUX]), capsys, needle)


@pytest.mark.parametrize("argv,needle", [
    ([*FLUX, "--stadi_degree", "-2"], "--stadi_degree must be an integer >= 1, got '-2'"),
    ([*SCRIPT, "--stadi_degree", "x"], "--stadi_degree must be an integer >= 1, got 'x'"),
    ([*SCRIPT, "--stadi_degree", "1e3"], "--stadi_degree must be an integer >= 1, got '1e3'"),
    ([*SCRIPT, "--stadi_degree", "2", "--vae_parallel_size", "x"], "--vae_parallel_size must be an integer >= 0"),
    ([*SCRIPT, "--stadi_degree", "2", "--vae_parallel_size", "-1"], "--vae_parallel_size must be an integer >= 0"),
])
def test_rank_count_flags_are_named(argv, needle, capsys):
    _one_line_exit(lambda: build_launch_command(argv), capsys, needle)


GROUPS = ["--model", "FLUX.1-dev", "--use_stadi", "--stadi_groups", "2,1", "--height", "128", "--width", "128",
          "--num_inference_steps", "3", "--warmup_steps", "1"]


@pytest.mark.parametrize("argv,needle", [
    ([*SCRIPT, "--stadi_groups", "2,0"], "--stadi_groups must be comma-separated integers in [1, 256]"),
    ([*SCRIPT, "--stadi_groups", "2;1"], "--stadi_groups must be comma-separated integers in [1, 256]"),
    ([*SCRIPT, "--stadi_groups", "2,1", "--ulysses_degree", "2"],
     "--stadi_groups 2,1 cannot be combined with --ulysses_degree 2: each group's size is its Ulysses degree"),
    ([*SCRIPT, "--stadi_groups", "2,1", "--stadi_degree", "3"], ("STADI rank counts disagree: --stadi_degree -> 3, "
                                                                 "--stadi_groups -> 2")),
    ([*SCRIPT, "--stadi_groups", "2,1", "--stadi_speeds", "1,2,3"], "STADI rank counts disagree"),
    (["--nnodes", "2", *SCRIPT, "--stadi_groups", "4,2,1"],
     ("7 STADI ranks cannot be spread evenly over --nnodes 2 (--stadi_groups 4,2,1 places one group per node on "
     "--nnodes 3; otherwise give each node's --nproc_per_node)")),
    (["--nproc_per_node", "2", *SCRIPT, "--stadi_groups", "2,1"],
     "--nproc_per_node 2 disagrees with the STADI flags (3 processes per node)"),
    (["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "2", *SCRIPT, "--stadi_groups", "2,1"],
     "--nproc_per_node 2 disagrees with the STADI flags (1 process on --node_rank 1)"),
    ([*GROUPS, "--stadi_speeds", "1,2,3"], "STADI rank counts disagree"),
    (["--nproc_per_node", "4", *GROUPS], "--nproc_per_node 4 disagrees with the STADI flags (3 processes per node)"),
])
def test_stadi_groups_are_checked_by_the_launcher(argv, needle, capsys):
    _one_line_exit(lambda: build_launch_command(argv), capsys, needle)


def test_unequal_nodes_each_start_their_group():
    """Nodes of different sizes: each node's launcher starts that node's group (both CFG branches of it), and the
    runner's inputs are checked against the whole launch, not against nproc x nnodes."""
    for node, nproc in ((0, 2), (1, 1)):
        command = build_launch_command(["--nnodes", "2", "--node_rank", str(node), "--master_addr", "10.0.0.1",
                                        *GROUPS])
        assert f"--nproc_per_node={nproc}" in command and "--nnodes=2" in command
    assert "--nproc_per_node=3" in build_launch_command(GROUPS)  # one node holds both groups
    explicit = build_launch_command(["--nnodes", "3", "--node_rank", "2", "--nproc_per_node", "1", *GROUPS])
    assert "--nproc_per_node=1" in explicit  # groups spanning nodes: each node says its own count
    # Flat STADI on the same nodes: each gives its count, the flags the launch's (3 ranks, not 2 x 2).
    flat = [*FLUX[:FLUX.index("--stadi_degree")], "--stadi_degree", "3", *FLUX[FLUX.index("--stadi_degree") + 2:]]
    for node, nproc in ((0, 2), (1, 1)):
        command = build_launch_command(["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", str(nproc),
                                        "--master_addr", "10.0.0.1", *flat])
        assert f"--nproc_per_node={nproc}" in command


# --- runner checks made once in the launcher (R13, R28) ----------------------------------------

@pytest.mark.parametrize("argv,needle", [
    ([*FLUX, "--use_cfg_parallel"], "--model FLUX.1-dev does not support --use_cfg_parallel"),
    (["--model", "Qwen-Image", "--use_stadi", "--stadi_degree", "2", "--use_cfg_parallel", "--height", "128",
      "--width", "128"], "--model Qwen-Image does not support --use_cfg_parallel"),
])
def test_runner_refusals_happen_in_the_launcher(argv, needle, capsys):
    _one_line_exit(lambda: build_launch_command(argv), capsys, needle)


def test_dbcache_needs_cache_dit_before_the_ranks_load_the_model(monkeypatch, capsys):
    """Plain xDiT's `--cache_method dbcache` imports cache-dit in every rank after the model load: without it,
    a traceback per rank. The launcher says it once."""
    from stadi_xdit import run

    argv = ["--model", "SD3.5", "--ulysses_degree", "2", "--height", "128", "--width", "128",
            "--cache_method", "dbcache"]
    monkeypatch.setattr(run, "_find_spec", lambda name: None if name == "cache_dit" else object())
    _one_line_exit(lambda: build_launch_command(argv), capsys,
                   "--cache_method dbcache runs through cache-dit, which is not installed (pip install cache-dit)")
    monkeypatch.setattr(run, "_find_spec", lambda name: object())
    assert "--nproc_per_node=2" in build_launch_command(argv)


# --- what the ranks would find missing on this machine (R20, R23, R33-R35, R46, R47, R49, R50) ------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_master_must_be_this_machine_with_one_node(capsys):
    argv = ["--master_addr", "10.255.255.1", "--master_port", str(_free_port()), "ex.py"]
    _one_line_exit(lambda: check_launch_environment(argv), capsys, "--master_addr 10.255.255.1 is not an address")


def test_master_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--master_addr", "127.0.0.1", "--master_port", str(port), "ex.py"]
        _one_line_exit(lambda: check_launch_environment(argv), capsys, f"--master_port {port} is already in use")


@pytest.fixture
def local(tmp_path, monkeypatch) -> list[str]:
    """A free local master, the current directory a fresh one."""
    monkeypatch.chdir(tmp_path)
    return ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]


@pytest.mark.parametrize("target,needle", [
    (["missing.py"], "no such script: missing.py"),
    (["adir"], "script adir is a directory"),
    (["-m", "no_such_module_xyz"], "-m no_such_module_xyz: no module named"),
    (["-m", "no_such_pkg_xyz.mod"], "-m no_such_pkg_xyz.mod: no module named"),
    (["-m", "apkg"], "-m apkg is a package without a __main__ module"),
])
def test_script_or_module_must_exist(target, needle, local, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "apkg").mkdir()
    (tmp_path / "apkg" / "__init__.py").write_text("")
    _one_line_exit(lambda: check_launch_environment([*local, *target, "--use_stadi"]), capsys, needle)


def test_existing_script_and_module_pass(local, tmp_path):
    (tmp_path / "ok.py").write_text("")
    (tmp_path / "okmod.py").write_text("")
    check_launch_environment([*local, "ok.py", "--use_stadi"])
    check_launch_environment([*local, "-m", "okmod"])


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding FLUX.1-dev's `model_index.json` only (all the launcher reads)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    snapshot = hub_snapshot_dir(home, HUB_MODELS["FLUX.1-dev"])
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def test_runner_environment_refusals(local, offline_hub, tmp_path, capsys):
    prompt = ["--prompt", "a cat"]
    (tmp_path / "afile").write_text("")
    cases = [
        (["--model", "Wan2.1-T2V", "--use_stadi", "--stadi_degree", "2", "--height", "64", "--width", "64"],
         "--model Wan2.1-T2V needs --prompt"),
        (["--model", "Qwen-Image", *prompt],
         f"--model Qwen-Image: Qwen/Qwen-Image is not in the Hugging Face cache {offline_hub / 'hub'}"),
        # Wan2.2-T2V names its repo in `_customize_settings`, not in its class settings
        (["--model", "Wan2.2-T2V", *prompt],
         f"--model Wan2.2-T2V: Wan-AI/Wan2.2-T2V-A14B-Diffusers is not in the Hugging Face cache {offline_hub / 'hub'}"),
        ([*FLUX, *prompt, "--output_directory", str(tmp_path / "afile" / "sub")],
         f"--output_directory: cannot create the folder {str(tmp_path / 'afile' / 'sub')!r}"),
    ]
    for argv, needle in cases:
        _one_line_exit(lambda argv=argv: check_launch_environment([*local, *argv]), capsys, needle)
    out = tmp_path / "new" / "out"
    check_launch_environment([*local, *FLUX, *prompt, "--output_directory", str(out)])  # resolves; dir made
    assert out.is_dir()


def test_video_model_needs_a_video_writer_before_the_run(local, offline_hub, tmp_path, monkeypatch, capsys):
    """The runner saves Wan's MP4 after the whole run; without imageio or OpenCV that save would fail."""
    from diffusers.utils import import_utils

    snapshot = hub_snapshot_dir(offline_hub, HUB_MODELS["Wan2.1-T2V"])
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(snapshot.name)
    argv = [*local, "--model", "Wan2.1-T2V", "--prompt", "a cat", "--output_directory", str(tmp_path / "out")]
    for writer in ("is_imageio_available", "is_opencv_available"):
        monkeypatch.setattr(import_utils, writer, lambda: False)
    _one_line_exit(lambda: check_launch_environment(argv), capsys,
                   "--model Wan2.1-T2V saves an MP4, which needs imageio (pip install imageio imageio-ffmpeg) or OpenCV")
    monkeypatch.setattr(import_utils, "is_imageio_available", lambda: True)
    check_launch_environment(argv)


# --- a failed rank: its status, no torchrun traceback (R37) -----------------------------------------

def _child_failed(exitcode: int):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    return ChildFailedError("stadi_xdit.run", {1: ProcessFailure(local_rank=1, pid=1, exitcode=exitcode,
                                                                  error_file="<N/A>")})


def test_failed_rank_status(capsys):
    assert failed_rank_status(_child_failed(2)) == 2 and capsys.readouterr().err == ""  # rank 0 already spoke
    for exitcode, status, needle in ((1, 1, "rank 1 exited with status 1"), (-9, 1, "rank 1 was killed by SIGKILL")):
        with pytest.raises(SystemExit) as info:
            failed_rank_status(_child_failed(exitcode))
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == status and len(lines) == 1 and needle in lines[0], lines


# --- xDiT's runner config dict (D04, D12, D17, D25, D26; A41, A42 through the same validate) ---------

@pytest.mark.parametrize("config,needle", [
    ({"use_stadi": True, "stadi_degree": 2, "STADI_speeds": "1,2"},
     "runner config key 'STADI_speeds' is not a STADI key; did you mean 'stadi_speeds'?"),
    ({"use_stadi ": True, "stadi_degree": 2},
     "runner config key 'use_stadi ' is not a STADI key; did you mean 'use_stadi'?"),
    ({"use_stadi": True, "stadi_degree": 2, "use_cfg_parallel": "no"},
     "runner config key 'use_cfg_parallel' must be True or False, got 'no'"),
    ({"use_stadi": "yes", "stadi_degree": 2}, "runner config key 'use_stadi' must be True or False, got 'yes'"),
    ({"use_stadi": True, "stadi_degree": 2, "vae_parallel_size": "1"},
     "--vae_parallel_size must be an integer >= 0, got '1'"),
    ({"use_stadi": True, "stadi_degree": 2, "vae_parallel_size": -1}, "--vae_parallel_size must be an integer >= 0"),
    ({"use_stadi": True, "vae_parallel_size": 2}, "--vae_parallel_size 2 leaves no rank for the DiT"),
    ({"use_stadi": True, "stadi_degree": 2, "use_ray": True}, "--use_ray cannot be combined with --use_stadi"),
    ({"use_stadi": True, "stadi_degree": 2, "height": "128"}, "--height must be a positive multiple of 16 px"),
])
def test_runner_config_dict_refusals(config, needle, monkeypatch):
    from xfuser.config import xFuserArgs

    from stadi_xdit.cli_errors import StadiInputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StadiInputError) as info:
        xFuserArgs.from_runner_args({"model": "FLUX.1-dev", "height": 128, "width": 128, "num_inference_steps": 3,
                                     "warmup_steps": 1, **config})
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    if "height" in needle:
        assert "got '128'" in str(info.value)


def test_plain_xdit_dict_keeps_its_own_values(monkeypatch):
    """Without STADI, xDiT's own keys are xDiT's business: the plugin refuses nothing there."""
    from xfuser.config import xFuserArgs

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = xFuserArgs.from_runner_args({"model": "FLUX.1-dev", "use_cfg_parallel": False, "vae_parallel_size": 0})
    assert not getattr(args, "use_stadi", False)


def test_runner_dict_shows_the_settings_that_run(tmp_path, monkeypatch):
    """xDiT's runner logs its config dict after building its args: STADI settings from a
    --stadi_config_file are written back into it (the log read `use_stadi: False` before)."""
    from xfuser.config import xFuserArgs

    settings = tmp_path / "stadi.yaml"
    settings.write_text("use_stadi: true\nmode: full\ndegree: 2\nemulate_slowdown: [1, 2]\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = {"model": "FLUX.1-dev", "height": 128, "width": 128, "num_inference_steps": 3, "warmup_steps": 1,
              "use_stadi": False, "stadi_mode": "full", "stadi_degree": None, "stadi_config_file": str(settings),
              "prompt": "a cat"}
    args = xFuserArgs.from_runner_args(config)
    assert args.stadi.use_stadi and args.stadi.degree == 2
    assert config["use_stadi"] is True and config["stadi_degree"] == 2
    assert config["stadi_mode"] == "full" and config["stadi_emulate_slowdown"] == (1.0, 2.0)


# --- issue 21: checked before launch what the loaded model or the ranks would refuse ----------------

@pytest.fixture(scope="module")
def real_hub(make_hub_cache) -> Path:
    """A writable offline hub cache with the tiny FLUX.1-dev and SD3.5 pipelines (real files)."""
    return make_hub_cache(["FLUX.1-dev", "SD3.5"], "hf_real")


@pytest.fixture
def use_hub(real_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(real_hub / "hub"))
    return real_hub


SD3 = ["--model", "SD3.5", "--use_stadi", "--stadi_degree", "2", "--width", "128", "--num_inference_steps", "3",
       "--warmup_steps", "1", "--prompt", "a cat"]


@pytest.mark.parametrize("argv,needle", [
    ([*FLUX, "--prompt", "a cat", "--negative_prompt", "dog"],
     "--model FLUX.1-dev does not use --negative_prompt"),
    ([*SD3, "--height", "128", "--negative_prompt", "dog"], "--model SD3.5 does not use --negative_prompt"),
    ([*SD3, "--height", "128", "--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan"),
    ([*FLUX, "--prompt"], "--prompt needs a value"),
    ([*FLUX, "--prompt", "caf\udcff"], "--prompt is not valid UTF-8 text (byte 0xff"),
    ([*SD3, "--height", "256"], "--height 256 is past --model SD3.5's position table (pos_embed_max_size 12"),
    # STADI over groups of Ulysses ranks (and plain xDiT Ulysses): each rank takes heads / U.
    ([*SD3, "--height", "192", "--ulysses_degree", "3"],
     "--ulysses_degree 3: --model SD3.5 has 2 attention heads, not a multiple of 3"),
    ([*SD3, "--height", "192", "--stadi_groups", "3,1"],
     "--stadi_groups 3,1: --model SD3.5 has 2 attention heads, not a multiple of the group size 3"),
])
def test_call_inputs_and_model_limits_are_checked_before_launch(argv, needle, local, use_hub, tmp_path, capsys):
    _one_line_exit(lambda: check_launch_environment([*local, *argv, "--output_directory", str(tmp_path)]),
                   capsys, needle)


def test_a_good_tiny_model_passes_the_file_checks(local, use_hub, tmp_path):
    check_launch_environment([*local, *SD3, "--height", "128", "--output_directory", str(tmp_path)])
    check_launch_environment([*local, *FLUX, "--prompt", "a cat", "--output_directory", str(tmp_path)])


@pytest.mark.parametrize("damage,needle", [
    (lambda snap: (snap / "transformer" / "diffusion_pytorch_model.safetensors").open("r+b").truncate(50000),
     "transformer/diffusion_pytorch_model.safetensors is truncated (50000 of"),
    (lambda snap: (snap / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "vae/has no weights file"),
    (lambda snap: __import__("shutil").rmtree(snap / "text_encoder"), "has no text_encoder/ folder"),
    (lambda snap: (snap / "model_index.json").write_text("{broken"), "model_index.json cannot be read"),
    (lambda snap: (snap / "transformer" / "config.json").write_text(
        (snap / "transformer" / "config.json").read_text().replace('"num_layers": 2', '"num_layers": -3')),
     "transformer/config.json: num_layers must be >= 0, got -3"),
])
def test_a_damaged_model_folder_is_named_before_launch(damage, needle, real_hub, local, tmp_path, monkeypatch, capsys):
    import shutil

    from huggingface_hub import constants

    home = tmp_path / "hf"
    shutil.copytree(real_hub, home)
    snapshot = hub_snapshot_dir(home, HUB_MODELS["SD3.5"])
    damage(snapshot)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    line = _one_line_exit(lambda: check_launch_environment(
        [*local, *SD3, "--height", "128", "--output_directory", str(tmp_path / "out")]), capsys, needle)
    assert str(snapshot) in line


def test_a_cache_miss_names_the_folder_and_how_to_fill_it(local, offline_hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi, constants

    argv = [*local, "--model", "SD3.5", "--prompt", "a cat", "--output_directory", str(tmp_path)]
    line = _one_line_exit(lambda: check_launch_environment(argv), capsys, f"{offline_hub / 'hub'}")
    assert "HF_HUB_OFFLINE is set" in line and "huggingface-cli download" in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*_, **__):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    line = _one_line_exit(lambda: check_launch_environment(argv), capsys, "the hub cannot be reached")
    assert f"{offline_hub / 'hub'}" in line and "Network is unreachable" in line


def test_no_room_for_the_images_is_said_before_the_run(local, use_hub, tmp_path, monkeypatch, capsys):
    import collections

    stat = collections.namedtuple("statvfs", "f_bavail f_frsize")
    monkeypatch.setattr(os, "statvfs", lambda _: stat(1, 4096))  # 4 KiB free
    _one_line_exit(lambda: check_launch_environment([*local, *FLUX, "--prompt", "a cat", "--output_directory",
                                                     str(tmp_path)]), capsys, "4.0 KiB free, the output needs about")


@pytest.mark.parametrize("argv,needle", [
    (["--model", "FLUX.1-dev", "--stadi_speeds", "1,2", "--stadi_mode", "spatial"],
     "--stadi_mode, --stadi_speeds need --use_stadi"),
    (["ex.py", "--model", "tiny", "--stadi_degree", "2"], "--stadi_degree needs --use_stadi"),
    (["--stadi_degree", "2", "ex.py", "--model", "tiny"], "--stadi_degree needs --use_stadi"),
])
def test_stadi_flags_without_use_stadi_are_refused(argv, needle, capsys):
    _one_line_exit(lambda: build_launch_command(argv), capsys, needle)


def test_launcher_flags_before_the_script_as_the_docs_show():
    command = build_launch_command(["--master_port", "29999", "--stadi_degree", "2", "ex.py", "--use_stadi"])
    assert "--nproc_per_node=2" in command
    assert command[-4:] == ["ex.py", "--stadi_degree", "2", "--use_stadi"]  # the script's own args, script first
    after = build_launch_command(["ex.py", "--use_stadi", "--stadi_degree", "2", "--master_port", "29999"])
    assert "--nproc_per_node=2" in after and "--master_port=29999" in after


def test_the_launcher_speaks_whatever_rank_its_environment_claims(tmp_path):
    """A Kubernetes PyTorchJob pod exports RANK=1 WORLD_SIZE=4; the launcher is no rank."""
    import subprocess
    import sys

    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from stadi_xdit.run import launch; launch()", *FLUX,
                           "--stadi_mode", "fast"], env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--stadi_mode" in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("argv,needle", [
    (["ex.py", "--use_stadi", "--stadi_degree", "2", "--stadi_timeout", "abc"], "--stadi_timeout must be a number"),
    (["ex.py", "--use_stadi", "--stadi_degree", "2", "--stadi_timeout", "1"], "seconds in [5"),
    (["--nproc_per_node", "2", "ex.py", "--use_stadi", "--stadi_config_file", "{tmp}/bad.json"], "not valid JSON"),
])
def test_the_launchers_own_timeout_is_checked_in_script_mode(argv, needle, tmp_path, capsys):
    from stadi_xdit.run import launch_timeout

    (tmp_path / "bad.json").write_text("{")
    _one_line_exit(lambda: launch_timeout([a.replace("{tmp}", str(tmp_path)) for a in argv]), capsys, needle)


def test_malformed_fault_injection_is_refused(monkeypatch, capsys):
    from stadi_xdit.run import check_fault_injection

    monkeypatch.setenv("STADI_FAULT", "decode:x")
    _one_line_exit(check_fault_injection, capsys, "STADI_FAULT entries are PHASE:RANK")


def test_stadi_groups_from_a_settings_file_count_the_launch(tmp_path, capsys):
    settings = tmp_path / "stadi.yaml"
    settings.write_text("use_stadi: true\ngroups: [2, 1]\n")
    script = ["ex.py", "--model", "tiny", "--stadi_config_file", str(settings)]
    assert "--nproc_per_node=3" in build_launch_command(script)
    assert "--nproc_per_node=1" in build_launch_command(["--nnodes", "2", "--node_rank", "1", *script])
    settings.write_text("use_stadi: true\ngroups: [2, 0]\n")
    _one_line_exit(lambda: build_launch_command(script), capsys, "--stadi_groups must be comma-separated integers")
