"""From a planner `Plan` (token rows) to tensor coordinates (latent rows and token indices)."""

from __future__ import annotations

import functools
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

    def split(self, parts: int) -> BandLayout:
        """Each band cut into `parts` runs of token rows, in order, as equal as whole rows allow (the first
        `rows % parts` one row longer): with Ulysses inside STADI groups, band `g` is group `g`'s and part
        `g * parts + p` is the one its sequence rank `p` computes."""
        return self.split_groups((parts,) * self.world_size)

    def split_groups(self, group_sizes: tuple[int, ...]) -> BandLayout:
        """Band `m` cut into `group_sizes[m]` parts, as `split` cuts every band into one count: the parts of
        STADI members that are Ulysses groups of different degrees, in rank order."""
        if len(group_sizes) != self.world_size:
            raise ValueError(f"{len(group_sizes)} group sizes for a layout of {self.world_size} bands")
        if set(group_sizes) == {1}:
            return self
        bounds = tuple(part for rank, parts in enumerate(group_sizes) for part in self.band_parts(rank, parts))
        return BandLayout(bounds, self.patch_rows, self.tokens_per_row)

    def band_parts(self, rank: int, parts: int) -> list[tuple[int, int]]:
        """Band `rank`'s token rows cut into `parts` runs, as `split` cuts every band."""
        start, end = self.token_rows[rank]
        if end - start < parts:
            raise ValueError(f"a band of {end - start} token rows cannot be split into {parts} parts "
                             f"(the plan's alignment must be at least the Ulysses degree)")
        each, extra = divmod(end - start, parts)
        bounds = []
        for p in range(parts):
            bounds.append((start, start + each + (p < extra)))
            start = bounds[-1][1]
        return bounds


@dataclass(frozen=True)
class BandView:
    """One rank's band of a layout: the one holder of its global token range.

    The loop makes one per layout (`_Call._install`) and hands it to the K/V store, to the family's
    positions (`InjectionPlan.positions`) and to the band model; each reads the range from here, and
    family code slices global positions (RoPE tables, position ids) with `positions`.
    """

    layout: BandLayout
    rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.layout.world_size:
            raise ValueError(f"rank {self.rank} has no band in a layout of {self.layout.world_size}")

    @classmethod
    def of_token_counts(cls, counts: list[int] | tuple[int, ...], rank: int) -> BandView:
        """Bands of `counts` tokens each, one token per row (a store or an exchange without an image)."""
        bounds, start = [], 0
        for count in counts:
            bounds.append((start, start + int(count)))
            start += int(count)
        return cls(BandLayout(tuple(bounds), patch_rows=1, tokens_per_row=1), rank)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # Read by every displaced attention layer in every forward: worked out once per view.
    @functools.cached_property
    def token_range(self) -> tuple[int, int]:
        """[start, end) of this band among the image's (or clip's) tokens."""
        return self.layout.token_range(self.rank)

    @functools.cached_property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(self.layout.token_counts())

    @property
    def num_tokens(self) -> int:
        start, end = self.token_range
        return end - start

    def part_counts(self, parts: int) -> tuple[int, ...]:
        """Tokens of each of the `parts` parts of this band (`BandLayout.split`): what each of a group's Ulysses
        ranks computes."""
        return tuple((end - start) * self.layout.tokens_per_row for start, end in self.layout.band_parts(self.rank, parts))

    def positions(self, table: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The band's rows of `table`, whose `dim` indexes every token of the image (ids, RoPE tables)."""
        start, end = self.token_range
        if table.shape[dim] != sum(self.token_counts):
            raise RuntimeError(f"positions for {table.shape[dim]} tokens along dim {dim}, but the image has "
                               f"{sum(self.token_counts)}: give the full image's positions")
        return table.narrow(dim, start, end - start)


@dataclass(frozen=True)
class BandGeometry:
    """How an image of one size is cut into bands: what the planner plans on, and its tensor units."""

    rows: int  # token rows the planner plans on: the image's, but `extra_rows`
    patch_rows: int  # latent rows per token row
    tokens_per_row: int
    align: int = 1  # bands are whole multiples of this many token rows
    # Rows of the image past the last whole `align` unit (fewer than `align`): the last band takes them. The plan
    # stays in whole units; a group of Ulysses ranks splits a band of any length into parts of whole rows.
    extra_rows: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.extra_rows < self.align:
            raise ValueError(f"extra rows must be in [0, align={self.align}), got {self.extra_rows}")

    @classmethod
    def of_rows(cls, rows: int, patch_rows: int, tokens_per_row: int, align: int = 1) -> BandGeometry:
        """The geometry of an image of `rows` token rows whose bands are planned in `align`-row units."""
        return cls(rows=rows - rows % align, patch_rows=patch_rows, tokens_per_row=tokens_per_row, align=align,
                   extra_rows=rows % align)

    @property
    def image_rows(self) -> int:
        return self.rows + self.extra_rows

    def layout(self, plan: Plan) -> BandLayout:
        layout = BandLayout.from_plan(plan, self.patch_rows, self.tokens_per_row)
        if not self.extra_rows:
            return layout
        *bands, (start, end) = layout.token_rows
        return BandLayout((*bands, (start, end + self.extra_rows)), self.patch_rows, self.tokens_per_row)


def slice_band(full: torch.Tensor, sizes: list[int], rank: int, dim: int) -> torch.Tensor:
    """Rank `rank`'s band of `full`, where bands of `sizes` lie in rank order along `dim`."""
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()
