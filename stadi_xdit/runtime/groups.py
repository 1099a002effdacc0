"""`StadiGroups`: the collectives of one STADI rank, built once per pipeline and handed down.

Two groups matter. The band group holds the ranks that split one image (xDiT's data-parallel
group: one per CFG branch); the CFG pair holds the two ranks, one per branch, that own the same
band (size 1 without `--use_cfg_parallel`). Both use bounded waits and name a failed peer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from stadi_xdit.runtime.comm import BandComm


@dataclass
class StadiGroups:
    band: BandComm
    cfg: BandComm

    @property
    def is_leader(self) -> bool:
        """STADI rank 0 of CFG branch 0: the one rank that reads and writes the profile cache."""
        return self.band.rank == 0 and self.cfg.rank == 0

    def gather_text(self, text: str, device: torch.device, phase: str = "profile-cache") -> list[list[str]]:
        """`text` of every rank: one list per CFG branch, each in band-rank order (`phase` names the
        step in the progress a failed peer is reported with)."""
        self.band.enter(phase)
        branch = self.band.all_gather_text(text, device)
        return [json.loads(b) for b in self.cfg.all_gather_text(json.dumps(branch), device)]

    def from_leader(self, value: Any, device: torch.device) -> Any:
        """The leader's JSON-serialisable `value`, on every rank."""
        return json.loads(self.gather_text(json.dumps(value), device)[0][0])

    def pair_max(self, value: float, device: torch.device) -> float:
        """The larger of the CFG pair's values (a cost both branches must plan on alike)."""
        return self._pair_reduce([value], device, torch.maximum)[0]

    def _pair_reduce(self, values: list[float], device: torch.device, reduce) -> list[float]:
        if self.cfg.world_size == 1:
            return values
        both = self.cfg.all_gather(torch.tensor([values], dtype=torch.float64, device=device), [1, 1], dim=0)
        return reduce(both[0], both[1]).tolist()
