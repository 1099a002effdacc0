"""How a STADI launch's processes are used: one frozen `Topology`, one product rule. Pure Python.

Modelled on torchtitan's `ParallelDims`: the degrees are ruled here once, from the parsed arguments
and the launch size (always passed in, never read from the environment), and every place that
counts ranks (the `stadi-xdit` launcher, xDiT's `xdit` launcher hook, `StadiArgs.validate`, the
runner's capabilities) asks this module instead of keeping its own list.

    world_size = stadi_degree x cfg_degree x ulysses_degree x ring_degree + vae_ranks

Ring is always 1 (refused). Ulysses may be above 1 for a family whose twin runs Ulysses inside STADI
groups (`ulysses_groups`): each group of `ulysses_degree` consecutive ranks (xDiT's sequence-parallel
group) is then one STADI member. The launchers count it (`for_stadi_degree`); `StadiArgs.validate`,
which knows the family, lets it through (`from_args(..., ulysses_groups=True)`). `--stadi_groups 4,2`
names the members' group sizes instead (nodes of different sizes): equal sizes are `ulysses_degree`,
unequal ones `group_sizes`, and the world is their sum x CFG (+ VAE).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# xDiT's degrees (its flag names without `--`) that cannot be above 1 with --use_stadi: STADI uses
# every rank of a CFG branch itself.
REFUSED_WITH_STADI = ("ulysses_degree", "ring_degree", "pipefusion_parallel_degree", "tensor_parallel_degree",
                      "data_parallel_degree", "fully_shard_degree")
# Where STADI sits in xDiT's degree tuple (see stadi_xdit.xdit.args): refused as a user's flag, but
# the slot itself stays on, since a STADI run fills it.
STADI_SLOT = "data_parallel_degree"
CFG_BRANCHES = 2  # --use_cfg_parallel: a conditional and an unconditional branch


def refuse_degrees(values: Mapping[str, Any]) -> None:
    """A one-line error for the first degree in REFUSED_WITH_STADI set above 1 in `values` (degree
    name -> parsed value, or the flag's text as a command line spells it)."""
    for name in REFUSED_WITH_STADI:
        value = values.get(name)
        if value not in (None, 1, "1"):
            raise ValueError(f"--{name} {value} cannot be combined with --use_stadi "
                             "(STADI uses every rank of a CFG branch)")


def check_ulysses_heads(heads: Any, degree: int, model: str) -> None:
    """Ulysses gives each of its ranks heads / U of every attention (xDiT's, and STADI's groups): a one-line
    error where `model`'s `heads` (its transformer's `num_attention_heads`; None: unknown) do not divide."""
    if degree > 1 and isinstance(heads, int) and heads % degree:
        raise ValueError(f"--ulysses_degree {degree}: {model} has {heads} attention heads, not a multiple of {degree}")


def check_group_heads(heads: Any, sizes: tuple[int, ...], model: str) -> None:
    """`--stadi_groups`: each group's ranks take heads / its size, as Ulysses does; a one-line error for the first
    size that `model`'s `heads` (None: unknown) do not divide."""
    for size in sizes:
        if isinstance(heads, int) and heads % size:
            raise ValueError(f"--stadi_groups {','.join(map(str, sizes))}: {model} has {heads} attention heads, not a "
                             f"multiple of the group size {size}")


def checked_vae_ranks(value: Any) -> int:
    """`--vae_parallel_size` checked: ranks taken from the DiT for xDiT's VAE (0: none)."""
    if value is None:
        return 0
    # A runner dict may carry "1" or True; a negative count would enlarge the DiT world.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"--vae_parallel_size must be an integer >= 0, got {value!r}")
    return value


def check_stadi_degree(requested: int | None, ranks_per_branch: int) -> None:
    """`--stadi_degree`, where given, must be the number of ranks one CFG branch has."""
    if requested is not None and requested != ranks_per_branch:
        raise ValueError(f"--stadi_degree {requested} does not match the launch: {ranks_per_branch} "
                         "ranks per CFG branch (world size / CFG degree)")


def _degree_product(stadi_degree: int, cfg_degree: int, ulysses_degree: int = 1, ring_degree: int = 1) -> int:
    """The product rule's left side: the DiT ranks these degrees take."""
    return stadi_degree * cfg_degree * ulysses_degree * ring_degree


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class Topology:
    """A launch's ranks: `stadi_degree` per CFG branch, `cfg_degree` branches, `vae_ranks` for xDiT's
    parallel VAE. Constructing one checks the product rule, so every Topology is a valid layout."""

    world_size: int
    stadi_degree: int
    cfg_degree: int = 1
    vae_ranks: int = 0
    ulysses_degree: int = 1
    ring_degree: int = 1
    # Groups of unequal Ulysses degrees, one per STADI member in rank order (nodes of different sizes); None:
    # `stadi_degree` groups of `ulysses_degree`. xDiT's own groups cannot hold them: its data-parallel group
    # is then the whole CFG branch, its sequence-parallel degree 1, and STADI builds the groups itself.
    group_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        counts = {"--stadi_degree": self.stadi_degree, "--ulysses_degree": self.ulysses_degree,
                  "--ring_degree": self.ring_degree,
                  "the world size (--nproc_per_node x --nnodes)": self.world_size}
        for name, value in counts.items():
            if not _is_count(value, 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.cfg_degree not in (1, CFG_BRANCHES) or isinstance(self.cfg_degree, bool):
            raise ValueError(f"the CFG degree must be 1 or {CFG_BRANCHES} (--use_cfg_parallel), "
                             f"got {self.cfg_degree!r}")
        checked_vae_ranks(self.vae_ranks)
        refuse_degrees({"ring_degree": self.ring_degree})
        if self.group_sizes is not None:
            if any(not _is_count(size, 1) for size in self.group_sizes) or len(self.group_sizes) != self.stadi_degree:
                raise ValueError(f"STADI group sizes must be {self.stadi_degree} integers >= 1, got "
                                 f"{list(self.group_sizes)}")
            if len(set(self.group_sizes)) == 1:
                raise ValueError(f"STADI groups of equal sizes {list(self.group_sizes)} are --ulysses_degree "
                                 f"{self.group_sizes[0]} (xDiT's own groups)")
            if self.ulysses_degree != 1:
                raise ValueError(f"--ulysses_degree {self.ulysses_degree} cannot be combined with STADI groups of "
                                 "unequal sizes: each group's size is its Ulysses degree")
        if self.dit_ranks != self.degree_product:
            raise ValueError(f"the degrees do not fill the launch: --stadi_degree {self.stadi_degree} x CFG "
                             f"{self.cfg_degree} x Ulysses {self.ulysses_degree} x Ring {self.ring_degree} = "
                             f"{self.degree_product} DiT ranks, but world size {self.world_size} minus "
                             f"--vae_parallel_size {self.vae_ranks} is {self.dit_ranks}")

    @property
    def degree_product(self) -> int:
        """The DiT ranks the degrees describe (the product rule's left side)."""
        if self.group_sizes is not None:
            return sum(self.group_sizes) * self.cfg_degree
        return _degree_product(self.stadi_degree, self.cfg_degree, self.ulysses_degree, self.ring_degree)

    @property
    def unequal_groups(self) -> bool:
        """STADI's groups are of different sizes, built by STADI rather than by xDiT."""
        return self.group_sizes is not None

    @property
    def branch_ranks(self) -> int:
        """Ranks per CFG branch: xDiT's data-parallel group with unequal groups, else its STADI slot times U."""
        return self.degree_product // self.cfg_degree

    @property
    def data_parallel_degree(self) -> int:
        """xDiT's data-parallel slot, which STADI fills: the members of a branch, or with unequal groups (which xDiT's
        own groups cannot hold) every rank of the branch."""
        return self.branch_ranks // self.ulysses_degree

    @property
    def group_label(self) -> str:
        """What output names carry for the groups: `_u2` (equal groups of Ulysses-2), `_g2-1` (unequal), or nothing."""
        if self.unequal_groups:
            return "_g" + "-".join(map(str, self.group_sizes))
        return f"_u{self.ulysses_degree}" if self.ulysses_degree > 1 else ""

    @property
    def dit_ranks(self) -> int:
        """Ranks that run the DiT: the launch minus the parallel VAE's."""
        return self.world_size - self.vae_ranks

    @classmethod
    def from_args(cls, args: Any, world_size: int, *, ulysses_groups: bool = False,
                  group_sizes: tuple[int, ...] | None = None) -> Topology:
        """The topology of parsed arguments (xDiT's attribute names: args, a namespace) on a launch of
        `world_size` processes; a one-line error naming the flag when they cannot share it.
        `ulysses_groups`: the family runs Ulysses inside STADI groups (else --ulysses_degree is refused).
        `group_sizes`: `--stadi_groups`, parsed (StadiConfig.groups)."""
        kept = ("ulysses_degree",) if ulysses_groups else ()
        refuse_degrees({name: getattr(args, name, None) for name in REFUSED_WITH_STADI if name not in kept})
        given = getattr(args, "ulysses_degree", None)
        ulysses = 1 if given is None or not ulysses_groups else given
        if not _is_count(ulysses, 1):
            raise ValueError(f"--ulysses_degree must be an integer >= 1, got {ulysses!r}")
        vae = checked_vae_ranks(getattr(args, "vae_parallel_size", None))
        dit = world_size - vae
        if vae and dit < 1:
            raise ValueError(f"--vae_parallel_size {vae} leaves no rank for the DiT: the launch has "
                             f"{world_size} ranks, so --vae_parallel_size must be at most {world_size - 1}")
        cfg = CFG_BRANCHES if getattr(args, "use_cfg_parallel", False) else 1
        if group_sizes is not None:
            return cls._of_groups(group_sizes, world_size, cfg, vae, ulysses_groups=ulysses_groups, ulysses=ulysses)
        if dit < cfg * ulysses or dit % (cfg * ulysses):
            of = f" (world size {world_size} minus --vae_parallel_size {vae})" if vae else ""
            flags = " and ".join([*(["--use_cfg_parallel"] if cfg > 1 else []),
                                  *([f"--ulysses_degree {ulysses}"] if ulysses > 1 else [])])
            raise ValueError(f"{dit} DiT ranks{of} must be a multiple of {cfg * ulysses} with {flags}")
        return cls(world_size, stadi_degree=dit // (cfg * ulysses), cfg_degree=cfg, vae_ranks=vae,
                   ulysses_degree=ulysses)

    @classmethod
    def _of_groups(cls, sizes: tuple[int, ...], world_size: int, cfg: int, vae: int, *, ulysses_groups: bool,
                   ulysses: int) -> Topology:
        """`--stadi_groups`: equal sizes as xDiT's own Ulysses groups, unequal ones as STADI's."""
        shown = ",".join(map(str, sizes))
        if not ulysses_groups:
            raise ValueError(f"--stadi_groups {shown}: this model's family does not run Ulysses inside STADI groups")
        if ulysses > 1:
            raise ValueError(f"--stadi_groups {shown} cannot be combined with --ulysses_degree {ulysses}: each group's "
                             "size is its Ulysses degree")
        needed = sum(sizes) * cfg
        if world_size - vae != needed:
            how = "".join([" x 2 with --use_cfg_parallel" if cfg > 1 else "",
                           f" + --vae_parallel_size {vae}" if vae else ""])
            raise ValueError(f"--stadi_groups {shown} needs {needed + vae} processes"
                             f"{f' ({sum(sizes)}{how})' if how else ''}, but the launch has {world_size}")
        if len(set(sizes)) == 1:
            return cls(world_size, stadi_degree=len(sizes), cfg_degree=cfg, vae_ranks=vae, ulysses_degree=sizes[0])
        return cls(world_size, stadi_degree=len(sizes), cfg_degree=cfg, vae_ranks=vae, group_sizes=tuple(sizes))

    @classmethod
    def for_group_sizes(cls, sizes: tuple[int, ...], cfg_degree: int = 1, vae_ranks: int = 0,
                        ulysses_degree: int = 1) -> Topology:
        """The launch that `--stadi_groups` needs (the launcher's process count); `ulysses_degree`, as given beside
        it, is refused there as in `from_args`."""
        return cls._of_groups(sizes, sum(sizes) * cfg_degree + vae_ranks, cfg_degree, vae_ranks,
                              ulysses_groups=True, ulysses=ulysses_degree)

    @classmethod
    def for_stadi_degree(cls, stadi_degree: int, cfg_degree: int = 1, vae_ranks: int = 0,
                         ulysses_degree: int = 1) -> Topology:
        """The launch that `stadi_degree` members per CFG branch need (the launcher's process count)."""
        world_size = _degree_product(stadi_degree, cfg_degree, ulysses_degree) + vae_ranks
        return cls(world_size, stadi_degree=stadi_degree, cfg_degree=cfg_degree, vae_ranks=vae_ranks,
                   ulysses_degree=ulysses_degree)

    def check_groups(self, band_size: int, cfg_size: int, sequence_size: int = 1) -> None:
        """xDiT's process groups, as built, must be the ones this topology describes (once per pipeline):
        a STADI group of `stadi_degree` ranks per CFG branch, a CFG pair of `cfg_degree`, sequence-parallel
        groups of `ulysses_degree`."""
        expected = ((self.branch_ranks, self.cfg_degree, 1) if self.unequal_groups
                    else (self.stadi_degree, self.cfg_degree, self.ulysses_degree))
        if (band_size, cfg_size, sequence_size) != expected:
            raise ValueError(f"xDiT built STADI groups of {band_size} ranks, CFG groups of {cfg_size} and "
                             f"sequence-parallel groups of {sequence_size}, but the launch was checked for "
                             f"--stadi_degree {self.stadi_degree}, CFG degree {self.cfg_degree} and "
                             f"--ulysses_degree {self.ulysses_degree}")

    def xdit_degrees(self, strategy: str, pipeline_patches: int | None = None) -> dict[str, Any]:
        """xDiT's flags (attribute names) that run these ranks with one of xDiT's own strategies instead of
        STADI, each CFG branch's ranks as one Ulysses, Ring or PipeFusion group: the bench's baselines, on
        the same ranks as the STADI arm. `pipeline_patches`: PipeFusion's patch count (default: its degree)."""
        degree = self.stadi_degree
        flags: dict[str, Any] = {"ulysses": {"ulysses_degree": degree}, "ring": {"ring_degree": degree},
                                 "pipefusion": {"pipefusion_parallel_degree": degree,
                                                "num_pipeline_patch": pipeline_patches or degree}}.get(strategy)
        if flags is None:
            raise ValueError(f"xDiT strategy must be ulysses, ring or pipefusion, got {strategy!r}")
        if self.cfg_degree > 1:
            flags["use_cfg_parallel"] = True
        return flags

    def grouped_by_nodes(self, nodes: Sequence[object]) -> Topology | None:
        """This topology with one STADI member per node (Ulysses inside it), where the nodes differ in size:
        `nodes` holds each rank's node, in rank order, over one CFG branch. None where the nodes are equal or
        a node is unknown (not a torchrun launch): the members stay as they are."""
        sizes = node_group_sizes(nodes)
        return None if sizes is None else dataclasses.replace(self, stadi_degree=len(sizes), group_sizes=sizes)

    def processes_per_node(self, nnodes: int, node_rank: int = 0) -> int:
        """torchrun's --nproc_per_node on node `node_rank` of `nnodes`. Unequal groups, one per node: that node's
        group (both CFG branches of it: xDiT orders the CFG pair inside a data-parallel index), and the parallel
        VAE's ranks (the last ones) on the last node. Otherwise the world spread evenly."""
        if not _is_count(nnodes, 1):
            raise ValueError(f"--nnodes must be an integer >= 1, got {nnodes}")
        if self.unequal_groups and nnodes == self.stadi_degree:
            last = self.vae_ranks if node_rank == nnodes - 1 else 0
            return self.group_sizes[node_rank] * self.cfg_degree + last
        if self.world_size % nnodes:
            where = (f" (--stadi_groups {','.join(map(str, self.group_sizes))} places one group per node on "
                     f"--nnodes {self.stadi_degree}; otherwise give each node's --nproc_per_node)"
                     if self.unequal_groups else "")
            raise ValueError(f"{self.world_size} STADI ranks cannot be spread evenly over --nnodes {nnodes}{where}")
        return self.world_size // nnodes


def node_group_sizes(nodes: Sequence[object]) -> tuple[int, ...] | None:
    """The sizes of the runs of consecutive ranks on one node (`nodes`: each rank's node, in rank order), where
    the nodes differ in size; None where they are equal, or a node is unknown (not a torchrun launch)."""
    if not nodes or any(node is None for node in nodes):
        return None
    sizes = [len(list(run)) for _, run in itertools.groupby(nodes)]
    return tuple(sizes) if len(set(sizes)) > 1 else None
