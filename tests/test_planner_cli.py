"""The ``stadi-plan`` CLI, run in-process through ``main``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stadi_xdit.planner import Plan, plan, predict_latency
from stadi_xdit.planner.cli import main, parse_numbers
from stadi_xdit.planner.gpus import DENSE_TENSOR_TFLOPS, parse_gpu_list, relative_speeds
from stadi_xdit.planner.validation import MAX_RANKS, MAX_ROWS, MAX_STEPS

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
    assert parse_gpu_list("a100 x 3,T4X1") == ("A100",) * 3 + ("T4",)
    assert len(parse_gpu_list(f"A100x{MAX_RANKS}")) == MAX_RANKS
    for bad in ("A100x-1", "A100x0", "A100x+2", f"A100x{MAX_RANKS + 1}", "A100x200,T4x100", "RTXx2", ""):
        with pytest.raises(ValueError, match=r"^gpus: "):
            parse_gpu_list(bad)
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
def test_bad_flags_exit_2_naming_the_flag(one_error_line, argv, flag):
    assert flag in one_error_line(main, argv, "stadi-plan: error: ")


GEO_SPEEDS = ",".join(f"{20 ** (-i / (MAX_RANKS - 1)):.6g}" for i in range(MAX_RANKS))  # 1 .. 1/20
ONE = ["--speeds", "1", "--height", "1024"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        # used to hang (> 120 s): 10^8 GPU names / water-filling 10^8 rows
        (["--gpus", "A100x100000000", "--height", "1024"], "--gpus: at most 256 ranks are supported"),
        (["--gpus", "A100x200,T4x100", "--height", "1024"], "at most 256 ranks are supported"),
        (["--gpus", "A100x" + "9" * 5000, "--height", "1024"], "at most 256 ranks are supported"),
        (["--speeds", "1", "--height", "1600000000"], "--height: rows must be <= 4096 (at most 4096 token"),
        (["--speeds", ",".join(["1"] * 257), "--height", "65536"], "--speeds: speeds must have <= 256"),
        # used to plan silently for one A100
        (["--gpus", "A100x-1", "--height", "1024"], "--gpus: the count in 'A100x-1' must be an integer >= 1"),
        (["--gpus", "A100x0", "--height", "1024"], "--gpus: the count in 'A100x0'"),
        ([*ONE, "--steps", str(10**12)], "--steps: num_steps must be <= 1000 (at most 1000 denoising steps"),
        ([*ONE, "--steps", "0"], "--steps: num_steps must be an integer >= 1"),
        ([*ONE, "--warmup=-1"], "--warmup: warmup_steps must be an integer >= 0"),
        ([*ONE, "--warmup", str(10**12)], "--warmup: warmup_steps must be < num_steps=20"),
        ([*ONE, "--tolerance", "nan"], "--tolerance: tolerance must be a finite number >= 0, got nan"),
        ([*ONE, "--tolerance", "inf"], "--tolerance: "),
        ([*ONE, "--tolerance=-0.5"], "--tolerance: "),
        ([*ONE, "--sync-seconds", "nan"], "--sync-seconds: "),
        ([*ONE, "--exchange-seconds", "inf"], "--exchange-seconds: "),
        ([*ONE, "--step-overhead-seconds=-1"], "--step-overhead-seconds: "),
        (["--speeds", "1,inf", "--height", "1024"], "--speeds: expected comma-separated finite numbers"),
        ([*ONE, "--max-stride", "17"], "--max-stride: max_stride must be an integer in [1, 16]"),
        ([*ONE, "--width", "0"], "--width: must be >= 1"),
        (["--speeds", "1", "--height=--"], "--height: expected one argument"),
        ([*ONE, "--steps"], "--steps: expected one argument"),
        ([*ONE, "--gpus", "T4"], "not allowed with argument"),
        ([*ONE, "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_fails_fast_with_one_line_that_states_the_limit(one_error_line, argv, says):
    assert says in one_error_line(main, argv, "stadi-plan: error: ")


def test_planning_at_every_limit_at_once_succeeds(capsys):
    # The worst case: all 240 candidate periods of max-stride 16 give distinct stride vectors (speeds
    # spread 20:1); ~0.6 s here, which is what the limits were chosen for (docs, not asserted).
    argv = ["--speeds", GEO_SPEEDS, "--height", str(MAX_ROWS * 16), "--steps", str(MAX_STEPS)]
    argv += ["--max-stride", "16"]
    assert main([*argv, "--json"]) == 0
    result = Plan.from_json(capsys.readouterr().out)
    assert len(result.ranks) == MAX_RANKS and result.rows == MAX_ROWS and result.num_steps == MAX_STEPS
    assert main(["--gpus", f"A100x{MAX_RANKS // 2},T4x{MAX_RANKS // 2}", "--height", "65536"]) == 0


def test_plan_shares_the_size_limits_with_one_line_errors():
    good = {"rows": 64, "align": 1, "num_steps": 20, "warmup_steps": 2}
    with pytest.raises(ValueError, match=r"^rows must be <= 4096 \(at most 4096 token rows .*, got 4097$"):
        plan((1.0, 0.5), **{**good, "rows": MAX_ROWS + 1})
    with pytest.raises(ValueError, match=r"^num_steps must be <= 1000 \(at most 1000 denoising steps"):
        plan((1.0, 0.5), **{**good, "num_steps": MAX_STEPS + 1})
    with pytest.raises(ValueError, match=r"^speeds must have <= 256 entries \(at most 256 ranks"):
        plan((1.0,) * (MAX_RANKS + 1), **{**good, "rows": 512})
    with pytest.raises(ValueError, match=r"^num_steps must be <= 1000"):
        predict_latency([32, 32], [1, 1], [1.0, 1.0], num_steps=10**9, warmup_steps=0)


def test_the_installed_command_prints_exactly_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "stadi_xdit.planner.cli", "--gpus", "A100x100000000", "--height", "1024"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "stadi-plan: error: argument --gpus: at most 256 ranks are supported, got 'A100x100000000'"
    ]


def test_comma_separated_numbers_helper():
    assert parse_numbers(" 1, 0.5") == (1.0, 0.5)
    assert parse_numbers("0,3", int) == (0, 3)
    for bad in ("", "1,,2", "1,nan", "inf", "1,abc", "1.5"):
        with pytest.raises(ValueError, match="expected comma-separated finite numbers"):
            parse_numbers(bad, int if bad == "1.5" else float)


def test_unknown_gpu_error_lists_the_known_names(capsys):
    with pytest.raises(SystemExit):
        main(["--gpus", "GTX480", "--height", "1024"])
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GTX480" in error_line and "A100" in error_line and "RTX3090" in error_line


@pytest.mark.parametrize("redirect,says", [("> /dev/full", "cannot write to standard output (No space left on device)"),
                                           (">&-", "standard output is closed; nothing could be printed")])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_1(redirect, says):
    """stdout on a full device used to be an OSError traceback; stdout closed, exit 0 with nothing printed."""
    import subprocess
    import sys

    command = f"{sys.executable} -m stadi_xdit.planner.cli --speeds 1,0.5 --height 512 {redirect}"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [f"stadi-plan: error: {says}"], proc.stderr


def test_plan_from_deeply_nested_json_is_a_value_error():
    from stadi_xdit.planner.plan_types import Plan

    with pytest.raises(ValueError, match="not a STADI plan"):
        Plan.from_json("[" * 100_000 + "]" * 100_000)
