"""The example script: one line naming the flag for every bad input, printed once; the README's presets run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from stadi_xdit.offline.modules import load_module_from_path
from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.testing.checks import relative_error

EXAMPLE = Path(__file__).resolve().parent.parent / "scripts" / "stadi_example.py"


def _example(capsys=None):
    """The script as a module; `capsys` drops what its imports print (library notices), not ours."""
    module = load_module_from_path("stadi_example", EXAMPLE)
    if capsys is not None:
        capsys.readouterr()
    return module


BAD_FLAGS = [
    (["--ulysses_degree", "3"], "--ulysses_degree"),  # the 2 ranks do not make groups of 3
    (["--pipefusion_parallel_degree", "2"], "--pipefusion_parallel_degree"),
    (["--stadi_speeds", "1,0.5,2"], "--stadi_speeds"),
    (["--stadi_speeds", "1,-1"], "--stadi_speeds"),
    (["--stadi_speeds", ","], "--stadi_speeds"),
    (["--stadi_emulate_slowdown", "1,x"], "--stadi_emulate_slowdown"),
    (["--stadi_mode", "fast"], "--stadi_mode"),
    (["--stadi_max_stride", "0"], "--stadi_max_stride"),
    (["--stadi_max_stride", "100"], "--stadi_max_stride"),
    (["--stadi_tolerance", "nan"], "--stadi_tolerance"),
    (["--stadi_timeout", "nan"], "--stadi_timeout"),
    (["--stadi_timeout", "inf"], "--stadi_timeout"),
    (["--stadi_timeout", "1e300"], "--stadi_timeout"),
    (["--stadi_timeout", "0"], "--stadi_timeout"),
    (["--height", "250"], "--height"),
    (["--height", "16"], "--height"),  # one token row for two ranks
    (["--height", "-16"], "--height"),
    (["--height", "0"], "--height"),
    (["--width", "0"], "--width"),
    (["--num_inference_steps", "0"], "--num_inference_steps"),
    (["--num_inference_steps", "8", "--warmup_steps", "8"], "--warmup_steps"),
    (["--warmup_steps", "-1"], "--warmup_steps"),
    (["--warmup_steps", "0"], "--warmup_steps"),
    (["--pipeline", "flux", "--use_cfg_parallel"], "--use_cfg_parallel"),
    (["--use_teacache"], "--use_teacache"),
    (["--pipeline", "flux", "--cache_method", "teacache"], "runs through xDiT's model runner"),  # not dropped
    (["--use_onediff"], "--use_onediff"),
    (["--stadi_profile_cache", "{tmp}"], "--stadi_profile_cache"),  # a directory
    (["--model", "no-such-model"], "--model"),
    (["--pipeline", "dalle"], "--pipeline"),
    (["--pipeline", "qwen-image", "--use_cfg_parallel"], "--use_cfg_parallel"),
    (["--pipeline", "sd3", "--model", "pixart-alpha-1024"], "--model"),
    (["--save_latents", "{tmp}"], "--save_latents"),
    (["--model", "toy-trained"], "--height"),  # trained at 256 px only
    (["--model", "toy-trained", "--height", "256", "--width", "256", "--prompt", "a cat"], "--prompt"),
    # The call's own inputs, which xDiT's parser takes as they come; before, errors after the process group.
    (["--seed", str(10**30)], "--seed"),
    (["--guidance_scale", "nan"], "--guidance_scale"),
    (["--output_type", "nonsense"], "--output_type"),
    (["--num_inference_steps", str(10**8)], "--num_inference_steps"),
    (["--save_latents", "/dev/null/x.pt"], "--save_latents"),  # its folder cannot exist
    (["--model", "{tmp}"], "--model"),  # a folder without model_index.json
    (["--model", "{flux}"], "--model"),  # a Flux folder for --pipeline pixart-alpha
    # A PixArt folder whose listed transformer is missing, or whose weights are truncated: one line before the
    # process group, as the runner's launcher says it (issue 36: it was a traceback per rank).
    (["--model", "{missing}"], "has no transformer/ folder"),
    (["--model", "{truncated}"], "transformer/diffusion_pytorch_model.safetensors"),
    (["--stadi_config_file", ""], "--stadi_config_file"),  # was silently "no file"
    (["--stadi_emulate_shift", "9999:1,2"], "--stadi_emulate_shift"),  # past the last step: would never apply
    (["--use_ray"], "--use_ray cannot be combined with --use_stadi"),  # was silently run without Ray
    (["--ray_world_size", "2"], "--ray_world_size 2 cannot be combined with --use_stadi"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS)
def test_bad_input_is_one_line_naming_the_flag(flags, named, tmp_path, monkeypatch, capsys):
    example = _example(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    folders = {"{flux}": flux}
    for name in ("missing", "truncated"):
        folder = folders["{" + name + "}"] = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(
            '{"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}')
    (tmp_path / "truncated" / "transformer").mkdir()
    (tmp_path / "truncated" / "transformer" / "config.json").write_text("{}")
    (tmp_path / "truncated" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x40\x00")
    argv = ["--model", "tiny", "--use_stadi", "--height", "128", "--width", "128", *flags]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv = [str(folders.get(a, a)) for a in argv]
    monkeypatch.setattr(sys, "argv", ["stadi_example.py", *argv])
    with pytest.raises(SystemExit) as info:
        example.parse_args()
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], lines
    assert not torch.distributed.is_initialized()


def test_only_rank_0_prints_the_error(monkeypatch, capsys):
    example = _example(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "argv", ["stadi_example.py", "--model", "tiny", "--use_stadi", "--stadi_mode", "x"])
    with pytest.raises(SystemExit) as info:
        example.parse_args()
    assert info.value.code == 2 and capsys.readouterr().err == ""


def _run_example(rank: int, world: int, argv: list[str]) -> None:
    example = _example()
    sys.argv = ["stadi_example.py", *argv]
    example.main()


@pytest.mark.parametrize("pipeline", ["pixart-alpha", "pixart-sigma"])
def test_readme_small_preset_runs(pipeline, tmp_path):
    """The README's `--model small` (stand-in text embeddings, negative embeddings too) runs."""
    argv = ["--pipeline", pipeline, "--model", "small", "--use_stadi", "--height", "128", "--width", "128",
            "--num_inference_steps", "3", "--warmup_steps", "1", "--output_type", "latent",
            "--stadi_speeds", "1,0.5", "--save_latents", str(tmp_path / "latents.pt")]
    run_distributed(_run_example, 2, argv, timeout=300)
    latents = torch.load(tmp_path / "latents.pt")  # the output rank's final latent: 128 px -> 16 x 16
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


