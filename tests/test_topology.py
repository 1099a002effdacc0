"""`stadi_xdit.topology`: the one place a launch's degrees are ruled (pure Python, no torch)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stadi_xdit.topology import (
    REFUSED_WITH_STADI,
    STADI_SLOT,
    Topology,
    check_stadi_degree,
    checked_vae_ranks,
    refuse_degrees,
)


def _args(**values):
    """Parsed arguments as xDiT names them; unset degrees are 1, as its parser leaves them."""
    return SimpleNamespace(**{**dict.fromkeys(REFUSED_WITH_STADI, 1), "use_cfg_parallel": False,
                              "vae_parallel_size": 0, **values})


def test_the_module_imports_neither_torch_nor_xfuser():
    code = ("import sys, stadi_xdit.topology; "
            "print(sorted(m for m in ('torch', 'xfuser') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("values,world,expected", [
    ({}, 4, Topology(4, stadi_degree=4)),
    ({"use_cfg_parallel": True}, 4, Topology(4, stadi_degree=2, cfg_degree=2)),
    ({"vae_parallel_size": 1}, 3, Topology(3, stadi_degree=2, vae_ranks=1)),
    ({"use_cfg_parallel": True, "vae_parallel_size": 2}, 6,
     Topology(6, stadi_degree=2, cfg_degree=2, vae_ranks=2)),
    ({"vae_parallel_size": None, "ulysses_degree": None}, 1, Topology(1, stadi_degree=1)),
])
def test_from_args_reads_the_layout(values, world, expected):
    topology = Topology.from_args(_args(**values), world)
    assert topology == expected
    assert topology.degree_product == topology.dit_ranks == world - topology.vae_ranks


def test_the_groups_xdit_built_are_checked_against_the_topology():
    topology = Topology.for_stadi_degree(3, cfg_degree=2)
    topology.check_groups(3, 2)
    with pytest.raises(ValueError, match="xDiT built STADI groups of 2 ranks, CFG groups of 2 and sequence-parallel "
                                         "groups of 1, but the launch was checked for --stadi_degree 3, CFG degree 2 "
                                         "and --ulysses_degree 1"):
        topology.check_groups(2, 2)
    grouped = Topology.for_stadi_degree(2, ulysses_degree=2)
    assert grouped.world_size == 4
    grouped.check_groups(2, 1, 2)
    with pytest.raises(ValueError, match="sequence-parallel groups of 1, but"):
        grouped.check_groups(2, 1, 1)


@pytest.mark.parametrize("values,world,expected", [
    ({"ulysses_degree": 2}, 4, Topology(4, stadi_degree=2, ulysses_degree=2)),
    ({"ulysses_degree": 2, "use_cfg_parallel": True}, 8, Topology(8, stadi_degree=2, cfg_degree=2, ulysses_degree=2)),
    ({"ulysses_degree": 3, "vae_parallel_size": 1}, 7, Topology(7, stadi_degree=2, ulysses_degree=3, vae_ranks=1)),
])
def test_a_family_with_ulysses_groups_takes_stadi_members_of_ulysses_degree_ranks(values, world, expected):
    assert Topology.from_args(_args(**values), world, ulysses_groups=True) == expected


@pytest.mark.parametrize("values,world,groups,message", [
    ({"ulysses_degree": 2}, 4, False, "--ulysses_degree 2 cannot be combined with --use_stadi"),
    ({"ulysses_degree": 2, "use_cfg_parallel": True}, 6, True,
     "6 DiT ranks must be a multiple of 4 with --use_cfg_parallel and --ulysses_degree 2"),
    ({"ulysses_degree": 0}, 4, True, "--ulysses_degree must be an integer >= 1, got 0"),
    ({"ulysses_degree": 2, "ring_degree": 2}, 8, True, "--ring_degree 2 cannot be combined with --use_stadi"),
])
def test_ulysses_groups_are_refused_in_one_line(values, world, groups, message):
    with pytest.raises(ValueError) as info:
        Topology.from_args(_args(**values), world, ulysses_groups=groups)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_validate_keeps_the_checked_topology_for_the_engine_config(monkeypatch):
    """`create_config` hands this Topology to the runtime (StadiEngineConfig.topology), which reads its degrees
    from it and checks it against xDiT's groups once (every conformance run goes through that check)."""
    from stadi_xdit.xdit.args import StadiArgs

    monkeypatch.setenv("WORLD_SIZE", "4")
    args = StadiArgs(use_stadi=True, use_cfg_parallel=True, height=128, width=128, num_inference_steps=4,
                     warmup_steps=1, prompt="a cat")
    assert args.validate(4) == 2
    assert args.topology == Topology(4, stadi_degree=2, cfg_degree=2)


