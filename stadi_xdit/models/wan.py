"""Wan 2.1 text-to-video (diffusers `WanTransformer3DModel`, `WanPipeline`) under STADI.

What xfuser 0.7.0 offers: no pipeline wrapper for Wan text-to-video (only
`xFuserWanImageToVideoPipeline`); its runner model "Wan2.1-T2V" (`xFuserWan21T2VModel`) drives
diffusers' `WanPipeline` with a sequence-parallel transformer (`xFuserWanTransformer3DWrapper`). So
this module adds `xFuserWanPipeline`, a thin `xFuserPipelineBaseWrapper` around `WanPipeline`, and
the STADI twin subclasses it like the other families.

**Band unit: token rows of the whole clip.** Latents are (batch, C, F, H, W) and Wan patchifies them
with a (1, 2, 2) Conv3d into tokens in frame-major order (frame, row, column). Merging the frame and
row axes, (batch, C, F·H, W), lays the clip out as one tall image whose token rows are the clip's
rows frame after frame. A band is a contiguous range of those token rows (`band_dim` 2 of the merged
latents, 2 latent rows per token row), so it may start or end inside a frame. Then

- its tokens are one contiguous range of the clip's token sequence, the layout the displaced K/V
  store indexes (`own_range`);
- with temporal patch 1 the Conv3d patch embedding and the unpatchify work on any such band fed
  as one tall frame, (batch, C, 1, rows, W): a patch never straddles two frames, because every
  frame has an even number of latent rows; self-attention over the gathered K/V of the whole clip is
  exactly one process's attention, and everything else in a block is per token;
- the planner's "row" is a token row, `BandGeometry(rows=F·H/2, patch_rows=2, tokens_per_row=W/2)`,
  the same model-agnostic planner and the same granularity as for images.

The other choice the issue allows, whole latent frames, is 30-45 token rows per unit at 480p-720p:
21 units for Wan's 81-frame clips, so water-filling over 8 mixed GPUs could miss the balance by up to
one frame per rank (a third of a 2.6-frame band), and short clips on 2 ranks split 6/5 frames where
2:1 speeds want 7.3/3.7. Token rows cut that error to one row in 30-45, and the rank limit becomes the
clip's token rows (e.g. 630 at 480p, 81 frames) rather than its 21 latent frames.

**Positions.** Wan's 3D RoPE (`WanRotaryPosEmbed`) depends on the absolute (frame, row, column) of
each token. The transformer would build it from the band's own shape, i.e. as one frame of the
band's rows (and fail beyond its 1024 precomputed rows). `BandRope` (the video-bands toolkit,
`runtime/video_bands.py`, with the twin side in `xdit/video.py`) replaces `transformer.rope` while
STADI is on: it builds the rope of the *full* clip with diffusers' own module (from the clip's shape)
and slices it by the band's global token range. It serves diffusers' transformer and xfuser's
runner wrapper alike (both call `self.rope(hidden_states)`), and `pipe.remove_stadi()` puts the
original module back.

**Attention.** Self-attention (`attn1` of every block, in block order = K/V layer id) runs
`StadiWanAttnProcessor`: diffusers' `WanAttnProcessor` (projections, RMS norm across heads,
RoPE, SDPA) with the key/value over the whole clip from the displaced store. Cross-attention
(`attn2`) to the text keeps its processor: text is replicated on every rank and the band's queries
need nothing from other bands.

**Guidance.** Wan runs CFG with a negative prompt: both branches as one batch of two per rank, or
with `--use_cfg_parallel` one branch per rank (`CfgPair`). Wan's encoder pads every prompt to
`max_sequence_length`, so the two branches' text has one length; user-given embeddings of unequal
length are refused in the batched form (padding would change the attention over text).

**Scheduler.** Wan's own `UniPCMultistepScheduler` (flow prediction, flow sigmas) takes per-rank
step sub-sequences like DPM-Solver (`runtime/schedule.py`: its `model_outputs` and corrector
`last_sample` are re-banded at the transition), and so do FlowMatchEuler and the other supported
schedulers.

**Memory.** Every rank holds the displaced K/V of the whole clip for every layer:
tokens x layers x 2 x inner dim x batch x bytes (`video_bands.displaced_kv_bytes`); Wan2.1-14B at 720p with 81
frames is 75,600 tokens x 40 x 2 x 5120 x 2 bytes = 62 GB per rank for one CFG branch, twice that
with the batched CFG pair. Before denoising on CUDA the twin compares it with the free device
memory and refuses in one line naming the remedies (`--use_cfg_parallel`, `--stadi_kv_dtype`,
fewer `--num_frames`, a smaller size, `--stadi_exact`), never an out-of-memory error mid-run.
`python -m stadi_xdit.models.wan` prints the table for the real-size presets.

Not served: Wan 2.2's two-expert pipelines (`transformer_2`, `boundary_ratio`) and per-token
timesteps (`expand_timesteps`, Wan2.2-TI2V), image-to-video, step callbacks and `--use_parallel_vae`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import WanPipeline
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from torch import nn

from stadi_xdit.geometry import TOKEN_ROW_PX, latent_frames
from stadi_xdit.models import register_twin
from stadi_xdit.runtime.band_attention import BandAttentionProcessor
from stadi_xdit.runtime.video_bands import GIB, BandRope, displaced_kv_bytes, patch_3d
from stadi_xdit.xdit.cfg import CfgPair
from stadi_xdit.xdit.injection import InjectionPlan, RopeSwap
from stadi_xdit.xdit.pipelines import DiffusersPipelineWrapper
from stadi_xdit.xdit.video import StadiVideoPipelineMixin, VideoBandModel

__all__ = ["StadiWanAttnProcessor", "StadiWanPipeline", "WanBandModel", "kv_memory_report", "xFuserWanPipeline"]


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # diffusers' WanAttnProcessor.__call__.apply_rotary_emb, verbatim (a closure there).
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class StadiWanAttnProcessor(BandAttentionProcessor):
    """diffusers' `WanAttnProcessor` for self-attention (`attn1`), keys/values over the whole clip."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("StadiWanAttnProcessor serves Wan's self-attention (attn1) only, without a mask")
        start, end = self.band.token_range
        if hidden_states.shape[1] != end - start:
            raise RuntimeError(f"band has {hidden_states.shape[1]} tokens, the layout says {end - start}")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (batch, tokens, heads, head_dim)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            if rotary_emb[0].shape[1] != end - start:
                raise RuntimeError(f"RoPE covers {rotary_emb[0].shape[1]} tokens, the band {end - start}: "
                                   "the band's global RoPE hook is missing")
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        # (batch, heads, tokens, head_dim): the store's and SDPA's layout; keys/values of the whole clip.
        out, _ = self.attend(*(x.transpose(1, 2) for x in (query, key, value)))
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


