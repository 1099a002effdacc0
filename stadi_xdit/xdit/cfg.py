"""Classifier-free guidance under STADI: both branches batched per rank, or one branch per rank.

With `--use_cfg_parallel`, xDiT's CFG group pairs rank r of the unconditional STADI group with
rank r of the conditional one. Both halves of a band must be denoised in lockstep (guidance mixes
them every step); `CfgPair` pairs the model inputs and outputs of one forward, and the pair's
shared plan (the slower speed, the larger cost) is `runtime/groups.py`'s (`StadiGroups`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stadi_xdit.runtime.comm import BandComm
from stadi_xdit.topology import CFG_BRANCHES


@dataclass(frozen=True)
class CfgPair:
    """This rank's part of classifier-free guidance: both branches as one batch, or (CFG parallel) one
    branch, its model inputs and outputs paired with the other branch's rank every forward."""

    enabled: bool  # guidance_scale > 1
    parallel: bool  # one branch per rank (cfg degree 2)
    branch: int  # 0: unconditional (negative prompt), 1: conditional; xDiT's convention
    comm: BandComm | None = None  # the CFG pair's collectives when parallel

    @classmethod
    def create(cls, do_cfg: bool, cfg_comm: BandComm) -> CfgPair:
        parallel = cfg_comm.world_size == CFG_BRANCHES
        if parallel and not do_cfg:
            raise ValueError("--use_cfg_parallel needs guidance_scale > 1")
        return cls(enabled=do_cfg, parallel=parallel, branch=cfg_comm.rank if parallel else 0,
                   comm=cfg_comm if parallel else None)

    def _pair(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches' copies of `tensor`, uncond first; bounded wait like every STADI collective."""
        both = self.comm.all_gather(tensor.unsqueeze(0), [1, 1], dim=0)
        return both[0], both[1]

    @property
    def batched(self) -> bool:
        """Both branches run on this rank, as a batch of two."""
        return self.enabled and not self.parallel

    def text_batch(self, negative: torch.Tensor, positive: torch.Tensor, negative_mask: torch.Tensor,
                   positive_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return positive, positive_mask
        if self.parallel:
            return (negative, negative_mask) if self.branch == 0 else (positive, positive_mask)
        return torch.cat([negative, positive]), torch.cat([negative_mask, positive_mask])

    def condition_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor]) if self.batched else tensor

    def model_input(self, band_latents: torch.Tensor) -> torch.Tensor:
        return self.condition_batch(band_latents)

    def guide(self, output: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.enabled:
            return output
        if self.parallel:
            uncond, cond = self._pair(output)
        else:
            uncond, cond = output.chunk(2)
        return uncond + scale * (cond - uncond)
