"""Image grids of toy latents: e.g. the same seeds under single / uniform / spatial / full, one row each.

Latents are shown through `stadi_xdit.toy.data.decode_to_rgb` (the stand-in for a VAE decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from stadi_xdit.paths import save_figure
from stadi_xdit.toy import data

__all__ = ["latents_grid", "save_image_grid"]


def _rows(rows_of_latents) -> list[torch.Tensor]:
    rows = [torch.as_tensor(r).detach().float().cpu() for r in rows_of_latents]
    rows = [r[None] if r.dim() == 3 else r for r in rows]
    if not rows:
        raise ValueError("no rows to draw")
    for r in rows:
        if r.dim() != 4 or r.shape[1] != data.CHANNELS:
            raise ValueError(f"each row must be latents [N, {data.CHANNELS}, H, W], got {tuple(r.shape)}")
    return rows


def latents_grid(rows_of_latents: Sequence[torch.Tensor], scale: int = 4, pad: int = 2) -> torch.Tensor:
    """One RGB image ``[3, H, W]`` in [0, 1]: row ``i`` shows the images of ``rows_of_latents[i]``.

    Rows may differ in length; missing cells stay white. ``pad`` white pixels separate the cells.
    """
    rows = _rows(rows_of_latents)
    h, w = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    cols = max(r.shape[0] for r in rows)
    grid = torch.ones(3, len(rows) * (h + pad) + pad, cols * (w + pad) + pad)
    for i, row in enumerate(rows):
        rgb = data.decode_to_rgb(row, scale=scale)
        for j in range(row.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = rgb[j]
    return grid


def save_image_grid(path: str | Path, rows_of_latents: Sequence[torch.Tensor], labels: Sequence[str] | None = None,
                    col_labels: Sequence[str] | None = None, title: str | None = None, scale: int = 4,
                    boundaries: Sequence[int] = (), dpi: int = 100) -> Path:
    """Save a grid of decoded latents (matplotlib, Agg): one row per entry of ``rows_of_latents``.

    ``labels`` name the rows (e.g. the arms), ``col_labels`` the columns (e.g. seeds or classes);
    ``boundaries`` (latent rows, e.g. `metrics.band_boundary_rows`) are drawn as thin dashed lines
    across every image, to look for seams. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(rows_of_latents)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    cols = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols + (1.2 if labels else 0.2), 1.45 * len(rows) + 0.4),
                             squeeze=False)
    for i, row in enumerate(rows):
        rgb = data.decode_to_rgb(row, scale=scale)
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j >= row.shape[0]:
                continue
            ax.imshow(rgb[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            for b in boundaries:
                ax.axhline(b * scale - 0.5, color="white", linewidth=0.6, linestyle=(0, (2, 2)), alpha=0.7)
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(str(col_labels[j]), fontsize=8)
        if labels is not None:
            axes[i][0].set_ylabel(str(labels[i]), fontsize=9, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    saved = save_figure(fig, Path(path), "image grid", dpi=dpi)
    plt.close(fig)
    return saved
