"""`StadiConfig` files (JSON/YAML) and `StadiArgs` validation, all before any process group exists."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import stadi_xdit  # noqa: F401  (CPU compat before xfuser)
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
    profile_cache=st.none() | st.text(min_size=1, max_size=20),
    timeout_seconds=st.floats(0.1, 1e5),
)


@given(configs)
def test_json_round_trip(config):
    assert StadiConfig.from_json(config.to_json()) == config


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
]


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
    ({"ulysses_degree": 2}, 4, "--ulysses_degree"),
    ({"ring_degree": 2}, 4, "--ring_degree"),
    ({"pipefusion_parallel_degree": 2}, 4, "--pipefusion_parallel_degree"),
    ({"stadi_speeds": "1,2,3"}, 2, "--stadi_speeds"),
    ({"stadi_emulate_slowdown": "1,2"}, 3, "--stadi_emulate_slowdown"),
    ({"stadi_speeds": "1,2", "use_cfg_parallel": True}, 2, "--stadi_speeds"),  # cfg: 2 ranks = 2 groups of 1
    ({"use_cfg_parallel": True}, 3, "--use_cfg_parallel"),
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
