"""PixArt-α and PixArt-Σ (diffusers `PixArtTransformer2DModel`) under STADI.

Latents are (batch, 4, H, W); a band is a range of latent rows in units of the patch size (2),
so `band_dim` is 2. Positions: xDiT's `xFuserPatchEmbedWrapper` regenerates the sincos table for
the full image and slices the band's global token range. Self-attention (`attn1`) sees the
other bands through the displaced K/V store; cross-attention to the text is replicated. Each
rank feeds its own timestep to AdaLN-single. CFG runs as a batch of two, or one branch per rank
with `--use_cfg_parallel` (`CfgPair`).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
    retrieve_timesteps,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from xfuser.model_executor.pipelines import xFuserPixArtAlphaPipeline, xFuserPixArtSigmaPipeline

from stadi_xdit.models import register_twin
from stadi_xdit.runtime.band_attention import BandAttentionProcessor
from stadi_xdit.runtime.layout import BandLayout
from stadi_xdit.xdit.cfg import CfgPair
from stadi_xdit.xdit.injection import InjectionPlan, PatchEmbedPositions
from stadi_xdit.xdit.pipelines import StadiPipelineMixin, XditBandModel

_PIXART_BINS = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN,
                32: ASPECT_RATIO_256_BIN}



class StadiSelfAttnProcessor(BandAttentionProcessor, AttnProcessor2_0):
    """Self-attention (PixArt `attn1`) whose K/V come from a `DisplacedKVStore`.

    Cross-attention to text is untouched: text tokens are replicated on every rank.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("StadiSelfAttnProcessor serves self-attention without a mask only")
        residual = hidden_states
        batch, _, _ = hidden_states.shape
        head_dim = attn.to_q.out_features // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out, _ = self.attend(query, key, value)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


PIXART_INJECTION = InjectionPlan(
    positions=PatchEmbedPositions("pos_embed"),
    displaced_attention=lambda transformer: [block.attn1 for block in transformer.transformer_blocks],
    processor_factory=StadiSelfAttnProcessor,
)


class PixArtBandModel(XditBandModel):
    """PixArt on one band: classifier-free guidance, learned-sigma split, own timestep."""

    band_dim = 2  # latents are (batch, channels, height, width)

    def __init__(self, pipe, scheduler, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                 added_cond_kwargs: dict, guidance_scale: float, cfg: CfgPair):
        self.pipe = pipe
        self.scheduler = scheduler
        self.prompt_embeds = prompt_embeds
        self.prompt_mask = prompt_mask
        self.added_cond_kwargs = added_cond_kwargs
        self.guidance_scale = guidance_scale
        self.cfg = cfg

    def band_sizes(self, layout: BandLayout) -> list[int]:
        return layout.latent_row_counts()

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        model_input = self.cfg.model_input(band_latents)
        model_input = self.scheduler.scale_model_input(model_input, timestep)
        timesteps = torch.as_tensor(timestep, device=model_input.device).reshape(1).expand(model_input.shape[0])
        output = self.pipe.transformer(
            model_input,
            encoder_hidden_states=self.prompt_embeds,
            encoder_attention_mask=self.prompt_mask,
            timestep=timesteps,
            added_cond_kwargs=self.added_cond_kwargs,
            return_dict=False,
        )[0]
        output = self.cfg.guide(output, self.guidance_scale)
        latent_channels = self.pipe.transformer.config.in_channels
        if self.pipe.transformer.config.out_channels // 2 == latent_channels:
            output = output.chunk(2, dim=1)[0]  # learned sigma: keep the noise half
        return output


class StadiPixArtMixin(StadiPipelineMixin):
    injection_plan = PIXART_INJECTION
    ulysses_groups = True  # its positions: xDiT's patch-embed wrapper, which reads each part's global tokens

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt: str = "", num_inference_steps: int = 20,
                 timesteps=None, sigmas=None, guidance_scale: float = 4.5, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, eta: float = 0.0, generator=None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 prompt_attention_mask: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, clean_caption: bool = False, use_resolution_binning: bool = True,
                 max_sequence_length: int = 120, **kwargs):
        """PixArt's `__call__` under STADI: same arguments as xDiT's and diffusers' pipelines.

        Of xDiT's decorators only `torch.no_grad` applies: `enable_data_parallel` would split the
        prompts over the dp slot that STADI occupies (every rank of a group needs them all),
        STADI is never the naive forward, and DiTFastAttn is refused at configuration time.
        """
        pipe = self.module
        config = pipe.transformer.config
        height = height or config.sample_size * pipe.vae_scale_factor
        width = width or config.sample_size * pipe.vae_scale_factor
        orig_size = (height, width)
        if use_resolution_binning:
            if config.sample_size not in _PIXART_BINS:
                raise ValueError(f"no resolution bins for sample_size {config.sample_size}; "
                                 "pass use_resolution_binning=False")
            height, width = pipe.image_processor.classify_height_width_bin(
                height, width, ratios=_PIXART_BINS[config.sample_size])
        pipe.check_inputs(prompt, height, width, negative_prompt, 1, prompt_embeds, negative_prompt_embeds,
                          prompt_attention_mask, negative_prompt_attention_mask)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = pipe._execution_device
        do_cfg = guidance_scale > 1.0

        self._start_call(height=height, width=width, batch_size=batch_size,
                         num_inference_steps=num_inference_steps)
        self._geometry(height, width)  # size errors before any text encoding

        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompt, do_cfg, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            device=device, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption, max_sequence_length=max_sequence_length)
        cfg = CfgPair.create(do_cfg, self.groups.cfg)
        embeds, mask = cfg.text_batch(neg_embeds, embeds, neg_mask, mask)

        scheduler = pipe.scheduler
        retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        latents = pipe.prepare_latents(batch_size * num_images_per_prompt, config.in_channels, height, width,
                                       embeds.dtype, device, generator, latents)
        added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        if config.sample_size == 128:
            images = batch_size * num_images_per_prompt
            resolution = torch.tensor([height, width], dtype=embeds.dtype, device=device).repeat(images, 1)
            aspect = torch.tensor([float(height / width)], dtype=embeds.dtype, device=device).repeat(images, 1)
            added_cond_kwargs = {"resolution": cfg.condition_batch(resolution),
                                 "aspect_ratio": cfg.condition_batch(aspect)}

        model = PixArtBandModel(pipe, scheduler, embeds, mask, added_cond_kwargs, guidance_scale, cfg)
        result = self._stadi_denoise(latents, scheduler, model, height=height, width=width,
                                     num_steps=num_inference_steps)
        return self._finish(result.latents, output_type, return_dict, orig_size if use_resolution_binning else None)


@register_twin
class StadiPixArtAlphaPipeline(StadiPixArtMixin, xFuserPixArtAlphaPipeline):
    """PixArt-α under STADI."""

    diffusers_pipelines = ("PixArtAlphaPipeline",)  # PixArt is not in xDiT's runner registry


@register_twin
class StadiPixArtSigmaPipeline(StadiPixArtMixin, xFuserPixArtSigmaPipeline):
    """PixArt-Σ under STADI."""

    diffusers_pipelines = ("PixArtSigmaPipeline",)
