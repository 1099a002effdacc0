"""Stable Diffusion 3 / 3.5 (diffusers `SD3Transformer2DModel`) under STADI.

What xfuser 0.7.0 offers: `xFuserStableDiffusion3Pipeline` (its runner model "SD3.5" loads through
it); `StadiStableDiffusion3Pipeline` subclasses it as StadiFluxPipeline subclasses xFuserFluxPipeline.

Latents are (batch, 16, H, W); a band is a range of latent rows in units of the patch size (2), so
`band_dim` is 2 as for PixArt, and the transformer unpatchifies the band itself (it reads the
height from its input). Positions: SD3's PatchEmbed crops a `pos_embed_max_size`² sincos table to
the image, centred. xDiT's `xFuserPatchEmbedWrapper` crops it for the *full* latent (height from
the runtime state, width from the band, which spans the full width) and then slices the band's
global token range, so every band gets its global rows; the exact-mode tests check this against
one process on bands with an odd number of token rows.

Every JointTransformerBlock attends over `[image, text]` (SD3's order); SD3.5-medium blocks listed
in `dual_attention_layers` also have `attn2`, an image-only self-attention. Both go through
`StadiSD3AttnProcessor`: image K/V of the other bands come from the displaced K/V store, text K/V
are always fresh (text is replicated on every rank). The last block is `context_pre_only`: its
text output is dropped, as in diffusers. CFG runs as a batch of two or, with
`--use_cfg_parallel`, one branch per rank (`CfgPair`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from torch import nn
from xfuser.model_executor.pipelines import xFuserStableDiffusion3Pipeline

from stadi_xdit.models import register_twin
from stadi_xdit.runtime.band_attention import BandAttentionProcessor, Stream
from stadi_xdit.runtime.layout import BandLayout
from stadi_xdit.xdit.cfg import CfgPair
from stadi_xdit.xdit.injection import InjectionPlan, PatchEmbedPositions
from stadi_xdit.xdit.pipelines import StadiPipelineMixin, XditBandModel


class StadiSD3AttnProcessor(BandAttentionProcessor):
    """diffusers' `JointAttnProcessor2_0` with displaced image K/V; serves `attn` and `attn2`."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("StadiSD3AttnProcessor does not support attention masks")
        batch = hidden_states.shape[0]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, head_dim)
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # Queries stay the band's; keys/values cover the full image, other bands from the store.
        text = None
        if encoder_hidden_states is not None:  # joint attention: the text stream follows the image
            txt_query, txt_key, txt_value = (heads(proj(encoder_hidden_states))
                                             for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                txt_query = attn.norm_added_q(txt_query)
            if attn.norm_added_k is not None:
                txt_key = attn.norm_added_k(txt_key)
            text = Stream(txt_query, txt_key, txt_value, first=False)
        image_out, txt_out = self.attend(query, key, value, text)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if text is None:
            return image_out
        if not attn.context_pre_only:
            txt_out = attn.to_add_out(txt_out)
        return image_out, txt_out


def sd3_attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """K/V layer ids: every block's joint `attn`, then the `attn2` of SD3.5 dual-attention blocks."""
    blocks = transformer.transformer_blocks
    return [block.attn for block in blocks] + [block.attn2 for block in blocks if block.attn2 is not None]


SD3_INJECTION = InjectionPlan(
    positions=PatchEmbedPositions("pos_embed"),  # xDiT's wrapper: the cropped sincos table, by global tokens
    displaced_attention=sd3_attention_modules,
    processor_factory=StadiSD3AttnProcessor,
)


class SD3BandModel(XditBandModel):
    """SD3 on one band of latent rows: CFG batch or pair, the rank's own timestep."""

    band_dim = 2  # latents are (batch, channels, height, width)

    def __init__(self, transformer: nn.Module, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                 guidance_scale: float, cfg: CfgPair, joint_attention_kwargs: dict[str, Any] | None = None):
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.pooled_prompt_embeds = pooled_prompt_embeds
        self.guidance_scale = guidance_scale
        self.cfg = cfg
        self.joint_attention_kwargs = joint_attention_kwargs

    def band_sizes(self, layout: BandLayout) -> list[int]:
        return layout.latent_row_counts()

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        model_input = self.cfg.model_input(band_latents)
        output = self.transformer(
            hidden_states=model_input,
            timestep=timestep.expand(model_input.shape[0]),  # as StableDiffusion3Pipeline: unscaled
            encoder_hidden_states=self.prompt_embeds,
            pooled_projections=self.pooled_prompt_embeds,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
        return self.cfg.guide(output, self.guidance_scale)


@register_twin
class StadiStableDiffusion3Pipeline(StadiPipelineMixin, xFuserStableDiffusion3Pipeline):
    """SD3/SD3.5 under STADI; construct it like `xFuserStableDiffusion3Pipeline`."""

    diffusers_pipelines = ("StableDiffusion3Pipeline",)
    runner_models = ("xFuserStableDiffusionModel",)  # xfuser.runner's registry classes it serves

    injection_plan = SD3_INJECTION
    ulysses_groups = True  # its positions: xDiT's patch-embed wrapper, which reads each part's global tokens

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 28, sigmas: list[float] | None = None,
                 guidance_scale: float = 7.0, negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None,
                 num_images_per_prompt: int = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, joint_attention_kwargs: dict[str, Any] | None = None,
                 clip_skip: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, max_sequence_length: int = 256,
                 skip_guidance_layers: list[int] | None = None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_stop: float = 0.2, skip_layer_guidance_start: float = 0.01,
                 mu: float | None = None):
        """StableDiffusion3Pipeline's `__call__` under STADI, same arguments.

        Only `torch.no_grad` of xDiT's decorators applies (see StadiPixArtMixin.__call__).
        Skip-layer guidance, IP-adapters and step callbacks are refused: each needs the full
        latent or a different set of attention layers per call.
        """
        if skip_guidance_layers is not None:
            raise ValueError("skip_guidance_layers is not supported with --use_stadi")
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise ValueError("IP-adapters are not supported with --use_stadi")
        if callback_on_step_end is not None:
            raise ValueError("callback_on_step_end is not supported with --use_stadi (ranks hold bands)")
        pipe = self.module
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          max_sequence_length=max_sequence_length)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = pipe._execution_device
        do_cfg = guidance_scale > 1

        self._start_call(height=height, width=width, batch_size=batch_size,
                         num_inference_steps=num_inference_steps, split_text_embed_in_sp=False)
        self._geometry(height, width)  # size errors before any text encoding

        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=do_cfg, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=(joint_attention_kwargs or {}).get("scale"))
        cfg = CfgPair.create(do_cfg, self.groups.cfg)
        # text_batch pairs any per-branch tensors; SD3's second one is the pooled embedding, not a mask.
        embeds, pooled = cfg.text_batch(neg_embeds, embeds, neg_pooled, pooled)

        # Every rank samples the full initial latent from the same generator, as one process would.
        latents = pipe.prepare_latents(batch_size * num_images_per_prompt, pipe.transformer.config.in_channels,
                                       height, width, embeds.dtype, device, generator, latents)
        scheduler = pipe.scheduler
        scheduler_kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = pipe.transformer.config.patch_size
            image_seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                                 scheduler.config.get("max_image_seq_len", 4096),
                                 scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.16))
        if mu is not None:
            scheduler_kwargs["mu"] = mu
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs)
        scheduler.set_begin_index(0)

        model = SD3BandModel(pipe.transformer, embeds, pooled, guidance_scale, cfg, joint_attention_kwargs)
        result = self._stadi_denoise(latents, scheduler, model, height=height, width=width,
                                     num_steps=len(scheduler.timesteps))
        return self._finish(result.latents, output_type, return_dict, None)

    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        vae_config = self.module.vae.config
        return latents / vae_config.scaling_factor + vae_config.shift_factor

    def _pipeline_output(self, images):
        return StableDiffusion3PipelineOutput(images=images)
