"""The ``stadi-plan`` CLI, run in-process through ``main``."""

from __future__ import annotations

import pytest

from stadi_xdit.planner import Plan, plan
from stadi_xdit.planner.cli import main
from stadi_xdit.planner.gpus import DENSE_TENSOR_TFLOPS, parse_gpu_list, relative_speeds

EXAMPLE = ["--speeds", "1,0.5", "--height", "1024", "--patch-size", "2", "--vae-scale", "8"]
EXAMPLE += ["--steps", "20", "--warmup", "2", "--mode", "full"]


def run_cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_prints_the_plan_table_and_speedup(capsys):
    out = run_cli(capsys, *EXAMPLE)
    # 1024 px / 8 (VAE) / 2 (patch) = 64 rows; speeds (1, 0.5) -> strides (1, 2), equal bands
    assert "64 latent rows" in out
    assert "[0, 32)" in out and "[32, 64)" in out
    assert "period L = 2" in out
    assert "speedup 1.818x" in out


def test_json_output_round_trips_to_the_same_plan(capsys):
    out = run_cli(capsys, *EXAMPLE, "--json", "--width", "768")
    expected = plan((1, 0.5), rows=64, align=1, num_steps=20, warmup_steps=2, mode="full")
    assert Plan.from_json(out) == expected


def test_gpu_names_become_relative_speeds(capsys):
    out = run_cli(capsys, "--gpus", "A100x2,RTX3090x2", "--height", "1024", "--json")
    result = Plan.from_json(out)
    assert result.speeds == (1.0, 1.0, 71 / 312, 71 / 312)
    # s* = 312/71 = 4.4 is capped at 2
    assert [rank.stride for rank in result.ranks] == [1, 1, 2, 2]


def test_gpu_list_parsing():
    assert parse_gpu_list("A100x2, rtx-3090, RTX3090x2") == ("A100", "A100", "RTX3090", "RTX3090", "RTX3090")
    assert parse_gpu_list("l40s") == ("L40S",)
    assert relative_speeds(("H100", "A100")) == (1.0, 312 / 989)
    assert all(value > 0 for value in DENSE_TENSOR_TFLOPS.values())


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--gpus", "A100,GTX480", "--height", "1024"], "--gpus"),
        (["--speeds", "1,abc", "--height", "1024"], "--speeds"),
        (["--speeds", "1,nan", "--height", "1024"], "--speeds"),
        (["--speeds", "1,0.5", "--height", "1000"], "--height"),
        (["--speeds", "1,0.5", "--height", "1024", "--align", "3"], "--height"),
        (["--speeds", "1,0.5", "--height", "1024", "--warmup", "20"], "--warmup"),
        (["--speeds", "1,0.5", "--height", "1024", "--max-stride", "0"], "--max-stride"),
        (["--speeds", "1,0.5", "--height", "1024", "--mode", "fast"], "--mode"),
        (["--speeds", "1,0.5", "--height", "1024", "--sync-seconds", "-1"], "--sync-seconds"),
        (["--height", "1024"], "--speeds"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert error_line.startswith("stadi-plan: error:")
    assert flag in error_line


def test_unknown_gpu_error_lists_the_known_names(capsys):
    with pytest.raises(SystemExit):
        main(["--gpus", "GTX480", "--height", "1024"])
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GTX480" in error_line and "A100" in error_line and "RTX3090" in error_line
