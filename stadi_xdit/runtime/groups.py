"""`StadiGroups`: the collectives of one STADI rank, built once per pipeline and handed down.

Three groups matter. The band group holds the ranks that split one image (xDiT's data-parallel
group: one per CFG branch); the CFG pair holds the two ranks, one per branch, that own the same
band (size 1 without `--use_cfg_parallel`); with `--ulysses_degree U`, the sequence group holds the U
ranks of one STADI member (xDiT's sequence-parallel group), which split its band evenly. All use
bounded waits and name a failed peer.

The ranks of a CFG pair and of a sequence group must plan alike, so what the planner reads is gathered
over all three (`gather_text`: one list per planning branch) and taken at its slowest.

Groups of unequal degrees (`shards`, `runtime/head_shards.py`: nodes of different sizes) have no set of
equal peers, one per group: the band group then holds every rank of the CFG branch, and what the planner
and the loop read per STADI member (`member`, `members`, `per_member`) is folded from it by group.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from stadi_xdit.runtime.comm import BandComm
from stadi_xdit.runtime.head_shards import HeadShards


@dataclass
class StadiGroups:
    band: BandComm
    cfg: BandComm
    sequence: BandComm | None = None  # None: one rank per STADI member (no Ulysses inside it)
    shards: HeadShards | None = None  # groups of unequal degrees: `band` is then the whole CFG branch

    @property
    def member(self) -> int:
        """This rank's STADI member: its band in every layout."""
        return self.band.rank if self.shards is None else self.shards.member_of(self.band.rank)[0]

    @property
    def members(self) -> int:
        """STADI members per CFG branch: the bands of a layout."""
        return self.band.world_size if self.shards is None else self.shards.members

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Each member's ranks (its Ulysses degree), in rank order."""
        return (self.sequence_size,) * self.members if self.shards is None else self.shards.group_sizes

    @property
    def align(self) -> int:
        """Token rows a plan's bands come in: every group splits its band into whole rows per rank."""
        return math.lcm(*self.group_sizes)

    @property
    def part(self) -> int:
        """This rank's part among all members' parts (`BandLayout.split_groups`): what it computes."""
        return self.member * self.sequence_size + self.sequence_rank if self.shards is None else self.band.rank

    def per_member(self, values: list) -> list:
        """One entry per member from one per band rank: a group's first rank's (its ranks decide alike)."""
        return values if self.shards is None else [values[self.shards.ranks_of(m)[0]] for m in range(self.members)]

    @property
    def sequence_size(self) -> int:
        return 1 if self.sequence is None else self.sequence.world_size

    @property
    def sequence_rank(self) -> int:
        return 0 if self.sequence is None else self.sequence.rank

    @property
    def planning_branches(self) -> int:
        """Lists `gather_text` returns: one per CFG branch and sequence rank."""
        return self.cfg.world_size * (self.sequence_size if self.shards is None else max(self.shards.group_sizes))

    @property
    def is_leader(self) -> bool:
        """STADI rank 0 of CFG branch 0 (sequence rank 0): the one rank that reads and writes the profile cache."""
        return self.band.rank == 0 and self.cfg.rank == 0 and self.sequence_rank == 0

    def gather_text(self, text: str, device: torch.device, phase: str = "profile-cache") -> list[list[str]]:
        """`text` of every rank: one list per CFG branch and sequence rank (branch-major), each in band-rank
        order (`phase` names the step in the progress a failed peer is reported with)."""
        self.band.enter(phase)
        lists = [self.band.all_gather_text(text, device)]
        if self.shards is not None:  # every rank's text already: list p holds each member's rank p (or its last)
            ranks = [self.shards.ranks_of(m) for m in range(self.members)]
            lists = [[lists[0][group[min(p, len(group) - 1)]] for group in ranks]
                     for p in range(max(self.shards.group_sizes))]
        elif self.sequence_size > 1:
            lists = [json.loads(b) for b in self.sequence.all_gather_text(json.dumps(lists[0]), device)]
        return [branch for lists_of_branch in self.cfg.all_gather_text(json.dumps(lists), device)
                for branch in json.loads(lists_of_branch)]

    def from_leader(self, value: Any, device: torch.device) -> Any:
        """The leader's JSON-serialisable `value`, on every rank."""
        return json.loads(self.gather_text(json.dumps(value), device)[0][0])

    def planning_max(self, value: float, device: torch.device) -> float:
        """The largest of the values of the ranks that must plan alike: the CFG pair and the sequence group."""
        for comm in (self.cfg, self.sequence):
            if comm is not None and comm.world_size > 1:
                value = max(comm.all_gather_floats(value, device))
        return value
