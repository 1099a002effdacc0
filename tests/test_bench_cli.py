"""``stadi-bench`` input validation: ``parse_args`` rejects bad input with one line before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stadi_xdit.bench import cli
from stadi_xdit.bench.catalog import DEFAULT_ARMS
from stadi_xdit.bench.cli import DEMO_ARGS, parse_args
from stadi_xdit.bench.scenarios import parse_scenario

ALLOWED_CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("argv", "flag", "says"),
    [
        (["--scenario", "slowdown:"], "--scenario", "one finite number per rank"),
        (["--scenario", "slowdown:a,b"], "--scenario", "slowdown:k0,k1"),
        (["--scenario", "background:x=1"], "--scenario", "integer RANK"),
        (["--scenario", "background:1="], "--scenario", "LOAD must be"),
        (["--scenario", "foo"], "--scenario", "unknown scenario 'foo'"),
        (["--scenario", "shift:1,2"], "--scenario", "shift:RANK=A->B@F"),
        (["--scenario", "shuffle:1,2"], "--scenario", "unknown scenario"),
        (["--scenario", "slowdown:0,1"], "--scenario", "in [1, 100]"),
        (["--scenario", "slowdown:-1,2"], "--scenario", "in [1, 100]"),
        (["--scenario", "slowdown:nan,1"], "--scenario", "finite"),
        (["--scenario", "slowdown:1,inf"], "--scenario", "finite"),
        (["--scenario", "background:1=-3"], "--scenario", "LOAD must be an integer in [1, 32]"),
        (["--scenario", "background:1=1.5"], "--scenario", "duty fraction"),
        (["--scenario", "background:1=1,1=2"], "--scenario", "loaded twice"),
        (["--scenario", "slowdown:1,2,3"], "--scenario", "3 slowdown factors"),
        (["--scenario", "background:2=1"], "--scenario", "rank 2 is outside 0..1"),
        (["--ranks", "3"], "--scenario", "the default --scenario"),
        (["--ranks", "0"], "--ranks", "in [1, 256]"),
        (["--ranks", "257", "--scenario", "none"], "--ranks", "in [1, 256]"),
        (["--cores", "a,b"], "--cores", "comma-separated"),
        (["--cores", str(ALLOWED_CORES[0])], "--cores", "one core per rank"),
        (["--cores", "0,100000"], "--cores", "allowed cores"),
        (["--cores=-1,0"], "--cores", "allowed cores"),
        (["--out", "/dev/null/x"], "--out", "cannot create the folder"),
        (["--repeats", "0"], "--repeats", ">= 1"),
        (["--calls", "1"], "--calls", "in [2, 1000]"),
        (["--calls", "x"], "--calls", "invalid int value"),
        (["--calls", "3", "--repeats", "2"], "--calls", "not both"),
        (["--steps", "0"], "--steps", "in [1, 1000]"),
        (["--steps", str(10**12)], "--steps", "in [1, 1000]"),
        (["--warmup", "20"], "--warmup", "below --steps"),
        (["--warmup=-1"], "--warmup", "below --steps"),
        (["--height", "0"], "--height", "multiple of 16"),
        (["--height=-16"], "--height", "multiple of 16"),
        (["--height", "100"], "--height", "multiple of 16"),
        (["--height", "65552"], "--height", "at most 4096 token rows"),
        (["--height", "x"], "--height", "invalid int value"),
        (["--height=--"], "--height", "expected one argument"),
        (["-n--"], "-n", "expected one argument"),
        (["--scenario=--"], "--scenario", "expected one argument"),
        (["--max-stride", "0"], "--max-stride", "in [1, 16]"),
        (["--max-stride", "17"], "--max-stride", "in [1, 16]"),
        (["--pipefusion-patches", "0"], "--pipefusion-patches", ">= 1"),
        (["--dtype", "nonsense"], "--dtype", "invalid choice"),
        (["--preset", "nope"], "--preset", "invalid choice"),
        (["--arms", "foo,full"], "--arms", "subset of single,"),
        (["--arms", ","], "--arms", "subset of"),
        (["--seed=-1"], "--seed", "in [0, "),
        (["--run-timeout", "nan"], "--run-timeout", "got nan"),
        (["--run-timeout", "0"], "--run-timeout", "seconds in"),
        (["--device", "cuda", "--ranks", "257", "--scenario", "none"], "--ranks", "in [1, 256]"),
        (["--out", "pyproject.toml"], "--out", "is not a folder"),
        (["--simulate"], "--simulate", "needs --gpus"),
        (["--simulate", "--gpus", "A100x2", "--mfu", "0"], "--mfu", "fraction in [0.01, 1]"),
        (["--simulate", "--gpus", "A100x2", "--mfu", "nan"], "--mfu", "got nan"),
        (["--row-seconds=-1"], "--row-seconds", "seconds in"),
        (["--link-gbps", "0"], "--link-gbps", "GB/s in"),
        (["--speeds", "1,abc"], "--speeds", "comma-separated"),
        (["--speeds", "1,0"], "--speeds", "> 0"),
        (["--speeds", "1,1e-9"], "--speeds", "1e-06 x the fastest"),
        (["--speeds", ",".join(["1"] * 257)], "--speeds", "1 to 256 speeds"),
        (["--gpus", "A100x-1"], "--gpus", "integer >= 1"),
        (["--gpus", "A100x100000000"], "--gpus", "at most 256 ranks"),
        (["--gpus", "GTX480"], "--gpus", "unknown GPU"),
        (["--gpus", "A100x2", "--speeds", "1,1"], "--speeds", "not allowed with argument --gpus"),
        (["--simulate", "--gpus", "A100x64", "--height", "512", "--no-measure"], "--height", "32 token rows"),
        (["--simulate", "--speeds", "1,0.5", "--preset", "flux-dev-1024"], "--simulate", "PixArt preset"),
        (["--simulate", "--speeds", "1,0.5", "--no-measure"], "--no-measure", "--row-seconds"),
        (["--calibrate-height", "7"], "--calibrate-height", "multiple of 16"),
        (["--calibrate-height", "4096"], "--calibrate-height", "[32, 2048]"),
        (["--bogus"], "--bogus", "unrecognized arguments"),
        (["--simulate", "--gpus", "A100x6", "--ulysses-degree", "4"], "--ulysses-degree", "divide the 6 ranks"),
        (["--simulate", "--gpus", "A100x2", "--ulysses-degree", "0"], "--ulysses-degree", "integer >= 1"),
        (["--ulysses-degree", "2"], "--ulysses-degree", "only with --simulate"),
        (["--stadi-groups", "2,1"], "--stadi-groups", "only with --simulate"),
        (["--simulate", "--gpus", "A100x6", "--stadi-groups", "2,2"], "--stadi-groups", "add up to the 6 ranks"),
        (["--simulate", "--gpus", "A100x6", "--stadi-groups", "2,x"], "--stadi-groups", "comma-separated integers"),
        (["--simulate", "--gpus", "A100x6", "--stadi-groups", "4,2", "--ulysses-degree", "2"], "--stadi-groups",
         "cannot be combined with --ulysses-degree 2"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(one_error_line, argv, flag, says):
    line = one_error_line(parse_args, argv, "stadi-bench: error: ")
    assert flag in line and says in line, line


@pytest.mark.parametrize("argv", [["--scenario", "slowdown:nan,1"], ["--ranks", "3"], ["--cores", "a,b"],
                                  ["--simulate", "--gpus", "A100x2", "--mfu", "0"], ["--repeats", "0"]])
def test_main_rejects_bad_input_before_any_arm_or_simulation_starts(capsys, monkeypatch, argv):
    def must_not_run(*args, **kwargs):
        raise AssertionError("ran despite bad input")

    for name in ("run_bench", "_simulate", "_construct_only"):
        monkeypatch.setattr(cli, name, must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_valid_input_resolves_defaults_and_canonical_order():
    args = parse_args([])
    assert args.height == 512 and args.steps == 20 and args.ranks == 2
    assert args.arm_names == DEFAULT_ARMS
    assert [s.text for s in args.scenarios] == ["slowdown:1,2"]
    assert args.core_list is None and args.speed_values is None and args.gpu_names is None

    cores = f"{ALLOWED_CORES[0]},{ALLOWED_CORES[-1]},{ALLOWED_CORES[0]}"
    args = parse_args(["--preset", "tiny", "--ranks", "3", "--arms", "full, single", "--cores", cores,
                       "--scenario", "none", "--scenario", "background:2=0.5",
                       "--scenario", "slowdown:1,1.5,3"])
    assert args.height == 128 and args.arm_names == ("single", "full")
    assert [s.kind for s in args.scenarios] == ["none", "background", "slowdown"]
    assert args.core_list == [ALLOWED_CORES[0], ALLOWED_CORES[-1], ALLOWED_CORES[0]]


def test_simulate_and_construct_only_do_not_need_a_scenario_for_their_ranks():
    args = parse_args(["--simulate", "--gpus", "A100x2,RTX3090x2", "--preset", "pixart-alpha-1024",
                       "--no-measure", "--ranks", "4"])
    assert args.gpu_names == ("A100", "A100", "RTX3090", "RTX3090") and args.scenarios == []
    args = parse_args(["--simulate", "--speeds", "1,0.5", "--row-seconds", "0.001", "--link-gbps", "25"])
    assert args.speed_values == (1.0, 0.5)
    assert parse_args(["--construct-only", "--preset", "flux-dev-1024", "--ranks", "8"]).height == 1024


def test_main_hands_the_validated_arguments_to_the_run(monkeypatch, capsys):
    calls = []
    def fake_run_bench(args, argv, preset, height) -> int:
        calls.append((args, argv, height))
        return 0

    monkeypatch.setattr(cli, "run_bench", fake_run_bench)
    assert cli.main(["--preset", "tiny", "--scenario", "none", "--arms", "full,single"]) == 0
    args, argv, height = calls.pop()
    assert height == 128 and args.arm_names == ("single", "full") and argv[0] == "--preset"
    assert cli.main([]) == 0  # no arguments: the demo
    args, argv, height = calls.pop()
    assert argv == DEMO_ARGS and height == 256 and args.repeats == 2
    assert "running the demo" in capsys.readouterr().out


def test_the_installed_command_prints_exactly_one_line():
    # A fresh process: importing torch/diffusers warnings during validation would add stderr lines.
    result = subprocess.run([sys.executable, "-m", "stadi_xdit.bench.cli", "--scenario", "slowdown:nan,1"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    expected = ("stadi-bench: error: argument --scenario: scenario 'slowdown:nan,1': expected "
                "slowdown:k0,k1,... with one finite number per rank")
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""


def test_scenario_parsing_and_world_checks():
    assert parse_scenario(" slowdown: 1, 2 ").factors == (1.0, 2.0)
    assert parse_scenario("background:0=0.5,1=32").loads == {0: 0.5, 1: 32.0}
    for bad in ("slowdown:1,101", "background:1=33", "background:", "background:1=1=1", "background:=1",
                "NONE"):
        with pytest.raises(ValueError, match="scenario"):
            parse_scenario(bad)
    with pytest.raises(ValueError, match=r"2 slowdown factors, one per rank is needed for 3 ranks"):
        parse_scenario("slowdown:1,2").check_world(3)
    with pytest.raises(ValueError, match=r"rank -1 is outside 0\.\.1"):
        parse_scenario("background:-1=1").check_world(2)
