"""`StadiConfig` files (JSON/YAML) and `StadiArgs` validation, all before any process group exists."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from hypothesis import example, given, settings
from hypothesis import strategies as st

import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
from stadi_xdit.config import FLAGS, MODES, StadiConfig

speeds = st.none() | st.lists(st.floats(0.01, 100, allow_nan=False), min_size=1, max_size=8).map(tuple)
configs = st.builds(
    StadiConfig,
    use_stadi=st.booleans(),
    mode=st.sampled_from(MODES),
    exact=st.booleans(),
    max_stride=st.integers(1, 8),
    tolerance=st.floats(0, 0.99),
    speeds=speeds,
    emulate_slowdown=st.none() | st.lists(st.floats(1, 10), min_size=1, max_size=8).map(tuple),
    profile_cache=st.none() | st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and "\0" not in t),  # blank or NUL paths are refused
    timeout_seconds=st.floats(5, 1e5),
    replan=st.sampled_from(("off", "calls", "sync")),
    emulate_shift=st.none() | st.builds("{}:{}".format, st.integers(0, 999), st.sampled_from(("1,2", "1.5"))),
)


@settings(deadline=None)  # a config round trip has no time limit; a loaded CI core is slow
@given(configs)
def test_json_round_trip(config):
    assert StadiConfig.from_json(config.to_json()) == config


@settings(deadline=None)
@given(configs)
def test_yaml_round_trip(config):
    assert StadiConfig.from_yaml(config.to_yaml()) == config


def test_yaml_reads_cli_style_values_and_defaults():
    config = StadiConfig.from_yaml("use_stadi: true\nmode: spatial\nspeeds: '1,0.5'\nmax_stride: 3\n")
    assert config == StadiConfig(use_stadi=True, mode="spatial", speeds=(1.0, 0.5), max_stride=3)
    assert StadiConfig.from_yaml("") == StadiConfig()


BAD_VALUES = [
    # (field, value, flag named in the error)
    ("mode", "fast", "--stadi_mode"),
    ("max_stride", 0, "--stadi_max_stride"),
    ("max_stride", 1.5, "--stadi_max_stride"),
    ("tolerance", -0.1, "--stadi_tolerance"),
    ("tolerance", 1.0, "--stadi_tolerance"),
    ("speeds", "1,fast", "--stadi_speeds"),
    ("speeds", "1,-2", "--stadi_speeds"),
    ("speeds", "1,nan", "--stadi_speeds"),
    ("speeds", (1.0, 0.0), "--stadi_speeds"),
    ("emulate_slowdown", "1,0.5", "--stadi_emulate_slowdown"),
    ("emulate_slowdown", "x", "--stadi_emulate_slowdown"),
    ("timeout_seconds", 0, "--stadi_timeout"),
    ("timeout_seconds", -5.0, "--stadi_timeout"),
    ("memory_budget", "0", "--stadi_memory_budget"),
    ("memory_budget", "24,-1", "--stadi_memory_budget"),
    ("memory_budget", "inf", "--stadi_memory_budget"),
    ("memory_budget", "24GB", "--stadi_memory_budget"),
    ("groups", "0,1", "--stadi_groups"),
    ("groups", "2,x", "--stadi_groups"),
    ("groups", "2,,1", "--stadi_groups"),
    ("groups", "1.5", "--stadi_groups"),
    ("groups", "257", "--stadi_groups"),
    ("groups", [2, -1], "--stadi_groups"),
    ("groups", [True, 1], "--stadi_groups"),
    ("groups", 2, "--stadi_groups"),
]


def test_groups_read_as_sizes_in_rank_order_from_flags_and_files():
    import yaml

    assert StadiConfig(groups="4, 2").groups == (4, 2)
    assert StadiConfig.from_yaml(yaml.safe_dump({"groups": [2, 1]})).groups == (2, 1)
    assert StadiConfig.from_json('{"groups": "2,1"}').groups == (2, 1)
    assert StadiConfig(groups="").groups is None


def test_a_stadi_degree_that_is_not_the_number_of_groups_is_refused():
    with pytest.raises(ValueError, match=r"^--stadi_degree 3 disagrees with --stadi_groups 2,1 \(2 members\)$"):
        StadiConfig(groups="2,1", degree=3)
    assert StadiConfig(groups="2,1", degree=2).degree == 2


def test_a_memory_budget_with_exact_mode_is_refused():
    with pytest.raises(ValueError, match=r"^--stadi_memory_budget 24,80 has no effect with --stadi_exact"):
        StadiConfig(memory_budget="24,80", exact=True)


@pytest.mark.parametrize("field,value,flag", BAD_VALUES)
def test_every_bad_value_names_its_flag(field, value, flag):
    with pytest.raises(ValueError) as info:
        StadiConfig(**{field: value})
    message = str(info.value)
    assert flag in message and "\n" not in message


BAD_FILE_VALUES = [
    ("exact", "yes"),  # a truthy string must not silently switch exact mode on
    ("use_stadi", 1),
    ("mode", 3),
    ("max_stride", True),
    ("max_stride", "2"),
    ("tolerance", "0.1"),
    ("timeout_seconds", None),
    ("speeds", ["1", "2"]),
    ("profile_cache", 5),
    ("groups", [2.0, 1]),
    ("groups", {"a": 1}),
]


@pytest.mark.parametrize("field,value", BAD_FILE_VALUES)
def test_bad_types_in_a_yaml_file_name_the_flag(field, value):
    import yaml

    with pytest.raises(ValueError) as info:
        StadiConfig.from_yaml(yaml.safe_dump({field: value}))
    message = str(info.value)
    assert FLAGS[field] in message and "\n" not in message


@pytest.mark.parametrize("text,needle", [
    ("speeds: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "mapping"),
    ("spead: 1\n", "unknown STADI config keys: spead"),
])
def test_malformed_yaml_is_one_line(text, needle):
    with pytest.raises(ValueError) as info:
        StadiConfig.from_yaml(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


# --- StadiArgs: launch-size checks that run before init_process_group -----------------------------

def _args(**kwargs):
    from stadi_xdit.xdit.args import StadiArgs

    return StadiArgs(**{"model": "tiny", "use_stadi": True, "height": 128, "width": 128, **kwargs})


@pytest.mark.parametrize("kwargs,world,flag", [
    ({"ulysses_degree": 3}, 4, "--ulysses_degree"),  # 4 ranks do not make groups of 3
    ({"ring_degree": 2}, 4, "--ring_degree"),
    ({"pipefusion_parallel_degree": 2}, 4, "--pipefusion_parallel_degree"),
    ({"stadi_speeds": "1,2,3"}, 2, "--stadi_speeds"),
    ({"stadi_emulate_slowdown": "1,2"}, 3, "--stadi_emulate_slowdown"),
    ({"stadi_speeds": "1,2", "use_cfg_parallel": True}, 2, "--stadi_speeds"),  # cfg: 2 ranks = 2 groups of 1
    ({"use_cfg_parallel": True}, 3, "--use_cfg_parallel"),
    ({"stadi_memory_budget": "24,24,80"}, 2, "--stadi_memory_budget"),
    ({"height": 136}, 2, "--height"),
    ({"width": 100}, 2, "--width"),
])
def test_validate_fails_before_any_process_group(kwargs, world, flag):
    args = _args(**kwargs)
    with pytest.raises(ValueError) as info:
        args.validate(world)
    assert flag in str(info.value) and "\n" not in str(info.value)
    assert not dist.is_initialized()


def test_bad_mode_fails_at_construction():
    with pytest.raises(ValueError, match="--stadi_mode"):
        _args(stadi_mode="fastest")
    assert not dist.is_initialized()


def test_validate_returns_the_stadi_degree():
    assert _args(stadi_speeds="1,2").validate(2) == 2
    assert _args(use_cfg_parallel=True, stadi_speeds="1,2").validate(4) == 2


# --- issue: config files that were accepted, or crashed, instead of one line -----------------------

@pytest.mark.parametrize("text,needle", [
    ('{"timeout_seconds": NaN}', "--stadi_timeout"),
    ('{"timeout_seconds": Infinity}', "--stadi_timeout"),
    ('{"timeout_seconds": 1e300}', "--stadi_timeout"),
    ('{"max_stride": 1000000000}', "--stadi_max_stride"),
    ('{"speeds": []}', "--stadi_speeds"),
    ('{"mode": "full", "mode": "uniform"}', "mode more than once"),
    ("[1, 2]", "mapping"),
    ("null", "mapping"),
    ('"full"', "mapping"),
    ("{", "not valid JSON"),
])
def test_bad_json_config_is_one_line(text, needle):
    with pytest.raises(ValueError) as info:
        StadiConfig.from_json(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text,needle", [
    ("timeout_seconds: .nan\n", "--stadi_timeout"),
    ("timeout_seconds: .inf\n", "--stadi_timeout"),
    ("max_stride: 1000000000\n", "--stadi_max_stride"),
    ("speeds: []\n", "--stadi_speeds"),
    ("mode: full\nmode: spatial\n", "mode more than once"),
    ("tolerance: [1]\n", "--stadi_tolerance"),
])
def test_bad_yaml_config_is_one_line(text, needle):
    with pytest.raises(ValueError) as info:
        StadiConfig.from_yaml(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_yaml_exponent_without_dot_is_a_number():
    assert StadiConfig.from_yaml("tolerance: 5e-1\ntimeout_seconds: 1e2\n").tolerance == 0.5


def test_config_file_by_extension(tmp_path):
    (tmp_path / "c.yaml").write_text("mode: spatial\n")
    (tmp_path / "c.json").write_text('{"mode": "uniform"}')
    (tmp_path / "c.txt").write_text("mode: spatial\n")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    assert StadiConfig.from_file(tmp_path / "c.yaml").mode == "spatial"
    assert StadiConfig.from_file(tmp_path / "c.json").mode == "uniform"
    for name, needle in (("c.txt", ".json, .yaml"), ("bin.json", "cannot read"), ("missing.json", "cannot read")):
        with pytest.raises(ValueError, match=needle):
            StadiConfig.from_file(tmp_path / name)


# Values a config file can hold: every JSON type, plus the awkward numbers.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(MODES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
config_dicts = st.dictionaries(st.sampled_from([*FLAGS, "spead", ""]), json_values, max_size=4)


@given(config_dicts | json_values)
@example({"\n": None})  # found in CI: an unknown key holding a newline split the error over two lines
def test_fuzzed_config_is_valid_or_one_line_error(data):
    """Any parsed file content: a config, or a ValueError of one line; never another exception."""
    import json
    import math

    text = json.dumps(data)  # NaN/Infinity spelled the way Python's json writes them
    try:
        config = StadiConfig.from_json(text)
    except ValueError as error:
        assert "\n" not in str(error) and str(error)
        return
    assert config.mode in MODES and 1 <= config.max_stride <= 16
    assert math.isfinite(config.timeout_seconds) and config.timeout_seconds > 0
