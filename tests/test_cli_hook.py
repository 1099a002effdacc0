"""xDiT's own entry points with STADI: flags, args class, pipeline choice, launcher, upstream patch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import stadi_xdit.xdit  # noqa: F401  (CPU compat and the CLI hook, before xfuser)
from stadi_xdit.config import StadiConfig
from stadi_xdit.offline.spawn import free_port
from stadi_xdit.xdit import cli_hook

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = Path(__file__).with_name("xdit_style_example.py")
PATCH = REPO / "patches" / "xfuser-0.7.0-stadi-cli-hook.patch"


def _parser():
    from xfuser.config import FlexibleArgumentParser

    return FlexibleArgumentParser(description="xFuser Arguments")


def _parse(argv):
    from xfuser import xFuserArgs

    return xFuserArgs.add_cli_args(_parser()).parse_args(argv)


@pytest.fixture
def hook_restored():
    yield
    cli_hook.install()


def test_xfuser_parser_gets_the_stadi_flags_once():
    from xfuser import xFuserArgs

    from stadi_xdit.xdit.args import StadiArgs, add_stadi_cli_args

    args = _parse(["--model", "m", "--use_stadi", "--stadi-mode", "spatial", "--stadi_speeds", "1,0.5"])
    assert args.use_stadi and args.stadi_mode == "spatial" and args.stadi_speeds == "1,0.5"
    # The plugin's own entry points stay usable on top of the hooked parser (no argparse conflict).
    parser = xFuserArgs.add_cli_args(_parser())
    add_stadi_cli_args(parser)
    StadiArgs.add_cli_args(_parser())
    assert not _parse(["--model", "m"]).use_stadi


def test_from_cli_args_returns_stadi_args_only_with_the_flag():
    from xfuser import xFuserArgs

    from stadi_xdit.xdit.args import StadiArgs

    stadi = xFuserArgs.from_cli_args(_parse(["--model", "m", "--use_stadi", "--stadi_exact"]))
    assert type(stadi) is StadiArgs and stadi.stadi.exact
    plain = xFuserArgs.from_cli_args(_parse(["--model", "m"]))
    assert type(plain) is xFuserArgs
    assert type(StadiArgs.from_cli_args(_parse(["--model", "m", "--use_stadi"]))) is StadiArgs


def test_a_scripts_cache_method_under_stadi_is_one_line_not_dropped(capsys):
    """xDiT's scripts build their pipelines themselves: no step cache reaches a STADI twin there."""
    from xfuser import xFuserArgs

    with pytest.raises(SystemExit) as info:
        xFuserArgs.from_cli_args(_parse(["--model", "m", "--use_stadi", "--cache_method", "teacache"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and "runs through xDiT's model runner" in lines[0], lines
    assert xFuserArgs.from_cli_args(_parse(["--model", "m", "--cache_method", "teacache"])).cache_method == "teacache"


def test_uninstall_restores_xdit(hook_restored):
    import xfuser.cli
    from xfuser import xFuserArgs
    from xfuser.model_executor.pipelines.base_pipeline import xFuserPipelineBaseWrapper

    assert "__new__" in xFuserPipelineBaseWrapper.__dict__
    cli_hook.uninstall()
    assert not cli_hook.is_installed()
    assert "__new__" not in xFuserPipelineBaseWrapper.__dict__
    assert "--use_stadi" not in xFuserArgs.add_cli_args(_parser())._option_string_actions
    assert xfuser.cli.get_nproc_from_args(["--use_stadi", "--stadi_speeds", "1,2,3"]) == 1  # xDiT's rule
    cli_hook.install()
    assert "--use_stadi" in xFuserArgs.add_cli_args(_parser())._option_string_actions
    assert xfuser.cli.get_nproc_from_args(["--use_stadi", "--stadi_speeds", "1,2,3"]) == 3


def _stadi_engine_config(use_stadi=True):
    return types.SimpleNamespace(stadi_config=StadiConfig(use_stadi=use_stadi))


def test_pipeline_construction_picks_the_stadi_twin():
    # __new__ alone decides the class; no process group is needed for that.
    from xfuser.model_executor.pipelines import (
        xFuserFluxPipeline,
        xFuserHunyuanDiTPipeline,
        xFuserPixArtAlphaPipeline,
        xFuserPixArtSigmaPipeline,
        xFuserStableDiffusion3Pipeline,
    )

    from stadi_xdit.models.flux import StadiFluxPipeline
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline, StadiPixArtSigmaPipeline
    from stadi_xdit.models.sd3 import StadiStableDiffusion3Pipeline

    for xdit_cls, stadi_cls in ((xFuserPixArtAlphaPipeline, StadiPixArtAlphaPipeline),
                                (xFuserPixArtSigmaPipeline, StadiPixArtSigmaPipeline),
                                (xFuserFluxPipeline, StadiFluxPipeline),
                                (xFuserStableDiffusion3Pipeline, StadiStableDiffusion3Pipeline)):
        assert type(xdit_cls.__new__(xdit_cls, None, _stadi_engine_config())) is stadi_cls
        assert type(xdit_cls.__new__(xdit_cls, None, engine_config=_stadi_engine_config())) is stadi_cls
        assert type(xdit_cls.__new__(xdit_cls, None, _stadi_engine_config(False))) is xdit_cls
        assert type(xdit_cls.__new__(xdit_cls, None, object())) is xdit_cls  # a plain EngineConfig
        assert type(stadi_cls.__new__(stadi_cls, None, object())) is stadi_cls
    # One line naming the class and the families STADI serves.
    with pytest.raises(ValueError, match="--use_stadi does not support xFuserHunyuanDiTPipeline; STADI runs "
                                         ".*xFuserQwenImagePipeline.*xFuserStableDiffusion3Pipeline"):
        xFuserHunyuanDiTPipeline(None, _stadi_engine_config())


@pytest.mark.parametrize("argv,nproc", [
    (["--use_stadi", "--stadi_speeds", "1,0.5"], 2),
    (["--use_stadi", "--stadi_speeds=1,0.5,2", "--use_cfg_parallel"], 6),
    (["--use-stadi", "--stadi-emulate-slowdown", "1,3"], 2),
    (["--use_stadi", "--stadi_degree", "4"], 4),
    (["--use_stadi", "--stadi_degree=2", "--use_cfg_parallel", "--model", "m"], 4),
    # STADI groups of Ulysses ranks: members x CFG x Ulysses (the family is checked with the other inputs).
    (["--use_stadi", "--stadi_degree", "2", "--ulysses_degree", "2"], 4),
    (["--use_stadi", "--stadi_speeds", "1,0.5,2", "--ulysses_degree=2", "--use_cfg_parallel"], 12),
    (["--ulysses_degree", "2", "--ring_degree", "2"], 4),  # no --use_stadi: xDiT's own rule
    (["--data_parallel_degree", "2", "--use_cfg_parallel"], 4),
])
def test_launcher_counts_stadi_ranks(argv, nproc):
    import xfuser.cli

    assert xfuser.cli.get_nproc_from_args(argv) == nproc


@pytest.mark.parametrize("argv,message", [
    (["--use_stadi"], "cannot infer the number of ranks"),
    (["--use_stadi", "--stadi_speeds", "1,2", "--stadi_degree", "3"], "disagree"),
    (["--use_stadi", "--stadi_degree", "2", "--ring_degree", "2"], "--ring_degree 2 cannot be combined"),
    (["--use_stadi", "--stadi_degree", "2", "--ulysses_degree", "0"], "--ulysses_degree must be an integer >= 1"),
])
def test_launcher_rule_errors(argv, message):
    import xfuser.cli

    with pytest.raises(ValueError, match=message):
        xfuser.cli.get_nproc_from_args(argv)


def test_launch_command(capsys):
    from stadi_xdit.run import build_launch_command

    script_args = ["--model", "m", "--use_stadi", "--stadi_degree", "3", "--use_cfg_parallel"]
    command = build_launch_command(["--master_port", "29999", "ex.py", *script_args])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=6"]
    assert "--master_port=29999" in command
    assert command[-9:] == ["-m", "stadi_xdit.run", "ex.py", *script_args]  # the script validates the degree too
    explicit = build_launch_command(["--nproc_per_node", "2", "ex.py", "--use_stadi"])
    assert "--nproc_per_node=2" in explicit
    for argv, message in ((["--nproc_per_node", "3", "ex.py", "--use_stadi", "--stadi_speeds", "1,2"], "disagrees"),
                          (["ex.py", "--use_stadi"], "cannot infer")):
        with pytest.raises(SystemExit) as info:
            build_launch_command(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    plain = build_launch_command(["-m", "pkg.mod", "--ulysses_degree", "2"])
    assert "--nproc_per_node=2" in plain and plain[-4:] == ["-m", "pkg.mod", "--ulysses_degree", "2"]


def test_run_module_form():
    out = subprocess.run([sys.executable, "-m", "stadi_xdit.run", "-m", "json.tool", "--compact"],
                         input='{"a": [1, 2]}', capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    assert out.stdout.strip() == '{"a":[1,2]}'


def test_a_script_ends_as_on_a_normal_exit_without_the_teardown(tmp_path):
    """`stadi_xdit.run` skips the interpreter's teardown after the script (exit_without_teardown), but
    nothing a normal exit delivers is lost: a non-daemon thread's late file, an exit handler, buffered
    output on a pipe; and an idle thread pool left open (as inductor leaves its compile pool) ends as
    at a normal exit instead of being waited on forever."""
    script = tmp_path / "script.py"
    script.write_text(
        "import atexit, concurrent.futures, pathlib, sys, threading, time\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "concurrent.futures.ThreadPoolExecutor(2).submit(time.sleep, 0.1).result()  # left open, idle\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), (out / 'thread').write_text('late'))).start()\n"
        "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
        "sys.stdout.write('no newline, still buffered')\n")
    out = subprocess.run([sys.executable, "-m", "stadi_xdit.run", str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert out.returncode == 0 and out.stdout == "no newline, still buffered", out.stderr[-2000:]
    assert (tmp_path / "thread").read_text() == "late" and (tmp_path / "atexit").read_text() == "ran"


# --- an unmodified xDiT-style script under torchrun ---------------------------------------------

def _start_torchrun_example(model_dir: Path, out_dir: Path, *flags: str) -> subprocess.Popen:
    out_dir.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "stadi_xdit.run", str(EXAMPLE),
               "--model", str(model_dir), "--height", "128", "--width", "128", "--num_inference_steps", "4",
               "--warmup_steps", "2", "--prompt", "a red cat", "--output_type", "latent",
               "--no_use_resolution_binning", "--seed", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDIT_EXAMPLE_OUT": str(out_dir)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def _example_results(proc: subprocess.Popen, out_dir: Path) -> list[dict]:
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-6000:]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _torchrun_example(model_dir: Path, out_dir: Path, *flags: str) -> list[dict]:
    return _example_results(_start_torchrun_example(model_dir, out_dir, *flags), out_dir)


def test_xdit_style_script_picks_stadi_up_only_with_the_flag(tmp_path):
    from stadi_xdit.families.pixart import tiny_pixart_pipeline

    model_dir = tmp_path / "tiny-pixart"
    tiny_pixart_pipeline().save_pretrained(model_dir)  # from_pretrained works offline from a folder

    # Both launches at once: most of each is its processes' start-up, on one core apiece.
    launches = {"stadi": _start_torchrun_example(model_dir, tmp_path / "stadi", "--use_stadi", "--stadi_exact",
                                                 "--stadi_mode", "spatial", "--stadi_speeds", "3,5"),
                "plain": _start_torchrun_example(model_dir, tmp_path / "plain", "--data_parallel_degree", "2")}
    try:
        stadi, plain = (_example_results(launches[name], tmp_path / name) for name in ("stadi", "plain"))
    finally:
        for proc in launches.values():
            if proc.poll() is None:
                proc.kill()
    for rank in range(2):
        assert stadi[rank]["pipeline"] == "StadiPixArtAlphaPipeline"
        assert stadi[rank]["engine_config"] == "StadiEngineConfig" and stadi[rank]["args"] == "StadiArgs"
        assert stadi[rank]["num_evals"] == 4
        assert '"row_start": 3' in stadi[rank]["plan"]  # bands 3/5 of 8 token rows
        assert plain[rank]["pipeline"] == "xFuserPixArtAlphaPipeline"
        assert plain[rank]["engine_config"] == "EngineConfig" and plain[rank]["args"] == "xFuserArgs"
        # Exact STADI on 2 ranks equals xDiT's own (replicated) run of the same script.
        reference = plain[rank]["latents"]
        error = ((stadi[rank]["latents"] - reference).norm() / reference.norm()).item()
        assert error <= 1e-4, (rank, error)


def test_xdit_example_saves_a_stadi_batch_under_its_batch_indices(tmp_path):
    """xDiT's example numbers images `dp rank * per-group batch + i` on its output rank: STADI's output rank
    is STADI rank 0, so two prompts are `..._0.png` and `..._1.png` (from rank 1 they read `_1`, `_2`)."""
    from stadi_xdit.families.pixart import tiny_pixart_pipeline

    model_dir = tmp_path / "tiny-pixart"
    tiny_pixart_pipeline().save_pretrained(model_dir)
    _torchrun_example(model_dir, tmp_path / "out", "--use_stadi", "--stadi_exact", "--stadi_speeds", "3,5",
                      "--output_type", "pil", "--prompt", "a red cat", "a blue dog")
    info = "dp1_cfg1_ulysses1_ring1_pp1_patchNone_tc_False"  # xDiT prints the unset patch count as None
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == [
        f"pixart_alpha_result_{info}_{index}.png" for index in (0, 1)]


# --- the upstream form of the hook --------------------------------------------------------------

def test_upstream_patch_applies_and_drives_stadi_through_the_plugin(tmp_path, patched_xfuser):
    site = patched_xfuser(tmp_path / "site", [PATCH])
    dist_info = site / "stadi_plugin_probe-0.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: stadi-plugin-probe\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[xfuser.plugins]\nstadi = stadi_xdit.xdit.cli_hook:XfuserPlugin\n")
    probe = textwrap.dedent("""
        import sys, types
        import stadi_xdit.xdit
        import xfuser, xfuser.cli
        from xfuser import xFuserArgs
        from xfuser.config import FlexibleArgumentParser
        from xfuser.model_executor.pipelines import xFuserFluxPipeline
        from stadi_xdit.config import StadiConfig
        from stadi_xdit.xdit import cli_hook
        from stadi_xdit.xdit.args import StadiArgs
        assert xfuser.__file__.startswith(sys.argv[1]), xfuser.__file__
        marked = getattr(xFuserArgs.__dict__["add_cli_args"].__func__, "__stadi_cli_hook__", False)
        assert not marked, "monkeypatch must stand down when xfuser has the plugin hook"
        args = xFuserArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "m", "--use_stadi"])
        StadiArgs.add_cli_args(FlexibleArgumentParser())
        assert type(xFuserArgs.from_cli_args(args)) is StadiArgs
        config = types.SimpleNamespace(stadi_config=StadiConfig(use_stadi=True))
        assert type(xFuserFluxPipeline.__new__(xFuserFluxPipeline, None, config)).__name__ == "StadiFluxPipeline"
        assert xfuser.plugins.nproc(["--use_stadi", "--stadi_degree", "3", "--use_cfg_parallel"]) == 6
        assert xfuser.plugins.nproc(["--ulysses_degree", "2"]) is None
        runner_parser = xFuserArgs.add_runner_args(FlexibleArgumentParser())
        assert "--use_stadi" in runner_parser._option_string_actions
        runner_args = xFuserArgs.from_runner_args({"model": "FLUX.1-dev", "use_stadi": True, "height": 112,
                                                   "width": 80, "num_inference_steps": 4, "warmup_steps": 1,
                                                   "prompt": "a cat"})
        assert type(runner_args) is StadiArgs
        from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY
        flux = MODEL_REGISTRY["FLUX.1-dev"]
        assert type(flux.__new__(flux, runner_args)).__name__ == "StadixFuserFluxModel"
        print("hook installed:", cli_hook.is_installed())
    """)
    for no_monkeypatch in ("1", "0"):
        env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
               "STADI_XDIT_NO_CLI_HOOK": no_monkeypatch}
        result = subprocess.run([sys.executable, "-c", probe, str(site)], check=False, capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert f"hook installed: {no_monkeypatch == '0'}" in result.stdout
