"""xFuser pipeline subclasses that run STADI's denoising loop (PixArt-α and PixArt-Σ).

Construction goes through xDiT unchanged (`from_pretrained` builds `cls(pipeline, engine_config)`);
what differs is the runtime state (bands from a plan), the transformer (removable STADI
injection instead of xDiT's wrappers) and `__call__` (warmup, profile, plan, periods, gather).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
    retrieve_timesteps,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from xfuser.core.distributed import (
    get_cfg_group,
    get_classifier_free_guidance_rank,
    get_classifier_free_guidance_world_size,
    get_dp_group,
    get_world_group,
)
from xfuser.model_executor.pipelines import xFuserPixArtAlphaPipeline, xFuserPixArtSigmaPipeline

from stadi_xdit.config import StadiConfig
from stadi_xdit.planner import Plan
from stadi_xdit.runtime.comm import BandComm
from stadi_xdit.runtime.faults import PeerWatch
from stadi_xdit.runtime.kv import DisplacedKVStore
from stadi_xdit.runtime.layout import BandLayout
from stadi_xdit.runtime.loop import DenoiseResult, denoise
from stadi_xdit.runtime.profile_cache import ProfileCache, profile_key
from stadi_xdit.runtime.schedule import to_subsequence_capable
from stadi_xdit.xdit.cfg import CfgExchange
from stadi_xdit.xdit.injection import PIXART_INJECTION, InjectionPlan, apply_injection
from stadi_xdit.xdit.runtime_state import StadiRuntimeState, install_runtime_state

_PIXART_BINS = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN,
                32: ASPECT_RATIO_256_BIN}


def hardware_identity() -> str:
    """What this rank runs on: the GPU's name, or on CPU the host and the cores it may use."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    spans, start = [], None
    for i, core in enumerate(cores):
        start = core if start is None else start
        if i + 1 == len(cores) or cores[i + 1] != core + 1:
            spans.append(str(start) if start == core else f"{start}-{core}")
            start = None
    return f"{socket.gethostname()}/cpu{'+'.join(spans) or '?'}"


def _bounded_comm(group, timeout_seconds: float) -> BandComm:
    """STADI's collectives over one xDiT group: bounded waits, and a failed peer named by rank."""
    watch = PeerWatch(list(group.ranks), group.rank_in_group, timeout_seconds)
    return BandComm(group.device_group, group.rank_in_group, group.world_size,
                    timedelta(seconds=timeout_seconds), watch=watch)


def stadi_config_of(engine_config: Any) -> StadiConfig:
    config = getattr(engine_config, "stadi_config", None)
    return config if config is not None else StadiConfig(use_stadi=True)


class PixArtBandModel:
    """PixArt on one band: classifier-free guidance, learned-sigma split, own timestep."""

    band_dim = 2  # latents are (batch, channels, height, width)

    def __init__(self, pipe, scheduler, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                 added_cond_kwargs: dict, guidance_scale: float, cfg: CfgExchange):
        self.pipe = pipe
        self.scheduler = scheduler
        self.prompt_embeds = prompt_embeds
        self.prompt_mask = prompt_mask
        self.added_cond_kwargs = added_cond_kwargs
        self.guidance_scale = guidance_scale
        self.cfg = cfg
        self.evaluations = 0

    def band_sizes(self, layout: BandLayout) -> list[int]:
        return layout.latent_row_counts()

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
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


