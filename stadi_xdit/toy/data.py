"""A procedural, class-conditioned data set of 4-channel 32x32 "latent images" with long-range structure.

Why latents and no autoencoder: the toy DiT (`stadi_xdit.toy.model`) is trained on these 4-channel
images *directly*, as if they were scaled VAE latents. Training an autoencoder alongside would not
fit the CPU budget (the whole training must fit in well under an hour on 2 cores), so there is no
learned latent space: the "latent" is the image, and `decode_to_rgb` (first three channels to
[0, 1], nearest-upsampled) is the fixed stand-in for a VAE decoder, used for display only.

A 32x32 latent is 16 token rows at patch 2: enough to band over 2-4 ranks. Every scene is built
so that a band cannot be denoised correctly without the others:

* the whole scene is **mirror-symmetric about the horizontal midline** (rows ``y`` and ``31 - y``
  are equal): the top half is drawn and flipped onto the bottom half;
* a **shape** in the top half (disc, square or diamond, per class) has a colour drawn per sample
  from `SHAPE_COLORS`; its mirror image in the bottom half must have the same colour;
* a **pole**, a white vertical bar two latent columns wide at a random column, runs through the
  full height, through every band boundary;
* a **horizon**, a light-cyan horizontal stripe of random thickness (1-3 rows per half), runs across
  the full width and straddles the midline (the 2-rank band boundary).

Channels: 0-2 are colour ("RGB" in [-1, 1]), channel 3 is a shape mask (+0.9 on the shape, -0.9
elsewhere, anti-aliased edges). Values stay in [-1, 1], as for scaled latents.

The class picks the background colour (4, `BACKGROUND_COLORS`) and the shape (3, `SHAPES`): 12
classes. A class is conditioned through a fixed caption embedding from a seeded table
(`caption_embeds`), with a fixed `null_embeds` for classifier-free guidance.

Everything is deterministic from a seed (a `torch.Generator`), on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BACKGROUND_COLORS",
    "CAPTION_CHANNELS",
    "CAPTION_TOKENS",
    "CHANNELS",
    "CLASS_NAMES",
    "HALF",
    "HORIZON_COLOR",
    "NUM_CLASSES",
    "POLE_COLOR",
    "SHAPES",
    "SHAPE_COLORS",
    "SIZE",
    "Scenes",
    "caption_embeds",
    "caption_mask",
    "class_background",
    "class_shape",
    "decode_to_rgb",
    "flip_rows",
    "null_embeds",
    "render",
    "sample_batch",
    "sample_scenes",
]

SIZE = 32  # latent rows and columns (256 px at the pipeline's VAE scale 8)
HALF = SIZE // 2
CHANNELS = 4
CAPTION_TOKENS = 4
CAPTION_CHANNELS = 64
CAPTION_SEED = 20240614  # the caption table's seed: part of the data set's definition

# Colours in "latent RGB", each channel in [-1, 1]; decode_to_rgb maps v -> (v + 1) / 2.
BACKGROUND_COLORS = {
    "night": (-0.85, -0.75, -0.15),
    "forest": (-0.8, -0.2, -0.8),
    "dusk": (-0.15, -0.8, -0.65),
    "slate": (-0.45, -0.45, -0.45),
}
SHAPES = ("disc", "square", "diamond")
SHAPE_COLORS = {
    "red": (0.9, -0.6, -0.6),
    "green": (-0.5, 0.9, -0.6),
    "blue": (-0.5, -0.3, 0.95),
    "yellow": (0.9, 0.8, -0.7),
}
POLE_COLOR = (0.85, 0.85, 0.85)
HORIZON_COLOR = (-0.2, 0.7, 0.8)
BACKGROUND_LIFT = 0.35  # the background brightens linearly by this much from the edge rows to the midline
MASK_ON, MASK_OFF = 0.9, -0.9

CLASS_NAMES = tuple(f"{shape} on {bg}" for bg in BACKGROUND_COLORS for shape in SHAPES)
NUM_CLASSES = len(CLASS_NAMES)  # 12; class id = background index * 3 + shape index

# Shape half-sizes (latent px) and the rows/columns their centre may take; see `sample_scenes`.
RADII = (3, 4, 5)
POLE_WIDTH = 2
HORIZON_THICKNESS = (1, 2, 3)  # rows per half, ending at the midline


def class_background(class_ids: torch.Tensor) -> torch.Tensor:
    """Background colour index (into `BACKGROUND_COLORS`) of each class."""
    return torch.as_tensor(class_ids) // len(SHAPES)


def class_shape(class_ids: torch.Tensor) -> torch.Tensor:
    """Shape index (into `SHAPES`) of each class."""
    return torch.as_tensor(class_ids) % len(SHAPES)


def _colors(table: dict) -> torch.Tensor:
    return torch.tensor(list(table.values()), dtype=torch.float32)


@dataclass
class Scenes:
    """The random parameters of a batch of scenes (all integer tensors of shape [B])."""

    class_ids: torch.Tensor
    shape_color: torch.Tensor  # index into SHAPE_COLORS
    radius: torch.Tensor
    center_y: torch.Tensor  # top-half row of the shape centre
    center_x: torch.Tensor
    pole_x: torch.Tensor  # first of the pole's two columns
    horizon: torch.Tensor  # horizon thickness in rows per half

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])


def _generator(seed_or_generator: int | torch.Generator) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(int(seed_or_generator))


def _choice(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of ``weights`` (non-negative, each row with a positive entry)."""
    return torch.multinomial(weights, 1, generator=generator)[:, 0]


