"""Qwen-Image (diffusers `QwenImageTransformer2DModel`) under STADI.

What xfuser 0.7.0 offers: no pipeline wrapper for Qwen-Image. Its runner model ("Qwen-Image")
drives diffusers' `QwenImagePipeline` directly with a sequence-parallel transformer
(`xFuserQwenImageTransformerWrapper`); `xFuserQwenImageEditPipeline` covers only the edit model's
true-CFG split. So this module adds `xFuserQwenImagePipeline`, a thin `xFuserPipelineBaseWrapper`
around `QwenImagePipeline`, and the STADI twin subclasses it like the other families.

Latents are packed 2x2 as in Flux: (batch, tokens, 4·C) in row-major token order, one token row
per 16 px (the runtime state sees VAE scale 8 and patch 2). A band is a contiguous range of whole
token rows along dim 1. The transformer is run on the band with `img_shapes` of the *full* image,
so `QwenEmbedRope` builds the full image's (centred, `scale_rope`) frequencies and the text
positions that follow them; `StadiQwenImageAttnProcessor` slices the image frequencies by the
band's global token range, then takes the other bands' image K/V (after RoPE) from the displaced
store. Text is replicated on every rank and its K/V are always fresh.

True CFG (`true_cfg_scale > 1` with a negative prompt) runs as a batch of two, the two prompts
padded to one length with a text mask (diffusers runs two batch-1 calls; padded keys are masked,
so the attention is the same), or with `--use_cfg_parallel` one branch per rank. The guided
prediction is rescaled to the conditional one's per-token norm, as in `QwenImagePipeline`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from torch import nn

from stadi_xdit.models import register_twin
from stadi_xdit.runtime.band_attention import BandAttentionProcessor, Stream
from stadi_xdit.runtime.layout import BandLayout
from stadi_xdit.xdit.cfg import CfgPair
from stadi_xdit.xdit.injection import InjectionPlan, SlicedPositions
from stadi_xdit.xdit.pipelines import DiffusersPipelineWrapper, StadiPipelineMixin, XditBandModel


class StadiQwenImageAttnProcessor(BandAttentionProcessor):
    """diffusers' `QwenDoubleStreamAttnProcessor2_0` with the band's RoPE rows and displaced image K/V."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if encoder_hidden_states is None:
            raise ValueError("StadiQwenImageAttnProcessor needs encoder_hidden_states (the text stream)")
        band = self.band
        start, end = band.token_range
        if attention_mask is not None:
            encoder_hidden_states_mask = _text_mask_of_joint_mask(attention_mask, encoder_hidden_states.shape[1],
                                                                  end - start, encoder_hidden_states_mask)
        image_tokens = sum(band.token_counts)
        if hidden_states.shape[1] != end - start:
            raise RuntimeError(f"band has {hidden_states.shape[1]} image tokens, the layout says {end - start}")

        # (batch, tokens, heads, head_dim), exactly as diffusers' processor.
        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = (proj(hidden_states).unflatten(-1, (-1, head_dim))
                                         for proj in (attn.to_q, attn.to_k, attn.to_v))
        txt_query, txt_key, txt_value = (proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                                         for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            if img_freqs.shape[0] != image_tokens:
                raise RuntimeError(f"image RoPE covers {img_freqs.shape[0]} tokens, not the full image's "
                                   f"{image_tokens}: pass img_shapes of the full image")
            img_freqs = band.positions(img_freqs)
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        # To (batch, heads, tokens, head_dim), the store's and SDPA's layout; joint order [text, image].
        text = Stream(*(x.transpose(1, 2) for x in (txt_query, txt_key, txt_value)), first=True,
                      key_mask=encoder_hidden_states_mask)
        img_out, txt_out = self.attend(*(x.transpose(1, 2) for x in
                                                                    (img_query, img_key, img_value)), text)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())


