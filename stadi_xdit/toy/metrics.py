"""Coherence metrics of `stadi_xdit.toy.data` scenes: exact, and free of any learned network.

Each metric reads a property a band cannot get right on its own (see `stadi_xdit.toy.data`):

* ``symmetry_error``: mean ``|x - flip_rows(x)|`` over all channels (0 on the data set);
* ``color_match``: rate of images whose top shape and bottom shape are both found (mask channel)
  and have the same nearest palette colour;
* ``pole_continuity``: fraction of rows whose pole (the whitest 2-column window) sits within one
  column of the image's median pole column, so a pole broken at a band boundary loses those rows;
* ``horizon_continuity``: fraction of columns whose two midline rows (15 and 16, on both sides of
  the 2-rank band boundary) both show the horizon colour;
* ``background_accuracy`` and ``shape_accuracy``: conditioning: the edge-row background colour is
  the class's, the top shape's fill ratio is the class's shape (disc/square/diamond).

`coherence_metrics` returns all of them as a dict of floats; `ground_truth_metrics` the same on
fresh data-set samples (symmetry 0, every rate 1). `row_error_profile` shows seams at band
boundaries: the mean absolute error of each latent row between two batches.
"""

from __future__ import annotations

import torch

from stadi_xdit.toy import data

__all__ = [
    "METRIC_NAMES",
    "background_accuracy",
    "band_boundary_rows",
    "coherence_metrics",
    "color_match_rate",
    "ground_truth_metrics",
    "horizon_continuity",
    "pole_continuity",
    "row_error_profile",
    "shape_accuracy",
    "symmetry_error",
]

METRIC_NAMES = ("symmetry_error", "color_match", "pole_continuity", "horizon_continuity",
                "background_accuracy", "shape_accuracy")
# Higher is better for every metric but these:
LOWER_IS_BETTER = ("symmetry_error",)

MIN_SHAPE_PIXELS = 12  # the smallest shape (a 5x5 square) covers 25 latent pixels,
MAX_SHAPE_PIXELS = 160  # the largest (a radius-5.3 disc) about 90; noise covers half of a half (256)
SHAPE_COLOR_TOLERANCE = 0.6  # L2 distance in latent RGB from a shape's mean colour to its palette colour
POLE_MIN = 0.4  # min over RGB of a pole pixel is 0.85; of anything else at most 0.8 (yellow: -0.7)
HORIZON_TOLERANCE = 0.5  # L2 distance in latent RGB to HORIZON_COLOR


def _check(latents: torch.Tensor) -> torch.Tensor:
    if latents.dim() != 4 or latents.shape[1] != data.CHANNELS:
        raise ValueError(f"expected latents [B, {data.CHANNELS}, H, W], got {tuple(latents.shape)}")
    return latents.detach().float().cpu()


def symmetry_error(latents: torch.Tensor) -> torch.Tensor:
    """Per image: mean ``|x - flip_rows(x)|`` over channels, rows and columns ([B])."""
    x = _check(latents)
    return (x - data.flip_rows(x)).abs().mean(dim=(1, 2, 3))


def _nearest(colors: torch.Tensor, table: dict) -> torch.Tensor:
    palette = torch.tensor(list(table.values()), dtype=torch.float32)
    return torch.cdist(colors, palette).argmin(dim=-1)