def sample_scenes(seed_or_generator: int | torch.Generator, batch: int,
                  class_ids: torch.Tensor | None = None) -> Scenes:
    """Random scene parameters, deterministic from the seed (or the generator's state).

    The shape stays in rows 1-14 of the top half (clear of the midline rows 15/16, which are always
    horizon) and keeps at least one clear column between itself and the pole; the shape never touches the
    outermost rows and columns.
    """
    g = _generator(seed_or_generator)
    if class_ids is None:
        class_ids = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    else:
        class_ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
        if class_ids.shape[0] != batch:
            raise ValueError(f"class_ids has {class_ids.shape[0]} entries for a batch of {batch}")
        if ((class_ids < 0) | (class_ids >= NUM_CLASSES)).any():
            raise ValueError(f"class ids must lie in [0, {NUM_CLASSES})")
    shape_color = torch.randint(0, len(SHAPE_COLORS), (batch,), generator=g)
    radius = torch.tensor(RADII)[torch.randint(0, len(RADII), (batch,), generator=g)]
    horizon = torch.tensor(HORIZON_THICKNESS)[torch.randint(0, len(HORIZON_THICKNESS), (batch,), generator=g)]
    # Shape centre row: the shape spans rows [cy - r, cy + r] within [1, 14].
    rows = torch.arange(HALF)
    ok_y = (rows[None] - radius[:, None] >= 1) & (rows[None] + radius[:, None] <= HALF - 2)
    center_y = _choice(ok_y.float(), g)
    # Centre column: the shape spans columns [cx - r, cx + r] within [1, 30].
    cols = torch.arange(SIZE)
    ok_x = (cols[None] - radius[:, None] >= 1) & (cols[None] + radius[:, None] <= SIZE - 2)
    center_x = _choice(ok_x.float(), g)
    # Pole: columns [px, px + 1] within [1, 30], with at least one clear column between it and the
    # shape (a shape is at most 11 columns wide, so one side always has room).
    left = cols[None] + POLE_WIDTH - 1 <= center_x[:, None] - radius[:, None] - 2
    right = cols[None] >= center_x[:, None] + radius[:, None] + 2
    ok_pole = (cols[None] >= 1) & (cols[None] + POLE_WIDTH - 1 <= SIZE - 2) & (left | right)
    pole_x = _choice(ok_pole.float(), g)
    return Scenes(class_ids=class_ids, shape_color=shape_color, radius=radius, center_y=center_y,
                  center_x=center_x, pole_x=pole_x, horizon=horizon)


def _shape_alpha(scenes: Scenes) -> torch.Tensor:
    """Anti-aliased coverage [B, HALF, SIZE] of each scene's shape in the top half."""
    ys = torch.arange(HALF, dtype=torch.float32)[None, :, None]
    xs = torch.arange(SIZE, dtype=torch.float32)[None, None, :]
    dy = (ys - scenes.center_y.float()[:, None, None]).abs()
    dx = (xs - scenes.center_x.float()[:, None, None]).abs()
    r = scenes.radius.float()[:, None, None]
    disc = torch.sqrt(dx * dx + dy * dy) - (r + 0.3)
    square = torch.maximum(dx, dy) - (r - 0.6)
    diamond = (dx + dy) - (r + 0.5)
    shape = class_shape(scenes.class_ids)[:, None, None]
    distance = torch.where(shape == 0, disc, torch.where(shape == 1, square, diamond))
    return (0.5 - distance).clamp(0.0, 1.0)


