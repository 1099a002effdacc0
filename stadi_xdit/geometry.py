"""Band geometry known before any model loads (pure Python): the token row and a video clip's rows.

Every family STADI serves has 16 px token rows (PixArt, SD3, Qwen-Image, Wan: VAE 8 x patch 2;
Flux: packed latents, VAE 16 x patch 1), so the launcher, the runner and the benchmark check sizes
and rank counts from the flags alone. A video family bands the token rows of the whole clip, frame
after frame: `clip_token_rows` counts them (the loaded pipeline recounts them from its own VAE and
patch, `runtime/video_bands.py`).
"""

from __future__ import annotations

from stadi_xdit.planner.validation import MAX_ROWS

VAE_SCALE = 8  # latent rows per image px: every served family's VAE
PATCH_SIZE = 2  # latent rows per token row: patchify, or Flux's and Qwen-Image's 2x2 packing
TOKEN_ROW_PX = VAE_SCALE * PATCH_SIZE  # image px per token row
FRAMES_PER_LATENT = 4  # Wan's and HunyuanVideo's causal VAEs: num_frames = 4k + 1 give k + 1 latent frames


def latent_frames(num_frames: int, temporal_scale: int = FRAMES_PER_LATENT) -> int:
    """The causal VAE's latent frames: the first frame alone, then one per `temporal_scale` frames."""
    return (num_frames - 1) // temporal_scale + 1


def check_num_frames(num_frames: object, temporal_scale: int = FRAMES_PER_LATENT) -> int:
    """Latent frames of a clip, or a one-line error naming `--num_frames` (the VAE takes 4k+1)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 \
            or num_frames % temporal_scale != 1:
        raise ValueError(f"--num_frames must be {temporal_scale}k+1 (the video VAE packs {temporal_scale} frames "
                         f"per latent frame after the first), got {num_frames}")
    return latent_frames(num_frames, temporal_scale)


def clip_token_rows(frames: int, rows_per_frame: int, ranks: int, subject: str = "--num_frames/--height give") -> int:
    """Token rows of a clip of `frames` latent frames (the band unit), or a one-line error, opened by
    `subject` (the flags and their verb), when there are fewer than the STADI ranks or more than the
    planner takes."""
    rows = frames * rows_per_frame
    if not ranks <= rows <= MAX_ROWS:
        limit = f"fewer than the {ranks} STADI ranks" if rows < ranks else f"more than the planner's {MAX_ROWS}"
        raise ValueError(f"{subject} {rows} token rows of the clip ({frames} latent frames x {rows_per_frame}), "
                         f"{limit}")
    return rows
