"""STADI's part of a video twin: bands of the whole clip's token rows (`runtime/video_bands.py`).

A video family's twin mixes in `StadiVideoPipelineMixin` and its band model derives from
`VideoBandModel`; the family keeps only what is its own (attention processor, conditioning, its
`__call__`'s inputs, the VAE's de-normalisation). What every video family shares is here:

- launch checks from the flags (`--num_frames` 4k+1, one clip token row per rank);
- the clip's geometry from the loaded VAE and patch (`BandGeometry` of the clip's token rows);
- the global RoPE (`BandRope`, the family's `RopeSwap` positions), told the clip's shape per call;
- the displaced K/V memory check before denoising;
- the call's denoise on the clip as one tall image, and the video output (`_finish`'s rules, frames).
"""

from __future__ import annotations

from typing import Any

import torch

from stadi_xdit.geometry import TOKEN_ROW_PX, check_num_frames, clip_token_rows
from stadi_xdit.planner.memory import narrowest_bytes
from stadi_xdit.runtime.kv import kv_storage_dtype
from stadi_xdit.runtime.layout import BandGeometry, BandLayout
from stadi_xdit.runtime.loop import DenoiseResult
from stadi_xdit.runtime.profile_cache import profile_key
from stadi_xdit.runtime.video_bands import BandRope, check_kv_memory, displaced_kv_bytes, patch_3d
from stadi_xdit.xdit.pipelines import StadiPipelineMixin, XditBandModel, hardware_identity


class VideoBandModel(XditBandModel):
    """A video family's model on one band of the clip's token rows (merged latents, global RoPE)."""

    band_dim = 2  # latents are merged to (batch, channels, frames x height, width): the clip as one tall image

    def band_sizes(self, layout: BandLayout) -> list[int]:
        return layout.latent_row_counts()  # latent rows of the merged clip per rank


class StadiVideoPipelineMixin(StadiPipelineMixin):
    """The twin side of a video family; the family's pipeline output class is `video_output`."""

    bands_are_image_rows = False  # token rows of the whole clip: `check_launch` counts them
    video_output: type  # e.g. diffusers' WanPipelineOutput (frames=...)

    def __init__(self, pipeline, engine_config, cache_args=None, stadi_config=None, **options):
        if patch_3d(pipeline.transformer.config)[0] != 1:
            raise ValueError("--use_stadi needs a temporal patch size of 1 (bands are token rows of the clip)")
        self._latent_frames: int | None = None
        super().__init__(pipeline, engine_config, cache_args, stadi_config, **options)

    @classmethod
    def check_launch(cls, args: Any, stadi_degree: int) -> None:
        frames = check_num_frames(args.num_frames)
        clip_token_rows(frames, args.height // TOKEN_ROW_PX, stadi_degree,
                        f"--num_frames {args.num_frames} at --height {args.height} gives")

    @property
    def band_rope(self) -> BandRope:
        """The clip's global RoPE: the module the family's `RopeSwap` positions put in."""
        return self.injection.positions.module

    def _set_clip_frames(self, num_frames: object) -> None:
        """The call's clip length (a one-line error naming `--num_frames`); the geometry reads it."""
        self._latent_frames = check_num_frames(num_frames, self.module.vae_scale_factor_temporal)

    def _geometry(self, height: int, width: int) -> BandGeometry:
        """The clip's token rows, frame after frame, are the planner's rows (frames: `_set_clip_frames`)."""
        pipe = self.module
        _, p_h, p_w = patch_3d(pipe.transformer.config)
        scale = pipe.vae_scale_factor_spatial
        if height % (scale * p_h) or width % (scale * p_w):
            raise ValueError(f"--height/--width must be multiples of {scale * p_h} px "
                             f"(VAE scale {scale} x patch {p_h}), got {height}x{width}")
        if self._latent_frames is None:
            raise RuntimeError(f"{type(self).__name__}._geometry needs the clip's frame count (call the pipeline)")
        align = self.groups.align  # each STADI group splits its band evenly over its Ulysses ranks
        rows = clip_token_rows(self._latent_frames, height // scale // p_h, self.groups.members * align)
        return BandGeometry.of_rows(rows, p_h, width // scale // p_w, align)

    def _profile_key(self, height: int, width: int) -> str:
        transformer = self.module.transformer
        hardware = self.groups.gather_text(hardware_identity(), self.module._execution_device)
        return profile_key(f"{type(transformer).__name__}-{self._latent_frames}f", transformer.config, height, width,
                           hardware)

    def _check_clip_memory(self, geometry: BandGeometry, height: int, width: int, num_frames: int,
                           forward_batch: int, cfg_batched: bool) -> None:
        """Refuse in one line, before denoising, a clip (of `geometry`) whose displaced K/V cannot fit the device."""
        if self.stadi_config.exact:
            return  # no stale K/V are kept
        pipe = self.module
        config = pipe.transformer.config
        named = kv_storage_dtype(self.stadi_config.kv_dtype)
        # Under --stadi_kv_dtype auto the store narrows itself to fit (planner/memory.py): refused here only
        # where even its narrowest form (bfloat16) cannot fit.
        value_bytes = named.itemsize if named else narrowest_bytes(str(pipe.transformer.dtype).removeprefix("torch."))
        # Under Ulysses a rank's store holds its heads / U of every layer.
        need = displaced_kv_bytes(config, height, width, num_frames, batch=forward_batch, bytes_per_value=value_bytes,
                                  spatial_scale=pipe.vae_scale_factor_spatial,
                                  temporal_scale=pipe.vae_scale_factor_temporal) // self.groups.sequence_size
        remedies = (["--use_cfg_parallel"] if cfg_batched else []) + \
            (["--stadi_kv_dtype bfloat16"] if value_bytes > 2 else [])
        check_kv_memory(self.kv_store, need, torch.device(pipe._execution_device),
                        f"{geometry.image_rows * geometry.tokens_per_row} tokens x {config.num_layers} layers x 2 x "
                        f"{config.num_attention_heads * config.attention_head_dim // self.groups.sequence_size} x "
                        f"batch {forward_batch} x {value_bytes} B", remedies)

    def _denoise_clip(self, latents: torch.Tensor, scheduler, model: VideoBandModel, *, height: int,
                      width: int) -> DenoiseResult:
        """`_stadi_denoise` on the clip (batch, C, F, H, W) as one tall image (batch, C, F·H, W), the
        global RoPE set for the clip's shape; the result's latents are the clip's again."""
        frames, latent_height = latents.shape[2], latents.shape[3]
        self.band_rope.set_clip((frames, latent_height))
        try:
            result = self._stadi_denoise(latents.flatten(2, 3), scheduler, model, height=height, width=width,
                                         num_steps=len(scheduler.timesteps))
        finally:
            self.band_rope.set_clip(None)
        result.latents = result.latents.unflatten(2, (frames, latent_height))
        return result

    def _postprocess(self, decoded: torch.Tensor, output_type: str, orig_size: tuple[int, int] | None):
        return self.module.video_processor.postprocess_video(decoded, output_type=output_type)

    def _pipeline_output(self, frames):
        return self.video_output(frames=frames)
