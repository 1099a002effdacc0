"""From a planner `Plan` (token rows) to tensor coordinates (latent rows and token indices)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stadi_xdit.planner import Plan


@dataclass(frozen=True)
class BandLayout:
    """Contiguous bands of token rows, one per rank, in rank order.

    A token row is `patch_rows` latent rows high (the backbone's patch size: 2 for PixArt; 1 for
    Flux, whose runtime state counts its 2x2-packed latents with a VAE scale of 16) and
    `tokens_per_row` tokens wide.
    """

    token_rows: tuple[tuple[int, int], ...]
    patch_rows: int
    tokens_per_row: int

    @classmethod
    def from_plan(cls, plan: Plan, patch_rows: int, tokens_per_row: int) -> BandLayout:
        return cls(tuple(plan.row_bounds()), patch_rows, tokens_per_row)

    @property
    def world_size(self) -> int:
        return len(self.token_rows)

    def latent_rows(self, rank: int) -> tuple[int, int]:
        start, end = self.token_rows[rank]
        return start * self.patch_rows, end * self.patch_rows

    def latent_row_counts(self) -> list[int]:
        return [(end - start) * self.patch_rows for start, end in self.token_rows]

    def token_range(self, rank: int) -> tuple[int, int]:
        start, end = self.token_rows[rank]
        return start * self.tokens_per_row, end * self.tokens_per_row

    def token_counts(self) -> list[int]:
        return [(end - start) * self.tokens_per_row for start, end in self.token_rows]


@dataclass(frozen=True)
class BandGeometry:
    """How an image of one size is cut into bands: what the planner plans on, and its tensor units."""

    rows: int  # token rows of the image (the planner's unit)
    patch_rows: int  # latent rows per token row
    tokens_per_row: int
    align: int = 1  # bands are whole multiples of this many token rows

    def layout(self, plan: Plan) -> BandLayout:
        return BandLayout.from_plan(plan, self.patch_rows, self.tokens_per_row)


def slice_band(full: torch.Tensor, sizes: list[int], rank: int, dim: int) -> torch.Tensor:
    """Rank `rank`'s band of `full`, where bands of `sizes` lie in rank order along `dim`."""
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()