WAN_INJECTION = InjectionPlan(
    positions=RopeSwap("rope", lambda transformer, rope: BandRope(rope, patch_3d(transformer.config))),
    displaced_attention=lambda transformer: [block.attn1 for block in transformer.blocks],
    processor_factory=StadiWanAttnProcessor,
)


class WanBandModel(VideoBandModel):
    """Wan on one band of the clip's token rows: CFG batch or pair, the rank's own timestep, global RoPE."""

    def __init__(self, transformer: nn.Module, prompt_embeds: torch.Tensor, guidance_scale: float, cfg: CfgPair,
                 attention_kwargs: dict[str, Any] | None = None):
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.guidance_scale = guidance_scale
        self.cfg = cfg
        self.attention_kwargs = attention_kwargs
        self.dtype = transformer.dtype

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # The band as one tall frame: temporal patch 1, so patches and tokens are those of the clip's rows.
        model_input = self.cfg.model_input(band_latents.to(self.dtype)).unsqueeze(2)
        output = self.transformer(
            hidden_states=model_input,
            timestep=timestep.expand(model_input.shape[0]),  # as WanPipeline: one timestep per sample
            encoder_hidden_states=self.prompt_embeds,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0].squeeze(2)
        return self.cfg.guide(output, self.guidance_scale)


# --- memory ---------------------------------------------------------------------------------------