def test_a_topology_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Topology(2, stadi_degree=2).world_size = 3


@pytest.mark.parametrize("values,world,message", [
    ({"vae_parallel_size": 2}, 2, ("--vae_parallel_size 2 leaves no rank for the DiT: the launch has 2 ranks, "
                                  "so --vae_parallel_size must be at most 1")),
    ({"use_cfg_parallel": True}, 3, "3 DiT ranks must be a multiple of 2 with --use_cfg_parallel"),
    ({"use_cfg_parallel": True, "vae_parallel_size": 2}, 5,
     ("3 DiT ranks (world size 5 minus --vae_parallel_size 2) must be a multiple of 2 "
     "with --use_cfg_parallel")),
    ({"vae_parallel_size": -1}, 2, "--vae_parallel_size must be an integer >= 0, got -1"),
    ({"vae_parallel_size": "1"}, 2, "--vae_parallel_size must be an integer >= 0, got '1'"),
    ({"fully_shard_degree": 2}, 2, "--fully_shard_degree 2 cannot be combined with --use_stadi"),
])
def test_from_args_refuses_in_one_line(values, world, message):
    with pytest.raises(ValueError) as info:
        Topology.from_args(_args(**values), world)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("fields,message", [
    ({"world_size": 3, "stadi_degree": 2}, "the degrees do not fill the launch"),
    ({"world_size": 0, "stadi_degree": 1},
     r"the world size \(--nproc_per_node x --nnodes\) must be an integer >= 1, got 0"),
    ({"world_size": 2, "stadi_degree": True}, "--stadi_degree must be an integer >= 1, got True"),
    ({"world_size": 3, "stadi_degree": 1, "cfg_degree": 3}, "the CFG degree must be 1 or 2"),
    ({"world_size": 2, "stadi_degree": 2, "ulysses_degree": 2}, "the degrees do not fill the launch"),
    ({"world_size": 2, "stadi_degree": 1, "ring_degree": 2}, "--ring_degree 2 cannot be combined"),
    ({"world_size": 2, "stadi_degree": 2, "vae_ranks": -1}, "--vae_parallel_size must be an integer >= 0"),
])
def test_construction_checks_the_product_rule(fields, message):
    with pytest.raises(ValueError, match=message):
        Topology(**fields)


def test_for_stadi_degree_counts_the_launch_and_spreads_it_over_nodes():
    topology = Topology.for_stadi_degree(3, cfg_degree=2, vae_ranks=2)
    assert topology.world_size == 8 and topology.processes_per_node(2) == 4
    with pytest.raises(ValueError, match=r"^8 STADI ranks cannot be spread evenly over --nnodes 3$"):
        topology.processes_per_node(3)
    with pytest.raises(ValueError, match=r"^--nnodes must be an integer >= 1, got 0$"):
        topology.processes_per_node(0)


def test_the_stadi_degree_must_match_the_launch():
    check_stadi_degree(None, 3)
    check_stadi_degree(3, 3)
    with pytest.raises(ValueError, match=r"^--stadi_degree 2 does not match the launch: 3 ranks per CFG "):
        check_stadi_degree(2, 3)


def test_refused_degrees_accept_one_as_a_number_or_as_command_line_text():
    refuse_degrees({name: 1 for name in REFUSED_WITH_STADI})
    refuse_degrees({name: "1" for name in REFUSED_WITH_STADI})
    refuse_degrees({})
    assert checked_vae_ranks(None) == 0
    with pytest.raises(ValueError, match=r"^--tensor_parallel_degree 4 cannot be combined with --use_stadi"):
        refuse_degrees({"tensor_parallel_degree": "4"})


def test_the_refused_list_holds_every_xdit_degree_and_stadis_slot():
    assert {"ulysses_degree", "ring_degree", "pipefusion_parallel_degree", "tensor_parallel_degree",
            "fully_shard_degree"} < set(REFUSED_WITH_STADI)
    assert STADI_SLOT in REFUSED_WITH_STADI  # as a user's flag; the slot itself is STADI's