def _text_mask_of_joint_mask(joint: torch.Tensor, text_tokens: int, band_tokens: int,
                             text_mask: torch.Tensor | None) -> torch.Tensor:
    """The text key mask inside the joint `[text, image]` mask that xDiT's Qwen-Image transformer
    (`xFuserQwenImageTransformer2DWrapper`, the runner's) builds once per forward in place of
    `encoder_hidden_states_mask`: text mask, then ones over this band's image tokens. The processor keeps
    the text part and masks the other bands' stale keys itself; any other mask is refused."""
    if text_mask is not None:
        raise ValueError("StadiQwenImageAttnProcessor takes encoder_hidden_states_mask or xDiT's joint "
                         "attention_mask, not both")
    if joint.dim() != 2 or joint.shape[1] != text_tokens + band_tokens:
        raise ValueError(f"StadiQwenImageAttnProcessor takes a joint [text, image] key mask of shape "
                         f"(batch, {text_tokens + band_tokens}), got {tuple(joint.shape)}")
    return joint[:, :text_tokens]


QWEN_IMAGE_INJECTION = InjectionPlan(
    positions=SlicedPositions("StadiQwenImageAttnProcessor: the band's rows of the image's RoPE table"),
    displaced_attention=lambda transformer: [block.attn for block in transformer.transformer_blocks],
    processor_factory=StadiQwenImageAttnProcessor,
)


class TrueCfgExchange(CfgPair):
    """`CfgPair` that also hands back both branches: Qwen-Image rescales by the conditional norm."""

    def branches(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) predictions for this band."""
        if self.parallel:
            uncond, cond = self._pair(output)
            return uncond, cond
        uncond, cond = output.chunk(2)
        return uncond, cond


def _pad_text(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    pad = length - embeds.shape[1]
    return F.pad(embeds, (0, 0, 0, pad)), F.pad(mask, (0, pad))


def branch_text(cfg: CfgPair, negative: torch.Tensor | None, negative_mask: torch.Tensor | None,
                positive: torch.Tensor, positive_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's text batch; a batched pair is padded to one length, padding masked out."""
    if cfg.batched:
        length = max(negative.shape[1], positive.shape[1])
        negative, negative_mask = _pad_text(negative, negative_mask, length)
        positive, positive_mask = _pad_text(positive, positive_mask, length)
    embeds, mask = cfg.text_batch(negative, positive, negative_mask, positive_mask)
    if mask is not None and mask.all():
        mask = None  # as QwenImagePipeline.encode_prompt: nothing to mask
    return embeds, mask


class QwenImageBandModel(XditBandModel):
    """Qwen-Image on one band of packed latent tokens."""

    band_dim = 1  # packed latents are (batch, tokens, channels)

    def __init__(self, transformer: nn.Module, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor | None,
                 image_shape: tuple[int, int, int], guidance: torch.Tensor | None, true_cfg_scale: float,
                 cfg: TrueCfgExchange, attention_kwargs: dict[str, Any] | None = None):
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.prompt_mask = prompt_mask
        self.image_shape = image_shape  # (frames, token rows, token columns) of the full image
        self.guidance = guidance
        self.true_cfg_scale = true_cfg_scale
        self.cfg = cfg
        self.attention_kwargs = attention_kwargs or {}

    def band_sizes(self, layout: BandLayout) -> list[int]:
        return layout.token_counts()

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        model_input = self.cfg.model_input(band_latents)
        batch = model_input.shape[0]
        timesteps = timestep.expand(batch).to(model_input.dtype)  # as QwenImagePipeline, scaled to [0, 1]
        output = self.transformer(
            hidden_states=model_input,
            timestep=timesteps / 1000,
            guidance=None if self.guidance is None else self.guidance.expand(batch),
            encoder_hidden_states_mask=self.prompt_mask,
            encoder_hidden_states=self.prompt_embeds,
            img_shapes=[[self.image_shape]] * batch,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0]
        if not self.cfg.enabled:
            return output
        uncond, cond = self.cfg.branches(output)
        combined = uncond + self.true_cfg_scale * (cond - uncond)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        return combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))


class xFuserQwenImagePipeline(DiffusersPipelineWrapper):
    """xFuser-style wrapper of diffusers' `QwenImagePipeline`, which xfuser 0.7.0 lacks."""

    diffusers_class = QwenImagePipeline