def _half_shape(x: torch.Tensor, top: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(palette index [B] of one half's shape, whether a shape is found [B]).

    The shape is the mask channel's positive pixels; it is found when their count is shape-like and
    their mean colour lies near a palette colour (noise, or a smear of colours, is no shape).
    """
    half = x.shape[2] // 2
    part = x[:, :, :half] if top else x[:, :, half:]
    mask = (part[:, 3] > 0).float()  # [B, h, W]
    count = mask.sum(dim=(1, 2))
    color = (part[:, :3] * mask[:, None]).sum(dim=(2, 3)) / count.clamp(min=1)[:, None]
    palette = torch.tensor(list(data.SHAPE_COLORS.values()), dtype=torch.float32)
    distance, index = torch.cdist(color, palette).min(dim=-1)
    found = (count >= MIN_SHAPE_PIXELS) & (count <= MAX_SHAPE_PIXELS) & (distance < SHAPE_COLOR_TOLERANCE)
    return index, found


def color_match_rate(latents: torch.Tensor) -> torch.Tensor:
    """Per image: 1.0 when both halves hold a shape and their nearest palette colours agree ([B])."""
    x = _check(latents)
    top, top_found = _half_shape(x, True)
    bottom, bottom_found = _half_shape(x, False)
    return (top_found & bottom_found & (top == bottom)).float()


def _pole_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first column of the whitest 2-column window [B, H], whether that window is a pole [B, H])."""
    whiteness = x[:, :3].min(dim=1).values  # [B, H, W]
    window = torch.minimum(whiteness[..., :-1], whiteness[..., 1:])  # both columns white
    value, column = window.max(dim=-1)
    return column, value > POLE_MIN


def pole_continuity(latents: torch.Tensor) -> torch.Tensor:
    """Per image: fraction of rows whose pole is present within one column of the median pole column."""
    x = _check(latents)
    column, present = _pole_columns(x)
    # Median over the rows that show a pole (rows without one count as broken).
    big = torch.where(present, column.float(), torch.full_like(column, 10_000, dtype=torch.float32))
    counts = present.sum(dim=1)
    ordered = big.sort(dim=1).values
    median = ordered.gather(1, ((counts - 1).clamp(min=0) // 2)[:, None])  # lower median of present rows
    near = present & ((column.float() - median).abs() <= 1)
    return near.float().mean(dim=1)


def horizon_continuity(latents: torch.Tensor) -> torch.Tensor:
    """Per image: fraction of columns (off the pole) where rows 15 and 16 both show the horizon colour."""
    x = _check(latents)
    mid = x.shape[2] // 2
    rows = x[:, :3, mid - 1:mid + 1]  # [B, 3, 2, W]
    target = torch.tensor(data.HORIZON_COLOR)[None, :, None, None]
    is_horizon = ((rows - target).norm(dim=1) < HORIZON_TOLERANCE).all(dim=1)  # [B, W]
    # Columns under the pole are exempt: the pole is drawn over the horizon.
    whiteness = rows.min(dim=1).values.max(dim=1).values  # [B, W]
    off_pole = whiteness <= POLE_MIN
    ok = (is_horizon & off_pole).sum(dim=1).float()
    return ok / off_pole.sum(dim=1).clamp(min=1).float()


def background_accuracy(latents: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Per image: 1.0 when the median colour of the two edge rows is nearest the class's background."""
    x = _check(latents)
    edges = torch.cat([x[:, :3, :1], x[:, :3, -1:]], dim=2).flatten(2)  # [B, 3, 2W]
    color = edges.median(dim=-1).values  # the pole covers 2 of 32 columns: the median ignores it
    found = _nearest(color, data.BACKGROUND_COLORS)
    return (found == data.class_background(class_ids).cpu()).float()


def shape_accuracy(latents: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Per image: 1.0 when the top shape's fill ratio (mask area / bounding box) gives the class's shape.

    Disc ~0.75-0.8, square 1.0, diamond ~0.5; the cuts are 0.64 and 0.9. No shape found (as for
    ``color_match``) counts as wrong.
    """
    x = _check(latents)
    half = x.shape[2] // 2
    mask = x[:, 3, :half] > 0  # [B, h, W]
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    # Bounding box from the first and last rows/columns that hold mask pixels.
    def extent(any_: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(any_.shape[1])
        first = torch.where(any_, idx, any_.shape[1]).min(dim=1).values
        last = torch.where(any_, idx, -1).max(dim=1).values
        return (last - first + 1).clamp(min=0)

    box = (extent(rows) * extent(cols)).float()
    area = mask.sum(dim=(1, 2)).float()
    fill = area / box.clamp(min=1)
    shape = torch.where(fill >= 0.9, 1, torch.where(fill >= 0.64, 0, 2))
    _, found = _half_shape(x, True)
    return (found & (shape == data.class_shape(class_ids).cpu())).float()


def coherence_metrics(latents: torch.Tensor, class_ids: torch.Tensor | list[int]) -> dict[str, float]:
    """The data set's coherence metrics of a batch, averaged over its images (see the module doc)."""
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    if ids.shape[0] != latents.shape[0]:
        raise ValueError(f"{ids.shape[0]} class ids for {latents.shape[0]} images")
    return {
        "symmetry_error": float(symmetry_error(latents).mean()),
        "color_match": float(color_match_rate(latents).mean()),
        "pole_continuity": float(pole_continuity(latents).mean()),
        "horizon_continuity": float(horizon_continuity(latents).mean()),
        "background_accuracy": float(background_accuracy(latents, ids).mean()),
        "shape_accuracy": float(shape_accuracy(latents, ids).mean()),
    }


def ground_truth_metrics(batch: int = 256, seed: int = 0) -> dict[str, float]:
    """`coherence_metrics` of fresh data-set samples: the reference values (symmetry 0, rates 1)."""
    latents, class_ids = data.sample_batch(seed, batch)
    return coherence_metrics(latents, class_ids)


def row_error_profile(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each latent row between ``a`` and ``b`` ([..., C, H, W] -> [H]).

    Averaged over batch, channels and columns; a seam at a band boundary shows as a peak at the
    boundary rows (`band_boundary_rows`).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 3:
        raise ValueError(f"expected [..., C, H, W], got {tuple(a.shape)}")
    diff = (a.detach().float().cpu() - b.detach().float().cpu()).abs()
    return diff.movedim(-2, 0).reshape(diff.shape[-2], -1).mean(dim=1)


def band_boundary_rows(latent_rows_per_band: list[int] | tuple[int, ...]) -> list[int]:
    """The first latent row of every band but the first: where a seam would show in a row profile."""
    rows, start = [], 0
    for count in latent_rows_per_band[:-1]:
        start += int(count)
        rows.append(start)
    return rows
