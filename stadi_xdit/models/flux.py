"""Flux.1 (dev and schnell) under STADI.

Flux's latents are packed 2x2, so the transformer sees a (batch, tokens, 4·C) sequence in row-major
token order; xDiT's runtime state then uses a VAE scale of 16 and patch size 1, so one token row is
16 px and a band is a contiguous token range along dim 1 (`FluxBandModel.band_dim`).

Each rank runs the whole transformer on `[text tokens, its band's image tokens]`: the text stream
is replicated on every rank, and rotary embeddings are built from the full `txt_ids` and the
band's slice of `img_ids` (global rows), exactly the positions one process would use. Attention
(both block kinds) is `StadiFluxAttnProcessor`: image K/V of the other bands come from the
displaced K/V store, text K/V are always fresh.

Flux.1-dev conditions on guidance through an embedding (no CFG branches), Flux.1-schnell has
none; neither composes with `--use_cfg_parallel`, as in xDiT.

Flux attends over one joint sequence ``[text, image]``:

- double-stream blocks (``transformer_blocks[i].attn``, a ``FluxAttention`` with ``added_kv_proj``)
  get the image band as ``hidden_states`` and the text as ``encoder_hidden_states``;
- single-stream blocks (``single_transformer_blocks[i].attn``) get one sequence whose first
  ``txt_len`` tokens are text and the rest the image band.

Either way the processor does what diffusers' ``FluxAttnProcessor`` does (projections, QK RMS-norm,
rotary embedding on Q and K of both streams, attention, output projections), with one change: the
image K/V of the *other* bands come from the ``DisplacedKVStore``. The store holds image K/V only,
after RoPE (each rank rotates its own band with its global ``img_ids``); the fresh text K/V are
concatenated in front at attention time, in Flux's order ``[text, image]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from torch import nn
from xfuser.model_executor.pipelines import xFuserFluxPipeline
from xfuser.model_executor.pipelines.base_pipeline import xFuserPipelineBaseWrapper

from stadi_xdit.models import register_twin
from stadi_xdit.runtime.band_attention import BandAttentionProcessor, Stream
from stadi_xdit.runtime.layout import BandLayout
from stadi_xdit.xdit.injection import InjectionPlan, SlicedPositions
from stadi_xdit.xdit.pipelines import StadiPipelineMixin, XditBandModel


class StadiFluxAttnProcessor(BandAttentionProcessor):
    """One processor for both Flux block kinds; `layer` is the K/V layer id in the store."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 text_tokens: int | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("StadiFluxAttnProcessor does not support attention masks")
        joint = encoder_hidden_states is not None  # double-stream block
        query, key, value, txt_query, txt_key, txt_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)

        # (batch, tokens, heads, head_dim), exactly as FluxAttnProcessor.
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if joint:
            if attn.added_kv_proj_dim is None:
                raise ValueError("a double-stream Flux attention needs added K/V projections")
            txt_query = attn.norm_added_q(txt_query.unflatten(-1, (-1, attn.head_dim)))
            txt_key = attn.norm_added_k(txt_key.unflatten(-1, (-1, attn.head_dim)))
            txt_value = txt_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([txt_query, query], dim=1)
            key = torch.cat([txt_key, key], dim=1)
            value = torch.cat([txt_value, value], dim=1)
            txt_len = encoder_hidden_states.shape[1]
        else:
            if text_tokens is None:
                raise ValueError("a single-stream Flux attention under STADI needs text_tokens "
                                 "(FluxBandModel passes it in joint_attention_kwargs)")
            txt_len = text_tokens

        # The rotary table covers [txt_ids, this band's img_ids]: RoPE is per token, so rotating the
        # band here gives exactly the keys one process would have at these global positions.
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # To (batch, heads, tokens, head_dim): the store's layout and SDPA's; the text stream leads.
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        text = Stream(query[:, :, :txt_len], key[:, :, :txt_len], value[:, :, :txt_len], first=True)
        image_out, txt_out = self.attend(query[:, :, txt_len:], key[:, :, txt_len:],
                                            value[:, :, txt_len:], text)
        if not joint:
            return torch.cat([txt_out, image_out], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        txt_out = attn.to_add_out(txt_out.contiguous())
        return image_out, txt_out


def flux_attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """K/V layer ids: double-stream blocks first, then single-stream blocks."""
    return ([block.attn for block in transformer.transformer_blocks]
            + [block.attn for block in transformer.single_transformer_blocks])


FLUX_INJECTION = InjectionPlan(
    positions=SlicedPositions("FluxBandModel.predict: the band's rows of the image's img_ids"),
    displaced_attention=flux_attention_modules,
    processor_factory=StadiFluxAttnProcessor,
)


class FluxBandModel(XditBandModel):
    """Flux on one band of packed latent tokens."""

    band_dim = 1  # packed latents are (batch, tokens, channels)

    def __init__(self, pipe, prompt_embeds: torch.Tensor,
                 pooled_prompt_embeds: torch.Tensor, text_ids: torch.Tensor, image_ids: torch.Tensor,
                 guidance: torch.Tensor | None, joint_attention_kwargs: dict[str, Any] | None = None):
        self.pipe = pipe
        self.prompt_embeds = prompt_embeds
        self.pooled_prompt_embeds = pooled_prompt_embeds
        self.text_ids = text_ids
        self.image_ids = image_ids  # (tokens, 3) for the full image
        self.guidance = guidance
        # The processors learn the text length from here: single-stream blocks see one joint sequence.
        self.joint_attention_kwargs = {**(joint_attention_kwargs or {}), "text_tokens": prompt_embeds.shape[1]}

    def band_sizes(self, layout: BandLayout) -> list[int]:
        return layout.token_counts()

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if band_latents.shape[1] != self.band.num_tokens:
            raise RuntimeError(f"band has {band_latents.shape[1]} tokens, the layout says {self.band.num_tokens}")
        # As FluxPipeline: the timestep in the latents' dtype, scaled to [0, 1].
        timesteps = timestep.expand(band_latents.shape[0]).to(band_latents.dtype)
        return self.pipe.transformer(
            hidden_states=band_latents,
            timestep=timesteps / 1000,
            guidance=self.guidance,
            pooled_projections=self.pooled_prompt_embeds,
            encoder_hidden_states=self.prompt_embeds,
            txt_ids=self.text_ids,
            img_ids=self.band.positions(self.image_ids),
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]


@register_twin
class StadiFluxPipeline(StadiPipelineMixin, xFuserFluxPipeline):
    """Flux.1 under STADI; construct it like `xFuserFluxPipeline` (`from_pretrained` or `cls(pipe, config)`)."""

    diffusers_pipelines = ("FluxPipeline",)
    runner_models = ("xFuserFluxModel",)  # xfuser.runner's registry classes it serves

    injection_plan = FLUX_INJECTION
    ulysses_groups = True  # its positions: the image ids, sliced by the band model with the part's BandView

    @torch.no_grad()
    @xFuserPipelineBaseWrapper.check_model_parallel_state(cfg_parallel_available=False)
    def __call__(self, prompt=None, prompt_2=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, timesteps=None, sigmas=None, guidance_scale: float = 3.5,
                 num_images_per_prompt: int = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True,
                 joint_attention_kwargs: dict[str, Any] | None = None, max_sequence_length: int = 512,
                 **kwargs):
        if timesteps is not None:
            raise ValueError("StadiFluxPipeline takes `sigmas`, not `timesteps` (as FluxPipeline)")
        pipe = self.module
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(prompt, prompt_2, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds, max_sequence_length=max_sequence_length)
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = pipe._execution_device

        self._start_call(height=height, width=width, batch_size=batch_size,
                         num_inference_steps=num_inference_steps,
                         max_condition_sequence_length=max_sequence_length, split_text_embed_in_sp=False)
        self._geometry(height, width)  # size errors before any text encoding

        lora_scale = (joint_attention_kwargs or {}).get("scale")
        prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)

        # Every rank samples the full initial latent from the same generator, as one process would.
        num_channels_latents = pipe.transformer.config.in_channels // 4
        latents, image_ids = pipe.prepare_latents(batch_size * num_images_per_prompt, num_channels_latents,
                                                  height, width, prompt_embeds.dtype, device, generator, latents)

        # Timesteps exactly as FluxPipeline sets them; each rank later keeps its own sub-sequence.
        scheduler = pipe.scheduler
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        num_steps = len(scheduler.timesteps)

        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])

        model = FluxBandModel(pipe, prompt_embeds, pooled_prompt_embeds, text_ids, image_ids, guidance,
                              joint_attention_kwargs)
        result = self._stadi_denoise(latents, scheduler, model, height=height, width=width, num_steps=num_steps)
        return self._finish(result.latents, output_type, return_dict, None)

    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        pipe = self.module
        config = self.stadi_state.input_config
        latents = pipe._unpack_latents(latents, config.height, config.width, pipe.vae_scale_factor)
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor

    def _pipeline_output(self, images):
        return FluxPipelineOutput(images=images)