class StadiPipelineMixin:
    """STADI's part of an xFuser pipeline wrapper; the xFuser base class follows it in the MRO."""

    injection_plan: InjectionPlan

    def __init__(self, pipeline, engine_config, cache_args=None, stadi_config: StadiConfig | None = None):
        self.stadi_config = stadi_config or stadi_config_of(engine_config)
        self.injection = None
        self.last_result: DenoiseResult | None = None
        super().__init__(pipeline, engine_config, cache_args)

    # --- xDiT override points -------------------------------------------------------------
    def _init_runtime_state(self, pipeline, engine_config) -> None:
        # Building the runtime state creates xDiT's process groups; STADI's group is the dp group.
        state = StadiRuntimeState(pipeline, engine_config)
        install_runtime_state(state)
        dp = get_dp_group()
        self.stadi_config.check_world(dp.world_size)
        self.stadi_comm = _bounded_comm(dp, self.stadi_config.timeout_seconds)
        self.cfg_comm = _bounded_comm(get_cfg_group(), self.stadi_config.timeout_seconds)
        self.kv_store = DisplacedKVStore(self.stadi_comm)

    def _convert_transformer_backbone(self, transformer, **kwargs):
        self.injection = apply_injection(transformer, self.injection_plan, self.kv_store)
        return transformer

    def _convert_scheduler(self, scheduler):
        return to_subsequence_capable(scheduler)

    def use_naive_forward(self) -> bool:
        return False

    def is_dp_last_group(self) -> bool:
        """The one rank that returns decoded images (xDiT example scripts save on it)."""
        if self.engine_config.runtime_config.use_parallel_vae:
            return get_world_group().rank == 0
        return (self.stadi_comm.rank == self.stadi_comm.world_size - 1
                and get_classifier_free_guidance_rank() == get_classifier_free_guidance_world_size() - 1)

    def remove_stadi(self) -> None:
        """Give the transformer back exactly as it was before wrapping."""
        if self.injection is not None:
            self.injection.remove()
            self.injection = None

    # --- helpers --------------------------------------------------------------------------
    @property
    def stadi_state(self) -> StadiRuntimeState:
        from xfuser.core.distributed import get_runtime_state

        return get_runtime_state()

    def _layout_for(self, plan: Plan) -> BandLayout:
        state = self.stadi_state
        tokens_per_row = state.input_config.width // state.vae_scale_factor // state.backbone_patch_size
        return BandLayout.from_plan(plan, state.backbone_patch_size, tokens_per_row)

    def _profile_key(self, height: int, width: int) -> str:
        """Model, resolution and every rank's hardware; the same string on every rank of the run.

        The hardware part lists each STADI group (one per CFG branch) in rank order, so a cached
        entry is only reused on the same devices in the same rank positions.
        """
        transformer = self.module.transformer
        hardware = self._gather_over_stadi_ranks(hardware_identity())
        return profile_key(type(transformer).__name__, transformer.config, height, width, hardware)

    def _known_speeds(self, key: str | None) -> list[float] | None:
        if self.stadi_config.speeds:
            return list(self.stadi_config.speeds)
        if self.stadi_config.profile_cache and key is not None:
            # One rank reads, everyone uses its answer: ranks must agree on the warmup bands even
            # when the file is not on a shared filesystem or is being replaced.
            speeds = None
            if self._is_stadi_leader():
                speeds = ProfileCache(self.stadi_config.profile_cache).load(key, self.stadi_comm.world_size)
            return self._from_stadi_leader(speeds)
        return None

    def _remember_speeds(self, key: str | None, result: DenoiseResult) -> None:
        # The plan's speeds: the measured ones, combined over CFG pairs; the newest measurement wins.
        # A storage error only warns (inside `store`): the finished run's output is not lost.
        if (self.stadi_config.profile_cache and key is not None and result.measured_speeds
                and self._is_stadi_leader()):
            ProfileCache(self.stadi_config.profile_cache).store(key, list(result.plan.speeds))

    def _is_stadi_leader(self) -> bool:
        return self.stadi_comm.rank == 0 and self.cfg_comm.rank == 0

    def _gather_over_stadi_ranks(self, text: str) -> list[list[str]]:
        """`text` of every rank: one list per CFG branch, each in STADI-rank order (bounded waits)."""
        device = self.module._execution_device
        self.stadi_comm.enter("profile-cache")
        group = self.stadi_comm.all_gather_text(text, device)
        return [json.loads(branch) for branch in self.cfg_comm.all_gather_text(json.dumps(group), device)]

    def _from_stadi_leader(self, speeds: list[float] | None) -> list[float] | None:
        """The leader's `speeds` (STADI rank 0 of CFG branch 0) on every rank (bounded waits)."""
        return json.loads(self._gather_over_stadi_ranks(json.dumps(speeds))[0][0])

    def _rows_and_align(self, height: int, width: int) -> tuple[int, int]:
        state = self.stadi_state
        scale, patch = state.vae_scale_factor, state.backbone_patch_size
        if height % (scale * patch) or width % (scale * patch):
            raise ValueError(f"--height/--width must be multiples of {scale * patch} px "
                             f"(VAE scale {scale} x patch {patch}), got {height}x{width}")
        return height // scale // patch, 1

    def _warmup_steps(self, num_steps: int) -> int:
        warmup = self.engine_config.runtime_config.warmup_steps
        if self.stadi_config.exact:
            return min(warmup, num_steps - 1) if num_steps > 1 else 0
        if warmup < 1 or warmup >= num_steps:
            raise ValueError(f"--warmup_steps must be in [1, num_inference_steps - 1] with --use_stadi, "
                             f"got {warmup} for {num_steps} steps")
        return warmup

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool,
                orig_size: tuple[int, int] | None):
        pipe = self.module
        if output_type == "latent":
            image = latents
        elif self.engine_config.runtime_config.use_parallel_vae:
            # distvae's decoder is collective: every rank decodes its part.
            image = pipe.vae.decode(self._latents_for_vae(latents), return_dict=False)[0]
        elif self.is_dp_last_group():
            image = pipe.vae.decode(self._latents_for_vae(latents), return_dict=False)[0]
        else:
            image = None
        if output_type != "latent":
            if not self.is_dp_last_group():
                return None
            if orig_size is not None:
                image = pipe.image_processor.resize_and_crop_tensor(image, *orig_size)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        return self._pipeline_output(image) if return_dict else (image,)

    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The full latent as the VAE decoder takes it (PixArt: unscaled; Flux overrides: unpacked)."""
        return latents / self.module.vae.config.scaling_factor

    def _pipeline_output(self, images):
        return ImagePipelineOutput(images=images)

    def _stadi_denoise(self, latents: torch.Tensor, scheduler, model, *, height: int, width: int,
                       num_steps: int, combine_speeds: Callable[[list[float]], list[float]] | None = None
                       ) -> DenoiseResult:
        """`denoise()` with this pipeline's state, plan inputs and profile cache; sets `last_result`."""
        rows, align = self._rows_and_align(height, width)
        key = self._profile_key(height, width) if self.stadi_config.profile_cache else None
        result = denoise(
            latents, scheduler, model, comm=self.stadi_comm, store=self.kv_store, config=self.stadi_config,
            rows=rows, align=align, warmup_steps=self._warmup_steps(num_steps),
            on_layout=self.stadi_state.apply_layout, layout_for=self._layout_for,
            known_speeds=self._known_speeds(key), combine_speeds=combine_speeds or (lambda speeds: speeds))
        self.kv_store.reset()
        self._remember_speeds(key, result)
        self.last_result = result
        return result


class StadiPixArtMixin(StadiPipelineMixin):
    injection_plan = PIXART_INJECTION

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

        state = self.stadi_state
        state.set_input_parameters(height=height, width=width, batch_size=batch_size,
                                   num_inference_steps=num_inference_steps)
        self._rows_and_align(height, width)  # size errors before any text encoding

        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompt, do_cfg, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            device=device, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption, max_sequence_length=max_sequence_length)
        cfg = CfgExchange.create(do_cfg, self.cfg_comm)
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
                                     num_steps=num_inference_steps,
                                     combine_speeds=lambda speeds: cfg.pairwise_min(speeds, latents.device))
        return self._finish(result.latents, output_type, return_dict, orig_size if use_resolution_binning else None)


class StadiPixArtAlphaPipeline(StadiPixArtMixin, xFuserPixArtAlphaPipeline):
    """PixArt-α under STADI."""


class StadiPixArtSigmaPipeline(StadiPixArtMixin, xFuserPixArtSigmaPipeline):
    """PixArt-Σ under STADI."""
