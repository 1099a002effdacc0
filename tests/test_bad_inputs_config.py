"""Bad config inputs end in one ValueError line naming the flag or key, before any process group.

Cheap in-process checks for the second bad-input probe: config files (deep nesting, huge integers,
FIFOs), the dict xDiT's runner hands to `StadiConfig`, `--stadi_timeout`'s minimum, which process
prints a command-line error, and `stadi-plan` inputs whose predicted latency would not be finite.
"""

from __future__ import annotations

import json
import os

import pytest

from stadi_xdit import cli_errors
from stadi_xdit.config import MIN_TIMEOUT_SECONDS, StadiConfig
from stadi_xdit.planner.cli import main as plan_main
from stadi_xdit.runtime import profile_cache

DEEP = 100_000  # nesting levels: far past the recursion limit of json and yaml


def _one_line_error(call, *named: str) -> str:
    """The ValueError of `call()`: one line naming every string in `named`."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in named:
        assert needle in message, message
    return message


def _case_id(value: object) -> str | None:
    """Test ids for huge ints, whose str() is past Python's digit limit; pytest's default otherwise."""
    return f"int_{value.bit_length()}_bits" if isinstance(value, int) and value.bit_length() > 64 else None


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- 1. config files: deep nesting and huge integers ----------------------------------------------

@pytest.mark.parametrize("name,text", [
    ("deep.json", "[" * DEEP + "]" * DEEP),
    ("deep.yaml", "speeds: " + "[" * DEEP + "]" * DEEP + "\n"),
])
def test_deeply_nested_config_file_names_the_file(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    _one_line_error(lambda: StadiConfig.from_file(path), path, "nests too deeply")


def test_deeply_nested_config_text_names_the_config():
    _one_line_error(lambda: StadiConfig.from_json("[" * DEEP + "]" * DEEP), "STADI config")
    _one_line_error(lambda: StadiConfig.from_yaml("[" * DEEP + "]" * DEEP), "STADI config")


@pytest.mark.parametrize("name,text,flag", [
    ("timeout400.json", '{"timeout_seconds": 1%s}' % ("0" * 400), "--stadi_timeout"),
    ("tolerance400.yaml", "tolerance: 1%s\n" % ("0" * 400), "--stadi_tolerance"),
    ("speeds400.json", '{"speeds": [1, 1%s]}' % ("0" * 400), "--stadi_speeds"),
    ("stride400.yaml", "max_stride: -1%s\n" % ("0" * 400), "--stadi_max_stride"),
])
def test_401_digit_integer_names_the_key(tmp_path, name, text, flag):
    path = _write(tmp_path, name, text)
    message = _one_line_error(lambda: StadiConfig.from_file(path), flag)
    assert "Overflow" not in message


@pytest.mark.parametrize("name,text,flag", [
    ("bigint.json", '{"timeout_seconds": %s}' % ("9" * 5000), "--stadi_timeout"),
    ("bigint.yaml", "max_stride: %s\n" % ("9" * 5000), "--stadi_max_stride"),
    ("bigspeed.yaml", "speeds: [1, %s]\n" % ("9" * 5000), "--stadi_speeds"),
    ("bigbool.json", '{"exact": -%s}' % ("9" * 5000), "--stadi_exact"),
])
def test_5000_digit_integer_names_the_key(tmp_path, name, text, flag):
    path = _write(tmp_path, name, text)
    message = _one_line_error(lambda: StadiConfig.from_file(path), flag, "5000 digits")
    assert "Exceeds the limit" not in message


# --- 2. a FIFO is refused, never read ---------------------------------------------------------------

def test_fifo_config_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    _one_line_error(lambda: StadiConfig.from_file(fifo), str(fifo), "not a regular file")


def test_directory_config_file_is_refused(tmp_path):
    folder = tmp_path / "cfg.json"
    folder.mkdir()
    _one_line_error(lambda: StadiConfig.from_file(folder), str(folder), "directory")


def test_fifo_profile_cache_is_refused_and_never_read(tmp_path, capsys):
    fifo = tmp_path / "speeds.json"
    os.mkfifo(fifo)
    _one_line_error(lambda: profile_cache.check_cache_path(str(fifo)), "--stadi_profile_cache", str(fifo),
                    "not a regular file")
    # Made after the check (a race): load warns and measures instead of blocking the run.
    assert profile_cache.ProfileCache(fifo).load("key", 2) is None
    assert "not a regular file" in capsys.readouterr().err


# --- 3. the runner's dict gets the same type checks as a config file ---------------------------------

@pytest.mark.parametrize("field,value,flag", [
    ("profile_cache", 5, "--stadi_profile_cache"),
    ("profile_cache", ["a"], "--stadi_profile_cache"),
    ("speeds", 5, "--stadi_speeds"),
    ("speeds", [], "--stadi_speeds"),
    ("speeds", ["1", "2"], "--stadi_speeds"),
    ("speeds", [1, True], "--stadi_speeds"),
    ("speeds", [1, 10**400], "--stadi_speeds"),
    ("speeds", [1, 10**5000], "--stadi_speeds"),
    ("emulate_slowdown", b"1,2", "--stadi_emulate_slowdown"),
    ("emulate_shift", 5, "--stadi_emulate_shift"),
    ("timeout_seconds", 10**400, "--stadi_timeout"),
    ("timeout_seconds", 10**5000, "--stadi_timeout"),
    ("timeout_seconds", "600", "--stadi_timeout"),
    ("timeout_seconds", True, "--stadi_timeout"),
    ("tolerance", 10**400, "--stadi_tolerance"),
    ("tolerance", -(10**400), "--stadi_tolerance"),
    ("max_stride", 10**5000, "--stadi_max_stride"),
    ("degree", 10**400, "--stadi_degree"),
    ("exact", "false", "--stadi_exact"),
    ("use_stadi", "false", "--use_stadi"),
    ("use_stadi", 1, "--use_stadi"),
    ("mode", None, "--stadi_mode"),
    ("mode", ["full"], "--stadi_mode"),
    ("replan", 0, "--stadi_replan"),
    ("kv_dtype", b"auto", "--stadi_kv_dtype"),
    ("kv_dtype", "int8", "--stadi_kv_dtype"),
    ("timing", "fast", "--stadi_timing"),
    ("timing", 0, "--stadi_timing"),
], ids=_case_id)
def test_runner_dict_values_are_type_checked(field, value, flag):
    message = _one_line_error(lambda: StadiConfig(**{field: value}), flag)
    assert len(message) < 400, message  # huge values are shown by size, not digit by digit


def test_config_file_path_must_be_a_path():
    _one_line_error(lambda: StadiConfig.from_file(5), "--stadi_config_file", "5")


def test_valid_runner_dict_values_still_work():
    config = StadiConfig(use_stadi=True, speeds=[1, 0.5], emulate_slowdown=(1, 2), timeout_seconds=30,
                         tolerance=0, profile_cache="speeds.json")
    assert config.speeds == (1.0, 0.5) and config.emulate_slowdown == (1.0, 2.0)


# --- 4. --stadi_timeout has a minimum the backends can honour ----------------------------------------

@pytest.mark.parametrize("value", [1e-9, 1e-320, MIN_TIMEOUT_SECONDS / 2])
def test_tiny_timeout_is_refused(value):
    _one_line_error(lambda: StadiConfig(timeout_seconds=value), "--stadi_timeout", f"{MIN_TIMEOUT_SECONDS:g}")


def test_tiny_timeout_in_a_file_is_refused(tmp_path):
    path = _write(tmp_path, "t.json", '{"timeout_seconds": 1e-9}')
    _one_line_error(lambda: StadiConfig.from_file(path), "--stadi_timeout")


def test_minimum_timeout_is_accepted():
    assert StadiConfig(timeout_seconds=MIN_TIMEOUT_SECONDS).timeout_seconds == MIN_TIMEOUT_SECONDS
    assert StadiConfig(timeout_seconds=60).timeout_seconds == 60


def test_a_timeout_too_short_to_tell_slow_from_stalled_is_refused():
    _one_line_error(lambda: StadiConfig(timeout_seconds=0.1), "--stadi_timeout", "got 0.1")


# --- 5. only a real non-zero rank of a multi-process launch stays silent ------------------------------

@pytest.mark.parametrize("rank,world,speaks", [
    (None, None, True),
    ("0", "2", True),
    ("1", "2", False),
    ("3", "4", False),
    ("1", None, True),  # a stray RANK=1 in a plain shell
    ("1", "1", True),
    ("abc", "2", True),
    ("1", "abc", True),
    ("", "2", True),
    ("-1", "2", True),
    ("5", "2", True),  # not a rank of this launch
    ("1" * 5000, "2", True),
])
def test_is_speaking_rank(monkeypatch, rank, world, speaks):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert cli_errors.is_speaking_rank() is speaks


@pytest.mark.parametrize("rank", ["1", "abc"])
def test_stray_rank_still_prints_the_error(monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as info:
        plan_main(["--speeds", "x", "--height", "1024"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stadi-plan: error: argument --speeds"), lines


# --- 6. stadi-plan: every printed time is finite and --json is strict JSON ---------------------------

@pytest.mark.parametrize("extra,flag", [
    (["--speeds", "1e308,1e-308"], "--speeds"),
    (["--speeds", "1e-320,1"], "--speeds"),
    (["--speeds", "1e-300,1", "--json"], "--speeds"),
    (["--speeds", "1e-308,1e-308"], "--speeds"),
    (["--speeds", "3e-310,4e-310", "--step-overhead-seconds", "1e-247"], "--speeds"),  # was ZeroDivisionError
    (["--speeds", "1,0.5", "--sync-seconds", "1e308", "--exchange-seconds", "1e308"], "--sync-seconds"),
    (["--speeds", "1,0.5", "--exchange-seconds", "1e308"], "--exchange-seconds"),
    (["--speeds", "1,0.5", "--step-overhead-seconds", "1e308", "--json"], "--step-overhead-seconds"),
])
def test_plan_refuses_inputs_without_a_finite_prediction(monkeypatch, capsys, extra, flag):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as info:
        plan_main([*extra, "--height", "1024"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, lines
    assert lines[0].startswith(f"stadi-plan: error: argument {flag}"), lines


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"--json printed {name}, which is not strict JSON")


@pytest.mark.parametrize("speeds", ["1,1e-6", "1e300,1e300", "1e-290,1e-290", "1.7e308,0.8e308"])
def test_plan_json_at_the_bounds_is_strict(capsys, speeds):
    argv = ["--speeds", speeds, "--height", "1024", "--json", "--sync-seconds", "1e6", "--exchange-seconds",
            "1e6", "--step-overhead-seconds", "1e6"]
    assert plan_main(argv) == 0
    plan = json.loads(capsys.readouterr().out, parse_constant=_refuse_constant)
    assert plan["predicted"]["total_seconds"] > 0


# --- 7. config files as a denial of service: alias bombs, huge files, unbounded reprs (issue 21) ----

ALIAS_BOMB = "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10))
ALIAS_BOMB = "l0: &l0 [x,x,x,x,x,x,x,x,x]\n" + ALIAS_BOMB + "speeds: *l9\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    assert len(ALIAS_BOMB) < 1000  # 9**10 items once expanded
    path = _write(tmp_path, "bomb.yaml", ALIAS_BOMB)
    _one_line_error(lambda: StadiConfig.from_file(path), path, "aliases")


def test_a_harmless_anchor_without_alias_still_reads():
    assert StadiConfig.from_yaml("speeds: &s [1, 2]\n").speeds == (1.0, 2.0)


def test_oversized_config_file_is_refused_by_its_size(tmp_path):
    from stadi_xdit.config import MAX_CONFIG_BYTES

    path = tmp_path / "big.yaml"
    with open(path, "wb") as handle:
        handle.truncate(MAX_CONFIG_BYTES + 1)  # sparse: the check must not read it
    _one_line_error(lambda: StadiConfig.from_file(path), str(path), f"{MAX_CONFIG_BYTES} bytes at most")


def test_nul_byte_paths_are_refused_by_name():
    _one_line_error(lambda: StadiConfig.from_file("a\0b.json"), "--stadi_config_file", "NUL")
    _one_line_error(lambda: StadiConfig(use_stadi=True, profile_cache="x\0.json"), "--stadi_profile_cache", "NUL")
    _one_line_error(lambda: StadiConfig.from_yaml('profile_cache: "x\\0.json"\n'), "--stadi_profile_cache", "NUL")


def test_error_lines_show_a_bounded_part_of_a_huge_value():
    from stadi_xdit.config import MAX_SHOWN_CHARS, shown_value

    nested = [1]
    for _ in range(40):  # 2**40 leaves through shared references: repr() would never finish
        nested = [nested, nested]
    text = shown_value(nested)
    assert len(text) <= MAX_SHOWN_CHARS + 3 and text.startswith("[[")


def test_stadi_plan_speaks_inside_a_pytorchjob_pod(monkeypatch, capsys):
    """RANK=1 WORLD_SIZE=4 (a Kubernetes PyTorchJob pod) must not silence a command that is never a rank."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as info:
        plan_main(["--speeds", "x", "--height", "1024"])
    lines = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("stadi-plan: error: argument --speeds")
    assert not cli_errors.is_speaking_rank()  # the process-wide rule for ranks is unchanged


# --- 4. settings a combination leaves without effect, and factors past what a sleep can take -------------

@pytest.mark.parametrize("values,needle", [
    ({"timing": "work", "speeds": "1,2"}, "--stadi_timing work has no effect with --stadi_speeds"),
    ({"kv_dtype": "bfloat16", "exact": True}, "--stadi_kv_dtype bfloat16 has no effect with --stadi_exact"),
    ({"emulate_slowdown": "1,1e300"}, "--stadi_emulate_slowdown factors must be in [1, 1000]"),
    ({"emulate_slowdown": "1,1001"}, "--stadi_emulate_slowdown factors must be in [1, 1000]"),
    ({"emulate_shift": "2:1,5000"}, "--stadi_emulate_shift"),
])
def test_flags_without_effect_and_overflowing_factors_are_refused(values, needle):
    _one_line_error(lambda: StadiConfig(use_stadi=True, **values), needle)
    StadiConfig(use_stadi=True, **{**values, "speeds": None, "timing": "wall", "kv_dtype": "auto", "exact": False,
                                   "emulate_slowdown": "1,1000", "emulate_shift": "2:1,1000"})