@pytest.mark.parametrize("pipeline", ["pixart-alpha", "qwen-image"])
def test_exactness_checked_from_outside_with_two_commands(pipeline, tmp_path):
    """xDiT's own pipeline on 1 process vs STADI exact on 2 ranks with uneven bands: same latent."""
    common = ["--pipeline", pipeline, "--model", "tiny", "--height", "112", "--width", "80",
              "--num_inference_steps", "3", "--warmup_steps", "1"]
    run_distributed(_run_example, 1, [*common, "--save_latents", str(tmp_path / "xdit.pt")], timeout=300)
    run_distributed(_run_example, 2, [*common, "--use_stadi", "--stadi_exact", "--stadi_speeds", "3,5",
                                      "--save_latents", str(tmp_path / "stadi.pt")], timeout=300)
    reference, stadi = (torch.load(tmp_path / name) for name in ("xdit.pt", "stadi.pt"))
    assert reference.shape == stadi.shape
    assert relative_error(stadi, reference) <= 1e-4


def _run_example_in(rank: int, world: int, folder: str, argv: list[str]) -> None:
    import os

    os.chdir(folder)  # the script saves into ./results, as xDiT's examples do
    _run_example(rank, world, argv)


def test_saved_image_is_named_by_its_strategy_and_compile(tmp_path):
    """With --use_torch_compile the example compiles in an untimed warmup call first, and the name says `_tc`."""
    argv = ["--pipeline", "pixart-alpha", "--model", "tiny", "--height", "112", "--width", "80",
            "--num_inference_steps", "3", "--warmup_steps", "1", "--use_stadi", "--stadi_exact", "--stadi_speeds", "3,5",
            "--use_torch_compile"]
    run_distributed(_run_example_in, 2, str(tmp_path), argv, timeout=300)
    assert [path.name for path in (tmp_path / "results").iterdir()] == [
        "StadiPixArtAlphaPipeline_stadi-full-exact_tc_n2.png"]