# --- properties ----------------------------------------------------------------------------------------

layouts = st.fixed_dictionaries({"use_cfg_parallel": st.booleans(),
                                 "vae_parallel_size": st.one_of(st.none(), st.integers(0, 8))})


@given(layouts, st.integers(-2, 64))
def test_an_accepted_topology_fills_the_launch_exactly(values, world):
    try:
        topology = Topology.from_args(_args(**values), world)
    except ValueError as error:
        assert "\n" not in str(error)
        return
    assert topology.world_size == world
    assert topology.degree_product + topology.vae_ranks == world
    assert topology.stadi_degree >= 1 and topology.cfg_degree == (2 if values["use_cfg_parallel"] else 1)
    assert Topology(**dataclasses.asdict(topology)) == topology  # the product rule accepts it again


@given(st.sampled_from(REFUSED_WITH_STADI), st.one_of(st.integers(2, 1 << 20), st.integers(2, 64).map(str)),
       layouts, st.integers(1, 64))
def test_every_refused_degree_above_one_is_rejected_naming_its_flag(name, value, values, world):
    with pytest.raises(ValueError) as info:
        Topology.from_args(_args(**{**values, name: value}), world)
    assert str(info.value).startswith(f"--{name} {value} cannot be combined with --use_stadi")


def test_xdit_baselines_run_the_same_ranks_per_cfg_branch():
    topology = Topology.for_stadi_degree(3)
    assert topology.xdit_degrees("ulysses") == {"ulysses_degree": 3}
    assert topology.xdit_degrees("ring") == {"ring_degree": 3}
    assert topology.xdit_degrees("pipefusion") == {"pipefusion_parallel_degree": 3, "num_pipeline_patch": 3}
    assert topology.xdit_degrees("pipefusion", 6)["num_pipeline_patch"] == 6
    assert Topology.for_stadi_degree(2, cfg_degree=2).xdit_degrees("ulysses") == \
        {"ulysses_degree": 2, "use_cfg_parallel": True}
    with pytest.raises(ValueError, match="ulysses, ring or pipefusion"):
        topology.xdit_degrees("tensor")


def test_validate_lets_ulysses_through_only_for_a_family_that_runs_it_inside_stadi_groups(monkeypatch):
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline
    from stadi_xdit.xdit.args import StadiArgs

    class WithoutGroups(StadiPixArtAlphaPipeline):  # a family that has not declared it
        ulysses_groups = False

    monkeypatch.setenv("WORLD_SIZE", "4")
    args = StadiArgs(use_stadi=True, ulysses_degree=2, height=128, width=128, num_inference_steps=4,
                     warmup_steps=1, prompt="a cat")
    args.stadi_pipeline_class = StadiPixArtAlphaPipeline
    assert args.validate(4) == 2 and args.topology == Topology(4, stadi_degree=2, ulysses_degree=2)
    args.stadi_pipeline_class = WithoutGroups
    with pytest.raises(ValueError, match=r"^--ulysses_degree 2 cannot be combined with --use_stadi"):
        args.validate(4)
    # An xDiT script's twin is known only when it builds its pipeline: the launch passes, the pipeline checks.
    args.stadi_pipeline_class = None
    assert args.validate(4) == 2
    from types import SimpleNamespace

    from stadi_xdit.cli_errors import StadiInputError

    engine_config = SimpleNamespace(parallel_config=SimpleNamespace(ulysses_degree=2))
    with pytest.raises(StadiInputError, match=r"^--ulysses_degree 2 cannot be combined with --use_stadi for "
                                              r"WithoutGroups: its family does not run Ulysses inside STADI groups$"):
        object.__new__(WithoutGroups)._init_runtime_state(None, engine_config)


def test_heads_that_ulysses_cannot_divide_are_refused_in_one_line():
    from stadi_xdit.topology import check_ulysses_heads

    check_ulysses_heads(6, 2, "FluxTransformer2DModel")
    check_ulysses_heads(6, 1, "FluxTransformer2DModel")
    check_ulysses_heads(None, 4, "FluxTransformer2DModel")  # unknown: left to xDiT's own check
    with pytest.raises(ValueError, match=r"^--ulysses_degree 4: FluxTransformer2DModel has 6 attention heads, "
                                         r"not a multiple of 4$"):
        check_ulysses_heads(6, 4, "FluxTransformer2DModel")