@register_twin
class StadiQwenImagePipeline(StadiPipelineMixin, xFuserQwenImagePipeline):
    """Qwen-Image under STADI; construct it like the other twins (`from_pretrained` or `cls(pipe, config)`)."""

    diffusers_pipelines = ("QwenImagePipeline",)
    runner_models = ("xFuserQwenImageModel",)  # xfuser.runner's registry classes it serves

    injection_plan = QWEN_IMAGE_INJECTION
    ulysses_groups = True  # its positions: the processor slices the RoPE table with the part's BandView

    def __init__(self, pipeline, engine_config, cache_args=None, stadi_config=None, **options):
        config = pipeline.transformer.config
        if config.get("zero_cond_t", False) or config.get("use_layer3d_rope", False):
            raise ValueError("--use_stadi serves text-to-image Qwen-Image only (no zero_cond_t / layered RoPE)")
        super().__init__(pipeline, engine_config, cache_args, stadi_config, **options)

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, true_cfg_scale: float = 4.0, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, sigmas: list[float] | None = None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1, generator=None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 prompt_embeds_mask: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds_mask: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, attention_kwargs: dict[str, Any] | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None,
                 max_sequence_length: int = 512):
        """QwenImagePipeline's `__call__` under STADI, same arguments (step callbacks refused)."""
        if callback_on_step_end is not None:
            raise ValueError("callback_on_step_end is not supported with --use_stadi (ranks hold bands)")
        pipe = self.module
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(prompt, height, width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                          max_sequence_length=max_sequence_length)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = pipe._execution_device
        do_true_cfg = true_cfg_scale > 1 and (negative_prompt is not None or negative_prompt_embeds is not None)
        if self.groups.cfg.world_size > 1 and not do_true_cfg:  # one branch per rank needs both branches
            raise ValueError("--use_cfg_parallel needs true_cfg_scale > 1 and a negative prompt")

        self._start_call(height=height, width=width, batch_size=batch_size,
                         num_inference_steps=num_inference_steps,
                         max_condition_sequence_length=max_sequence_length, split_text_embed_in_sp=False)
        self._geometry(height, width)  # size errors before any text encoding

        def encode(text, embeds, mask):
            return pipe.encode_prompt(prompt=text, prompt_embeds=embeds, prompt_embeds_mask=mask, device=device,
                                      num_images_per_prompt=num_images_per_prompt,
                                      max_sequence_length=max_sequence_length)

        embeds, mask = encode(prompt, prompt_embeds, prompt_embeds_mask)
        neg_embeds, neg_mask = (encode(negative_prompt, negative_prompt_embeds, negative_prompt_embeds_mask)
                                if do_true_cfg else (None, None))
        cfg = TrueCfgExchange.create(do_true_cfg, self.groups.cfg)
        embeds, mask = branch_text(cfg, neg_embeds, neg_mask, embeds, mask)

        # Every rank samples the full initial latent from the same generator, as one process would.
        latents = pipe.prepare_latents(batch_size * num_images_per_prompt, pipe.transformer.config.in_channels // 4,
                                       height, width, embeds.dtype, device, generator, latents)
        scale = pipe.vae_scale_factor
        image_shape = (1, height // scale // 2, width // scale // 2)

        # Timesteps exactly as QwenImagePipeline sets them (mu from the full image's token count).
        scheduler = pipe.scheduler
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)

        guidance = None
        if pipe.transformer.config.guidance_embeds:
            if guidance_scale is None:
                raise ValueError("guidance_scale is required for a guidance-distilled model")
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)

        model = QwenImageBandModel(pipe.transformer, embeds, mask, image_shape, guidance, true_cfg_scale, cfg,
                                   attention_kwargs)
        result = self._stadi_denoise(latents, scheduler, model, height=height, width=width,
                                     num_steps=len(scheduler.timesteps))
        return self._finish(result.latents, output_type, return_dict, None)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Qwen-Image's VAE is a video VAE: it decodes (batch, C, frames, H, W); keep frame 0, as diffusers.
        return self.module.vae.decode(self._latents_for_vae(latents), return_dict=False)[0][:, :, 0]

    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        pipe, config = self.module, self.stadi_state.input_config
        latents = pipe._unpack_latents(latents, config.height, config.width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        vae_config = pipe.vae.config
        shape = (1, vae_config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae_config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae_config.latents_std).view(shape).to(latents.device, latents.dtype)
        return latents / inverse_std + mean

    def _pipeline_output(self, images):
        return QwenImagePipelineOutput(images=images)
