"""Fuzzed command lines for ``stadi-plan`` and ``stadi-bench`` (parse and validate only, in-process).

Property: an argument list either succeeds (``stadi-plan`` returns 0 having planned, ``stadi-bench``'s
``parse_args`` returns a namespace) or exits with status 2 and exactly one ``PROG: error: ...`` line on
stderr; never another exception, never a traceback, and never a hang: the deadline is a hang guard
(the probe once found inputs that ran for minutes), far above the worst case measured at the planner's
limits (~0.6 s), not a speed check.
"""

from __future__ import annotations

import argparse

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stadi_xdit.bench.cli import parse_args as bench_parse_args
from stadi_xdit.planner.cli import main as plan_main

ADVERSARIAL = [
    "", " ", "-1", "0", "1", "2", "-0", "nan", "NaN", "inf", "-inf", "1e308", "1e-320", "1.5", "3.7",
    str(10**12), str(-(10**12)), "9" * 400, "abc", "--", "-x", ",", "1,,2", "x" * 300, "1,0.5", "0.5,1",
    "1,-1", "1,nan", "１２", "٣", "∞", "é", "\u202e1", "\x00",
]
INTS = ["1", "2", "4", "16", "17", "256", "1000", "1001", "4096", "65536", "65552", "1024", "1000", "3"]
# capsys is read and reset inside every example, so sharing the function-scoped fixture is safe.
FUZZ = settings(deadline=30_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _pairs(flags: dict[str, list[str]], switches: list[str]) -> st.SearchStrategy[list[str]]:
    """Argument lists: flags with good or adversarial values (sometimes ``--f=v``, sometimes missing)."""
    def values(flag: str) -> st.SearchStrategy[str]:
        # Half the flag's own (mostly valid) values, so that successful runs are common too.
        return st.one_of(st.sampled_from(flags[flag]), st.sampled_from(INTS + ADVERSARIAL))

    flag_with_value = st.sampled_from(sorted(flags)).flatmap(
        lambda flag: st.one_of(
            values(flag).map(lambda value: [flag, value]),
            values(flag).map(lambda value: [f"{flag}={value}"]),
            values(flag).map(lambda value: [flag + value]),  # attached, as for short flags: -n2
            st.just([flag]),  # missing value
        )
    )
    switch = st.sampled_from(switches).map(lambda flag: [flag])
    junk = st.sampled_from(ADVERSARIAL).map(lambda value: [value])  # stray positional
    item = st.one_of(flag_with_value, flag_with_value, flag_with_value, flag_with_value, switch, junk)
    return st.lists(item, max_size=6).map(lambda items: [token for tokens in items for token in tokens])


PLAN_FLAGS = {
    "--speeds": ["1,0.5", "1,0.25,0.5,1", "1", "3,1e-3"],
    "--gpus": ["A100x2,RTX3090x2", "T4", "H100x256", "A100x-1", "A100x100000000", "A100x0", "GTX480",
               "A100x257"],
    "--height": ["1024", "1000", "65536", "1600000000", "16"],
    "--width": ["768"],
    "--patch-size": ["1", "2"],
    "--vae-scale": ["8"],
    "--align": ["1", "2", "3"],
    "--steps": ["20", "1000"],
    "--warmup": ["2", "0", "19"],
    "--mode": ["uniform", "spatial", "full", "fast"],
    "--max-stride": ["2", "4", "16"],
    "--tolerance": ["0.02", "0.5"],
    "--sync-seconds": ["0.1"],
    "--exchange-seconds": ["0.05"],
    "--step-overhead-seconds": ["0.01"],
}
PLAN_SWITCHES = ["--warmup-speeds-known", "--json"]
PLAN_BASE = st.sampled_from(
    [[], ["--speeds", "1,0.5", "--height", "1024"], ["--gpus", "A100x2,T4", "--height", "512"]]
)

BENCH_FLAGS = {
    "--preset": ["tiny", "small", "pixart-alpha-1024", "flux-dev-1024", "nope"],
    "--height": ["128", "256", "100", "65536", "65552"],
    "--steps": ["4", "20", "1000"],
    "--warmup": ["1", "2", "0"],
    "--repeats": ["1", "3"],
    "-r": ["2"],
    "--ranks": ["2", "3", "1", "257"],
    "-n": ["2"],
    "--scenario": ["none", "slowdown:1,2", "slowdown:1,2,4", "background:1=1", "background:0=0.5,1=2",
                   "slowdown:", "slowdown:a,b", "background:x=1", "background:1=", "foo", "slowdown:0,1",
                   "slowdown:-1,2", "background:1=-3", "shift:1", "slowdown:nan,1", "background:1=1,1=2"],
    "--arms": ["single,full", "full", "foo", ",", "single,uniform,ulysses,ring,pipefusion,spatial,full"],
    "--cores": ["0,1", "0", "a,b", "0,0", "0,99", "-1,0"],
    "--order": ["interleaved", "blocked", "random"],
    "--seed": ["0", "7"],
    "--max-stride": ["2", "16", "17"],
    "--pipefusion-patches": ["2"],
    "--device": ["cpu", "cuda", "tpu"],
    "--dtype": ["float32", "bfloat16", "nonsense"],
    "--run-timeout": ["60", "0.5"],
    "--out": ["bench-out", "pyproject.toml"],
    "--gpus": ["A100x2,RTX3090x2", "A100x-1", "A100x100000000", "GTX480"],
    "--speeds": ["1,0.5", "1,0", "1,1e-9"],
    "--row-seconds": ["0.001", "1e-12"],
    "--mfu": ["0.35", "1.5"],
    "--link-gbps": ["100"],
    "--calibrate-height": ["256", "7", "4096"],
    "--ulysses-degree": ["2", "0", "3"],
    "--stadi-groups": ["2,2", "1,3", "2,x", "0", ""],
}
BENCH_SWITCHES = ["--profile-cache", "--no-plots", "--no-decode", "--no-progress", "--verbose-workers",
                  "--simulate", "--no-measure", "--construct-only"]


def assert_one_error_line(capsys: pytest.CaptureFixture[str], prog: str, exit_info: SystemExit) -> None:
    err = capsys.readouterr().err
    event("error")  # --hypothesis-show-statistics: how often each outcome is reached
    assert exit_info.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err


@settings(FUZZ, max_examples=300)
@given(PLAN_BASE, _pairs(PLAN_FLAGS, PLAN_SWITCHES))
def test_fuzzed_stadi_plan_plans_or_prints_one_error_line(capsys, base, argv):
    capsys.readouterr()
    try:
        code = plan_main(base + argv)
    except SystemExit as exit_info:
        assert_one_error_line(capsys, "stadi-plan", exit_info)
        return
    event("planned")
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "STADI plan" in captured.out or '"ranks"' in captured.out


@settings(FUZZ, max_examples=300)
@given(_pairs(BENCH_FLAGS, BENCH_SWITCHES))
def test_fuzzed_stadi_bench_parses_or_prints_one_error_line(capsys, argv):
    capsys.readouterr()
    try:
        args = bench_parse_args(argv)
    except SystemExit as exit_info:
        assert_one_error_line(capsys, "stadi-bench", exit_info)
        return
    event("parsed")
    assert isinstance(args, argparse.Namespace)
    assert capsys.readouterr().err == ""