def kv_memory_report(presets: Sequence[str] | None = None, *, bytes_per_value: int = 2) -> list[str]:
    """One line per real-size preset and CFG form: tokens, layers, width and the per-rank store."""
    from stadi_xdit.families.wan import WAN_PRESETS, wan_transformer_config

    names = presets or [name for name in WAN_PRESETS if name.startswith("wan")]
    lines = []
    for name in names:
        spec = WAN_PRESETS[name]
        config = wan_transformer_config(spec)
        tokens = latent_frames(spec.num_frames) * (spec.height // TOKEN_ROW_PX) * (spec.width // TOKEN_ROW_PX)
        for batch, form in ((1, "one CFG branch per rank (--use_cfg_parallel)"), (2, "batched CFG pair")):
            size = displaced_kv_bytes(config, spec.height, spec.width, spec.num_frames, batch=batch,
                                      bytes_per_value=bytes_per_value)
            lines.append(f"{name} {spec.height}x{spec.width}x{spec.num_frames}f: {tokens} tokens x "
                         f"{config['num_layers']} layers x 2 x {config['num_attention_heads'] * config['attention_head_dim']}"
                         f" x {batch} x {bytes_per_value} B = {size / 1e9:.1f} GB ({size / GIB:.1f} GiB) per rank, {form}")
    return lines


# --- pipelines ------------------------------------------------------------------------------------


class xFuserWanPipeline(DiffusersPipelineWrapper):
    """xFuser-style wrapper of diffusers' `WanPipeline` (text-to-video), which xfuser 0.7.0 lacks."""

    diffusers_class = WanPipeline


@register_twin
class StadiWanPipeline(StadiVideoPipelineMixin, xFuserWanPipeline):
    """Wan 2.1 text-to-video under STADI; construct it like the other twins (`from_pretrained` or
    `cls(pipe, config)`)."""

    diffusers_pipelines = ("WanPipeline",)
    runner_models = ("xFuserWan21T2VModel",)  # xfuser.runner's "Wan2.1-T2V" / Wan-AI/Wan2.1-T2V-14B-Diffusers

    injection_plan = WAN_INJECTION
    ulysses_groups = True  # its positions: the RoPE stand-in returns the part's rows of the clip's table
    video_output = WanPipelineOutput

    def __init__(self, pipeline, engine_config, cache_args=None, stadi_config=None, **options):
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            raise ValueError("--use_stadi serves Wan 2.1 text-to-video only, not Wan 2.2's two-expert pipelines "
                             "(transformer_2 / boundary_ratio)")
        if pipeline.config.get("expand_timesteps", False):
            raise ValueError("--use_stadi does not serve Wan 2.2 TI2V's per-token timesteps (expand_timesteps)")
        super().__init__(pipeline, engine_config, cache_args, stadi_config, **options)

    # --- the call ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height: int = 480, width: int = 832, num_frames: int = 81,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, guidance_scale_2: float | None = None,
                 num_videos_per_prompt: int = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "np", return_dict: bool = True, attention_kwargs: dict[str, Any] | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 max_sequence_length: int = 512):
        """WanPipeline's `__call__` under STADI, same arguments (step callbacks refused)."""
        if callback_on_step_end is not None:
            raise ValueError("callback_on_step_end is not supported with --use_stadi (ranks hold bands)")
        pipe = self.module
        self._set_clip_frames(num_frames)
        geometry = self._geometry(height, width)  # size and frame-count errors first, naming the flags
        pipe.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
                          list(callback_on_step_end_tensor_inputs), guidance_scale_2)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = pipe._execution_device
        do_cfg = guidance_scale > 1.0
        cfg = CfgPair.create(do_cfg, self.groups.cfg)
        self._start_call(video=True, height=height, width=width, num_frames=num_frames, batch_size=batch_size,
                         num_inference_steps=num_inference_steps, split_text_embed_in_sp=False)
        transformer = pipe.transformer
        forward_batch = batch_size * num_videos_per_prompt * (2 if cfg.batched else 1)
        self._check_clip_memory(geometry, height, width, num_frames, forward_batch, cfg.batched)

        embeds, negative = pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt,
                                              do_classifier_free_guidance=do_cfg,
                                              num_videos_per_prompt=num_videos_per_prompt,
                                              prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                              max_sequence_length=max_sequence_length, device=device)
        embeds = embeds.to(transformer.dtype)
        if do_cfg:
            negative = negative.to(transformer.dtype)
            if cfg.batched:
                if negative.shape[1] != embeds.shape[1]:
                    raise ValueError(f"prompt_embeds ({embeds.shape[1]} tokens) and negative_prompt_embeds "
                                     f"({negative.shape[1]} tokens) must have one length for the batched CFG pair; "
                                     "pad them as Wan's encoder does, or use --use_cfg_parallel")
                embeds = torch.cat([negative, embeds])
            elif cfg.branch == 0:
                embeds = negative

        # Timesteps as WanPipeline sets them; every rank samples the full initial latent identically.
        scheduler = pipe.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = pipe.prepare_latents(batch_size * num_videos_per_prompt, transformer.config.in_channels, height,
                                       width, num_frames, torch.float32, device, generator, latents)
        scheduler.set_begin_index(0)

        model = WanBandModel(transformer, embeds, guidance_scale, cfg, attention_kwargs)
        result = self._denoise_clip(latents, scheduler, model, height=height, width=width)
        return self._finish(result.latents, output_type, return_dict)

    # --- output -------------------------------------------------------------------------------
    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.module.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return latents / inverse_std + mean  # exactly WanPipeline's de-normalisation


def main(argv: Sequence[str] | None = None) -> int:
    """Print the displaced K/V store per rank for the real-size Wan presets."""
    from stadi_xdit.cli_errors import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m stadi_xdit.models.wan",
                                   description="Displaced K/V store per rank for the real-size Wan presets.")
    parser.add_argument("--bytes", type=int, default=2, choices=(1, 2, 4),
                        help="bytes per stored value (2: bf16/fp16, the default)")
    args = parser.parse_args(argv)
    print("\n".join(kv_memory_report(bytes_per_value=args.bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