def test_unequal_groups_fill_the_branch_and_are_checked_against_xdits_flat_groups():
    """Nodes of different sizes: STADI members of 2 and 1 ranks. xDiT's groups stay flat (its data-parallel group
    is the CFG branch, no sequence parallelism): STADI builds the groups itself."""
    topology = Topology(6, stadi_degree=2, cfg_degree=2, group_sizes=(2, 1))
    assert topology.unequal_groups and topology.branch_ranks == 3 and topology.degree_product == 6
    topology.check_groups(3, 2, 1)
    with pytest.raises(ValueError, match="xDiT built STADI groups of 2 ranks"):
        topology.check_groups(2, 2, 1)
    assert not Topology(4, stadi_degree=2, ulysses_degree=2).unequal_groups
    for fields, message in [({"world_size": 4}, "do not fill the launch"),
                            ({"group_sizes": (2, 0)}, "2 integers >= 1"),
                            ({"group_sizes": (2, 1, 1)}, "2 integers >= 1"),
                            ({"group_sizes": (2, 2), "world_size": 4}, "are --ulysses_degree 2"),
                            ({"ulysses_degree": 2, "world_size": 6}, "cannot be combined with STADI groups")]:
        values = {"world_size": 3, "stadi_degree": 2, "group_sizes": (2, 1), **fields}
        with pytest.raises(ValueError, match=message):
            Topology(**values)


@pytest.mark.parametrize("sizes,values,world,expected", [
    ((2, 1), {}, 3, Topology(3, stadi_degree=2, group_sizes=(2, 1))),
    ((2, 1), {"use_cfg_parallel": True, "vae_parallel_size": 1}, 7,
     Topology(7, stadi_degree=2, cfg_degree=2, vae_ranks=1, group_sizes=(2, 1))),
    ((2, 2), {}, 4, Topology(4, stadi_degree=2, ulysses_degree=2)),  # equal sizes: xDiT's own Ulysses groups
    ((3,), {}, 3, Topology(3, stadi_degree=1, ulysses_degree=3)),
    ((1, 1, 1), {}, 3, Topology(3, stadi_degree=3)),  # groups of one: flat STADI
])
def test_stadi_groups_name_the_members_group_sizes(sizes, values, world, expected):
    topology = Topology.from_args(SimpleNamespace(**values), world, ulysses_groups=True, group_sizes=sizes)
    assert topology == expected
    assert topology.data_parallel_degree * topology.ulysses_degree * topology.cfg_degree == topology.dit_ranks
    assert Topology.for_group_sizes(sizes, expected.cfg_degree, expected.vae_ranks) == expected


@pytest.mark.parametrize("values,world,ulysses_groups,message", [
    ({}, 4, True, "--stadi_groups 2,1 needs 3 processes, but the launch has 4"),
    ({"use_cfg_parallel": True, "vae_parallel_size": 1}, 6, True,
     ("--stadi_groups 2,1 needs 7 processes (3 x 2 with --use_cfg_parallel + --vae_parallel_size 1), but the launch "
     "has 6")),
    ({"ulysses_degree": 2}, 6, True, ("--stadi_groups 2,1 cannot be combined with --ulysses_degree 2: each group's "
                                     "size is its Ulysses degree")),
    ({}, 3, False, "--stadi_groups 2,1: this model's family does not run Ulysses inside STADI groups"),
])
def test_stadi_groups_that_do_not_fit_the_launch_are_refused_in_one_line(values, world, ulysses_groups, message):
    with pytest.raises(ValueError) as info:
        Topology.from_args(SimpleNamespace(**values), world, ulysses_groups=ulysses_groups, group_sizes=(2, 1))
    assert str(info.value) == message


