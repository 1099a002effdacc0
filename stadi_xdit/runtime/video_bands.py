"""Bands of a video clip: positions over the whole clip, and the displaced K/V it needs.

A video family bands the token rows of the whole clip, frame after frame: its latents
(batch, C, F, H, W) merged to (batch, C, F·H, W) are one tall image, and a band is a contiguous range
of its token rows (it may start or end inside a frame). Two things then differ from an image:

- **Positions.** A 3D RoPE depends on each token's absolute (frame, row, column); built from the
  band's own shape it would be that of one short frame. `BandRope` stands in for the transformer's
  rope module: it builds the rope of the full clip with the family's own module and slices it by the
  band's global token range.
- **Memory.** Every rank holds the K and V of every token of the whole clip for every displaced
  layer (`displaced_kv_bytes`); long clips need the check before denoising (`check_kv_memory`).

The pipeline side (geometry, launch checks, the call's denoise and the video output) is
`xdit/video.py`; the clip's sizes before any model loads are `stadi_xdit/geometry.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stadi_xdit.geometry import latent_frames
from stadi_xdit.runtime.kv import DisplacedKVStore
from stadi_xdit.runtime.layout import BandView

GIB = 1024**3


def patch_3d(transformer_config: Any) -> tuple[int, int, int]:
    """(temporal, height, width) patch of a video transformer config: Wan's `patch_size` triple, or
    HunyuanVideo's square `patch_size` with `patch_size_t`."""
    get = transformer_config.get if isinstance(transformer_config, dict) else \
        lambda key, default=None: getattr(transformer_config, key, default)
    patch = get("patch_size")
    if isinstance(patch, (tuple, list)):
        return tuple(patch)
    return get("patch_size_t", 1), patch, patch


def displaced_kv_bytes(transformer_config: Any, height: int, width: int, num_frames: int, *, batch: int = 1,
                       bytes_per_value: int = 2, spatial_scale: int = 8, temporal_scale: int = 4) -> int:
    """Bytes of one rank's displaced K/V store for a clip: the K and V of every token of the whole clip,
    for every self-attention layer, in the batch each forward runs (2 for the batched CFG pair).

    `transformer_config` is a diffusers video transformer config (or a dict of one).
    """
    get = transformer_config.get if isinstance(transformer_config, dict) else transformer_config.__getitem__
    p_t, p_h, p_w = patch_3d(transformer_config)
    tokens = (latent_frames(num_frames, temporal_scale) // p_t) * (height // spatial_scale // p_h) \
        * (width // spatial_scale // p_w)
    inner = get("num_attention_heads") * get("attention_head_dim")
    return tokens * get("num_layers") * 2 * inner * batch * bytes_per_value


def check_kv_memory(store: DisplacedKVStore, need: int, device: torch.device, detail: str,
                    remedies: Sequence[str] = ("--use_cfg_parallel", "--stadi_kv_dtype bfloat16")) -> None:
    """One-line refusal before denoising when the displaced K/V cannot fit the free device memory.

    A lower bound: the store alone, activations come on top. Skipped off CUDA (no reliable free figure).
    """
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    free += store.memory_bytes()  # what the store already holds is reused
    if need > free:
        options = ", ".join([*remedies, "fewer --num_frames", "a smaller --height/--width", "--stadi_exact"])
        raise ValueError(f"--use_stadi: the displaced K/V store needs {need / GIB:.1f} GiB per rank ({detail}), more "
                         f"than the {free / GIB:.1f} GiB free on {device}; use {options}")


class BandRope(nn.Module):
    """Stands in for `transformer.rope`: the full clip's 3D RoPE, sliced to the band's global tokens.

    The wrapped module maps hidden states (batch, C, F, H, W) to (cos, sin) with tokens on dim 1 and
    reads only their shape (Wan's `WanRotaryPosEmbed` does). Passes through to it until `set_clip`
    names the full clip's latent shape.
    """

    def __init__(self, rope: nn.Module, patch: tuple[int, int, int]):
        super().__init__()
        self.original = rope  # a submodule, so it moves with the transformer (its buffers are not persistent)
        self.patch = patch
        self.clip_shape: tuple[int, int] | None = None  # (latent frames, latent rows per frame)
        self.band: BandView | None = None  # the current band (the injection's positions set it)

    def set_clip(self, clip_shape: tuple[int, int] | None) -> None:
        self.clip_shape = clip_shape

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clip_shape is None:
            return self.original(hidden_states)
        if self.band is None:
            raise RuntimeError("BandRope: no band set (set_band) before the transformer ran")
        batch, channels, _, _, width = hidden_states.shape
        frames, height = self.clip_shape
        # The family's own rope on the full clip's shape (the module reads the shape only).
        freqs_cos, freqs_sin = self.original(torch.empty((batch, channels, frames, height, width), device="meta"))
        start, end = self.band.token_range
        p_t, p_h, p_w = self.patch
        band_tokens = hidden_states.shape[2] // p_t * (hidden_states.shape[3] // p_h) * (width // p_w)
        if end - start != band_tokens or end > freqs_cos.shape[1]:
            raise RuntimeError(f"band tokens [{start}, {end}) do not fit a band of {band_tokens} tokens in a "
                               f"clip of {freqs_cos.shape[1]}")
        return self.band.positions(freqs_cos, dim=1), self.band.positions(freqs_sin, dim=1)