def render(scenes: Scenes) -> torch.Tensor:
    """The latent images [B, 4, 32, 32] (float32, in [-1, 1]) of a batch of scene parameters."""
    batch = len(scenes)
    ys = torch.arange(HALF, dtype=torch.float32)
    xs = torch.arange(SIZE)
    # Background with a vertical brightening towards the midline.
    bg = _colors(BACKGROUND_COLORS)[class_background(scenes.class_ids)]  # [B, 3]
    lift = BACKGROUND_LIFT * ys / (HALF - 1)  # [HALF]
    top = bg[:, :, None, None] + lift[None, None, :, None]
    top = top.expand(batch, 3, HALF, SIZE).clone()
    # Horizon: the last `horizon` rows of the top half (mirrored: the stripe straddles the midline).
    horizon_rows = ys[None, :] >= (HALF - scenes.horizon[:, None]).float()  # [B, HALF]
    horizon_color = torch.tensor(HORIZON_COLOR)[None, :, None, None]
    top = torch.where(horizon_rows[:, None, :, None], horizon_color, top)
    # Pole: two full-height columns.
    pole_cols = (xs[None] >= scenes.pole_x[:, None]) & (xs[None] < scenes.pole_x[:, None] + POLE_WIDTH)
    top = torch.where(pole_cols[:, None, None, :], torch.tensor(POLE_COLOR)[None, :, None, None], top)
    # Shape, alpha-blended over the rest.
    alpha = _shape_alpha(scenes)[:, None]  # [B, 1, HALF, SIZE]
    color = _colors(SHAPE_COLORS)[scenes.shape_color][:, :, None, None]
    top = top * (1 - alpha) + color * alpha
    mask = MASK_OFF + (MASK_ON - MASK_OFF) * alpha
    top = torch.cat([top, mask], dim=1).clamp(-1.0, 1.0)
    return torch.cat([top, top.flip(2)], dim=2).contiguous()


def sample_batch(seed_or_generator: int | torch.Generator, batch: int,
                 class_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents [B, 4, 32, 32] float32, class_ids [B] int64)``, deterministic from the seed.

    Passing a `torch.Generator` draws from (and advances) its state, e.g. one generator per training
    run; ``class_ids`` fixes the classes instead of drawing them.
    """
    scenes = sample_scenes(seed_or_generator, batch, class_ids)
    return render(scenes), scenes.class_ids


def flip_rows(x: torch.Tensor) -> torch.Tensor:
    """The mirror image about the horizontal midline (rows ``y`` <-> ``H - 1 - y``)."""
    return x.flip(-2)


# --- Conditioning ---------------------------------------------------------------------------------


def _caption_table() -> torch.Tensor:
    """[NUM_CLASSES + 1, CAPTION_TOKENS, CAPTION_CHANNELS]: one embedding per class, the null last."""
    g = torch.Generator().manual_seed(CAPTION_SEED)
    return torch.randn(NUM_CLASSES + 1, CAPTION_TOKENS, CAPTION_CHANNELS, generator=g)


_TABLE: torch.Tensor | None = None


def _table() -> torch.Tensor:
    global _TABLE
    if _TABLE is None:
        _TABLE = _caption_table()
    return _TABLE


def caption_embeds(class_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """The fixed caption embeddings ``[B, CAPTION_TOKENS, CAPTION_CHANNELS]`` (float32) of the classes.

    The stand-in for text-encoder output: one seeded random tensor per class (`CAPTION_SEED`).
    """
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    if ((ids < 0) | (ids >= NUM_CLASSES)).any():
        raise ValueError(f"class ids must lie in [0, {NUM_CLASSES})")
    return _table()[ids].clone()


def null_embeds(batch: int) -> torch.Tensor:
    """The fixed "empty caption" embedding, ``[batch, CAPTION_TOKENS, CAPTION_CHANNELS]``, for CFG."""
    return _table()[NUM_CLASSES][None].expand(batch, -1, -1).clone()


def caption_mask(batch: int) -> torch.Tensor:
    """The attention mask of the caption tokens, all valid: ``[batch, CAPTION_TOKENS]`` ones."""
    return torch.ones(batch, CAPTION_TOKENS)


# --- Display ----------------------------------------------------------------------------------------


def decode_to_rgb(latents: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """RGB images ``[B, 3, 32 * scale, 32 * scale]`` in [0, 1]: the fixed stand-in for a VAE decode.

    Channels 0-2 map ``v -> (v + 1) / 2``, clamped, then nearest-upsampled by ``scale``; the mask
    channel is not shown. Accepts ``[4, H, W]`` too (returns ``[3, H*s, W*s]``).
    """
    single = latents.dim() == 3
    x = latents[None] if single else latents
    rgb = ((x[:, :3].float() + 1.0) / 2.0).clamp(0.0, 1.0)
    if scale != 1:
        rgb = rgb.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return rgb[0] if single else rgb