def test_unequal_groups_are_placed_one_per_node_with_the_vae_on_the_last():
    """xDiT orders ranks tp-sp-pp-cfg-dp: a data-parallel index (here a group's rank) holds both CFG branches, so
    node k runs group k of both branches; the parallel VAE's ranks are the world's last."""
    topology = Topology.for_group_sizes((4, 2), cfg_degree=2, vae_ranks=1)
    assert [topology.processes_per_node(2, node) for node in (0, 1)] == [8, 5]
    assert topology.processes_per_node(1) == 13
    with pytest.raises(ValueError, match=r"^13 STADI ranks cannot be spread evenly over --nnodes 3 \(--stadi_groups "
                                         r"4,2 places one group per node on --nnodes 2; otherwise give each node's "
                                         r"--nproc_per_node\)$"):
        topology.processes_per_node(3)
    assert Topology.for_group_sizes((4, 2)).processes_per_node(3) == 2  # even spread: a group may span nodes


def test_output_names_carry_the_groups():
    from stadi_xdit.config import StadiConfig

    config = StadiConfig(use_stadi=True)
    assert config.output_label(False, Topology.for_group_sizes((2, 1))) == "stadi-full_g2-1"
    assert config.output_label(True, Topology.for_stadi_degree(2, ulysses_degree=2)) == "stadi-full_tc_u2"
    assert config.output_label(False, Topology.for_stadi_degree(2)) == "stadi-full"
    assert config.output_label(False) == "stadi-full"


def test_validate_reads_stadi_groups_and_counts_per_member_lists(monkeypatch):
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline
    from stadi_xdit.xdit.args import StadiArgs

    monkeypatch.setenv("WORLD_SIZE", "3")
    args = StadiArgs(use_stadi=True, stadi_groups="2,1", stadi_speeds="1,0.5", height=128, width=128,
                     num_inference_steps=4, warmup_steps=1, prompt="a cat")
    args.stadi_pipeline_class = StadiPixArtAlphaPipeline
    assert args.validate(3) == 2 and args.topology == Topology(3, stadi_degree=2, group_sizes=(2, 1))
    assert args.topology.data_parallel_degree == 3  # xDiT's flat branch
    args = StadiArgs(use_stadi=True, stadi_groups="2,1", stadi_speeds="1,0.5,1", height=128, width=128,
                     num_inference_steps=4, warmup_steps=1, prompt="a cat")
    with pytest.raises(ValueError, match=r"^--stadi_speeds has 3 values but the STADI group has 2 ranks$"):
        args.validate(3)


def test_a_twin_refuses_unequal_groups_it_cannot_run_before_any_stadi_group_exists():
    """The twin's own check (an xDiT script's pipeline, known only once built): before xDiT's runtime state or
    STADI's groups are made, one line naming --stadi_groups."""
    from stadi_xdit.cli_errors import StadiInputError
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline

    class WithoutGroups(StadiPixArtAlphaPipeline):
        ulysses_groups = False

    def pipeline(heads):
        return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(num_attention_heads=heads)))

    engine_config = SimpleNamespace(parallel_config=SimpleNamespace(ulysses_degree=1),
                                    topology=Topology.for_group_sizes((2, 1)))
    with pytest.raises(StadiInputError, match=r"^--stadi_groups 2,1 cannot run WithoutGroups: its family does not "
                                              r"run Ulysses inside STADI groups$"):
        object.__new__(WithoutGroups)._init_runtime_state(pipeline(4), engine_config)
    with pytest.raises(StadiInputError, match=r"^--stadi_groups 2,1 on SimpleNamespace: .*3"):
        object.__new__(StadiPixArtAlphaPipeline)._init_runtime_state(pipeline(3), engine_config)


def test_nodes_of_different_sizes_are_the_runs_of_each_ranks_node():
    from stadi_xdit.topology import node_group_sizes

    assert node_group_sizes(["0", "0", "1"]) == (2, 1)
    assert node_group_sizes(["0", "0", "0", "0", "1", "1"]) == (4, 2)
    assert node_group_sizes(["0", "0", "1", "1"]) is None  # equal nodes: flat STADI, as ever
    assert node_group_sizes(["0", "0", "0"]) is None  # one node
    assert node_group_sizes(["0", None, "1"]) is None  # not a torchrun launch: no node known
    assert node_group_sizes([]) is None
    # The topology those runs give: one member per node, each its own group; equal nodes change nothing.
    flat = Topology.for_stadi_degree(3)
    grouped = flat.grouped_by_nodes(["0", "0", "1"])
    assert (grouped.stadi_degree, grouped.group_sizes, grouped.world_size) == (2, (2, 1), 3)
    assert Topology.for_stadi_degree(4).grouped_by_nodes(["0", "0", "1", "1"]) is None
