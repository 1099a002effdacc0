"""Offline diffusers pipelines with the real architectures and random, seeded weights.

No hub access is possible on our machines, so every pipeline here is built from configs:
``tiny`` presets for tests, real-size presets (same layer shapes as the released checkpoints)
for benchmarks. Text goes through a tiny T5 (and CLIP for Flux) whose tokenizers are built
in memory, or callers skip the encoders and pass ``prompt_embeds`` directly.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "FLUX_PRESETS",
    "PIXART_PRESETS",
    "QWEN_IMAGE_PRESETS",
    "SD3_PRESETS",
    "FluxPreset",
    "PixArtPreset",
    "QwenImagePreset",
    "SD3Preset",
    "build_flux_pipeline",
    "build_pixart_pipeline",
    "build_qwen_image_pipeline",
    "build_sd3_pipeline",
    "random_prompt_embeds",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
]


@dataclass(frozen=True)
class PixArtPreset:
    """Transformer shape of a PixArt model; the real ones match the released checkpoints."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    caption_channels: int
    sample_size: int
    interpolation_scale: int | None = None
    use_additional_conditions: bool = False
    # The tiny text encoder width; real presets skip text encoding and use prompt_embeds.
    text_encoder_layers: int = 1


@dataclass(frozen=True)
class FluxPreset:
    num_layers: int
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    pooled_projection_dim: int
    axes_dims_rope: tuple[int, int, int]
    latent_channels: int
    guidance_embeds: bool = False


PIXART_PRESETS: dict[str, PixArtPreset] = {
    "tiny": PixArtPreset(num_layers=2, num_attention_heads=2, attention_head_dim=8, caption_channels=32,
                         sample_size=16),
    # Calibrated for stadi-bench: one step (CFG batch 2) at 512 px takes 0.60-0.72 s on one core of the
    # 2-vCPU dev machine (20.3 M params, ~133 GFLOP/s); K/V exchange is ~10 % of a 2-rank step.
    "small": PixArtPreset(num_layers=8, num_attention_heads=6, attention_head_dim=64, caption_channels=64,
                          sample_size=64),
    "pixart-alpha-1024": PixArtPreset(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                      caption_channels=4096, sample_size=128,
                                      use_additional_conditions=True),
    "pixart-sigma-1024": PixArtPreset(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                      caption_channels=4096, sample_size=128, interpolation_scale=2),
}

FLUX_PRESETS: dict[str, FluxPreset] = {
    "tiny": FluxPreset(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=8,
                       joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
                       latent_channels=4),
    "small": FluxPreset(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
                        joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28),
                        latent_channels=16),
    "flux-dev-1024": FluxPreset(num_layers=19, num_single_layers=38, num_attention_heads=24,
                                attention_head_dim=128, joint_attention_dim=4096, pooled_projection_dim=768,
                                axes_dims_rope=(16, 56, 56), latent_channels=16, guidance_embeds=True),
}


def _tiny_t5(d_model: int, num_layers: int) -> tuple[T5Tokenizer, T5EncoderModel]:
    # A unigram vocabulary given in memory: T5Tokenizer(vocab=...) needs no sentencepiece file.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits]
    pieces += [("\u2581" + ch, -2.5) for ch in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=2, relative_attention_num_buckets=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


def _tiny_clip(hidden_size: int) -> tuple[CLIPTokenizer, CLIPTextModel]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tokenizer, CLIPTextModel(config).eval()


def _tiny_vae(latent_channels: int, **extra: float) -> AutoencoderKL:
    # Four blocks give the real 8x spatial scale, with very few channels.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, **extra,
    ).eval()


def build_pixart_pipeline(preset: str | PixArtPreset = "tiny", variant: str = "alpha", seed: int = 0,
                          with_text_encoder: bool = True) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    """A float32 CPU PixArt-α/Σ pipeline with random weights seeded by ``seed``.

    With ``with_text_encoder=False`` the tokenizer and T5 are left out (pass ``prompt_embeds``).
    """
    if variant not in ("alpha", "sigma"):
        raise ValueError(f"variant must be 'alpha' or 'sigma', got {variant!r}")
    spec = PIXART_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=spec.num_layers,
        cross_attention_dim=spec.num_attention_heads * spec.attention_head_dim,
        caption_channels=spec.caption_channels,
        sample_size=spec.sample_size,
        patch_size=2,
        norm_num_groups=32,
        interpolation_scale=spec.interpolation_scale,
        use_additional_conditions=spec.use_additional_conditions,
    ).eval()
    tokenizer, text_encoder = (_tiny_t5(spec.caption_channels, spec.text_encoder_layers)
                               if with_text_encoder else (None, None))
    scheduler = DPMSolverMultistepScheduler()
    pipeline_cls = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    return pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(4),
                        transformer=transformer, scheduler=scheduler)


def build_flux_pipeline(preset: str | FluxPreset = "tiny", seed: int = 0,
                        with_text_encoder: bool = True) -> FluxPipeline:
    """A float32 CPU Flux.1 pipeline with random weights seeded by ``seed``."""
    spec = FLUX_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec.latent_channels * 4,  # 2x2 latent packing
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.joint_attention_dim,
        pooled_projection_dim=spec.pooled_projection_dim,
        guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=spec.axes_dims_rope,
    ).eval()
    if with_text_encoder:
        tokenizer, text_encoder = _tiny_clip(spec.pooled_projection_dim)
        tokenizer_2, text_encoder_2 = _tiny_t5(spec.joint_attention_dim, 1)
    else:
        tokenizer = text_encoder = tokenizer_2 = text_encoder_2 = None
    vae = _tiny_vae(spec.latent_channels, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False,
                    use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def tiny_pixart_pipeline(variant: str = "alpha", seed: int = 0) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    return build_pixart_pipeline("tiny", variant=variant, seed=seed)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    return build_flux_pipeline("tiny", seed=seed)


def random_prompt_embeds(channels: int, seq_len: int = 8, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Stand-in text embeddings for presets run without a text encoder."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, channels, generator=generator)


# --- Stable Diffusion 3 / 3.5 and Qwen-Image ------------------------------------------------------


@dataclass(frozen=True)
class SD3Preset:
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int  # T5 width; CLIP hidden states are zero-padded up to it
    clip_hidden_size: int  # each of the two CLIPs; pooled projection is twice this
    sample_size: int  # default latent size
    pos_embed_max_size: int
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5-medium style `attn2` blocks
    qk_norm: str | None = "rms_norm"


@dataclass(frozen=True)
class QwenImagePreset:
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    axes_dims_rope: tuple[int, int, int]  # sums to attention_head_dim
    latent_channels: int  # VAE z_dim; the transformer sees 4x that (2x2 packing)


SD3_PRESETS: dict[str, SD3Preset] = {
    # pos_embed_max_size above the test grids, so the centred crop has non-zero offsets.
    "tiny": SD3Preset(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
                      clip_hidden_size=8, sample_size=8, pos_embed_max_size=12, dual_attention_layers=(0,)),
    "small": SD3Preset(num_layers=6, num_attention_heads=4, attention_head_dim=64, joint_attention_dim=64,
                       clip_hidden_size=16, sample_size=64, pos_embed_max_size=96, dual_attention_layers=(0, 1, 2)),
}

QWEN_IMAGE_PRESETS: dict[str, QwenImagePreset] = {
    "tiny": QwenImagePreset(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                            axes_dims_rope=(4, 6, 6), latent_channels=4),
    "small": QwenImagePreset(num_layers=6, num_attention_heads=4, attention_head_dim=64, joint_attention_dim=64,
                             axes_dims_rope=(8, 28, 28), latent_channels=16),
}


def _tiny_clip_with_projection(hidden_size: int, max_length: int):
    """CLIP text encoder with a projection head (SD3's pooled embedding), on `_tiny_clip`'s vocabulary."""
    from transformers import CLIPTextModelWithProjection

    tokenizer, plain = _tiny_clip(hidden_size)
    tokenizer.model_max_length = max_length  # SD3 pads CLIP prompts to this; 77 would dominate tiny runs
    return tokenizer, CLIPTextModelWithProjection(plain.config).eval()


def build_sd3_pipeline(preset: str | SD3Preset = "tiny", seed: int = 0, with_text_encoder: bool = True,
                       clip_max_length: int = 16):
    """A float32 CPU Stable Diffusion 3.5 pipeline (two CLIPs + T5) with random weights seeded by ``seed``.

    With ``with_text_encoder=False`` all three encoders are left out: pass ``prompt_embeds``,
    ``pooled_prompt_embeds`` and, with CFG, their negative twins.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    spec = SD3_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size, patch_size=2, in_channels=16, out_channels=16,
        num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.joint_attention_dim,
        caption_projection_dim=spec.num_attention_heads * spec.attention_head_dim,
        pooled_projection_dim=2 * spec.clip_hidden_size, pos_embed_max_size=spec.pos_embed_max_size,
        dual_attention_layers=spec.dual_attention_layers, qk_norm=spec.qk_norm,
    ).eval()
    encoders: dict[str, object] = dict.fromkeys(
        ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3"))
    if with_text_encoder:
        encoders["tokenizer"], encoders["text_encoder"] = _tiny_clip_with_projection(spec.clip_hidden_size,
                                                                                    clip_max_length)
        encoders["tokenizer_2"], encoders["text_encoder_2"] = _tiny_clip_with_projection(spec.clip_hidden_size,
                                                                                        clip_max_length)
        encoders["tokenizer_3"], encoders["text_encoder_3"] = _tiny_t5(spec.joint_attention_dim, 1)
    # SD3's VAE: 16 latent channels, shift and scale of the released checkpoints, no quant convs.
    vae = _tiny_vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                    use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **encoders)


def build_qwen_image_pipeline(preset: str | QwenImagePreset = "tiny", seed: int = 0):
    """A float32 CPU Qwen-Image pipeline with random weights seeded by ``seed``, without text encoder.

    Qwen2.5-VL is not built: pass ``prompt_embeds`` (and ``prompt_embeds_mask``, negatives for true
    CFG), e.g. from ``random_prompt_embeds(preset.joint_attention_dim)``.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    spec = QWEN_IMAGE_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * spec.latent_channels, out_channels=spec.latent_channels,
        num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.joint_attention_dim,
        axes_dims_rope=spec.axes_dims_rope,
    ).eval()
    # Three temporal-downsample flags give the real 8x spatial scale; identity latent statistics.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=spec.latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=[0.0] * spec.latent_channels,
                                 latents_std=[1.0] * spec.latent_channels).eval()
    # Qwen-Image's released scheduler: dynamic (exponential) shifting with mu from the image size.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)


# --- Wan 2.1 text-to-video -------------------------------------------------------------------------


@dataclass(frozen=True)
class WanPreset:
    """Transformer shape of a Wan 2.1 text-to-video model; the real ones match the released checkpoints."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int  # split by Wan's 3D RoPE into (t, h, w) = (d - 4(d // 6), 2(d // 6), 2(d // 6))
    ffn_dim: int
    text_dim: int  # UMT5 width (4096 for umt5-xxl)
    latent_channels: int = 16  # VAE z_dim = transformer in/out channels
    # Default clip of the model card: what the real-size presets are sized for.
    height: int = 480
    width: int = 832
    num_frames: int = 81
    # The tiny text encoder (real presets skip text encoding and use prompt_embeds).
    text_encoder_layers: int = 1


WAN_PRESETS: dict[str, WanPreset] = {
    # 17 frames -> 5 latent frames (odd), 48x64 px -> 3x4 tokens per latent frame.
    "tiny": WanPreset(num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=48, text_dim=32,
                      latent_channels=4, height=48, width=64, num_frames=17),
    "small": WanPreset(num_layers=4, num_attention_heads=4, attention_head_dim=48, ffn_dim=384, text_dim=64,
                       latent_channels=16, height=128, width=192, num_frames=21),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers transformer configs (patch (1, 2, 2), RoPE 1024).
    "wan2.1-t2v-1.3b": WanPreset(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                 text_dim=4096, height=480, width=832, num_frames=81),
    "wan2.1-t2v-14b": WanPreset(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                text_dim=4096, height=480, width=832, num_frames=81),
    "wan2.1-t2v-14b-720p": WanPreset(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                     text_dim=4096, height=720, width=1280, num_frames=81),
}


def wan_transformer_config(preset: str | WanPreset) -> dict:
    """`WanTransformer3DModel` keyword arguments of a preset (config only: nothing is allocated)."""
    spec = WAN_PRESETS[preset] if isinstance(preset, str) else preset
    return {"patch_size": (1, 2, 2), "num_attention_heads": spec.num_attention_heads,
            "attention_head_dim": spec.attention_head_dim, "in_channels": spec.latent_channels,
            "out_channels": spec.latent_channels, "text_dim": spec.text_dim, "freq_dim": 256 if spec.text_dim >= 256
            else 16, "ffn_dim": spec.ffn_dim, "num_layers": spec.num_layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}


def _tiny_umt5(d_model: int, num_layers: int):
    """UMT5 encoder (Wan's text encoder family) on `_tiny_t5`'s in-memory unigram vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer, _ = _tiny_t5(d_model, 1)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=num_layers,
                        num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    return tokenizer, UMT5EncoderModel(config).eval()


def wan_scheduler(flow_shift: float = 3.0):
    """Wan 2.1's released scheduler: UniPC (bh2, order 2) on flow-matching sigmas, flow prediction."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                   num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                   lower_order_final=True, final_sigmas_type="zero")


def build_wan_pipeline(preset: str | WanPreset = "tiny", seed: int = 0, with_text_encoder: bool = True,
                       scheduler: str = "unipc"):
    """A float32 CPU Wan 2.1 text-to-video pipeline with random weights seeded by ``seed``.

    ``scheduler``: ``"unipc"`` (Wan's own, `wan_scheduler`) or ``"flow_euler"``
    (FlowMatchEulerDiscreteScheduler with the same shift). With ``with_text_encoder=False`` the
    tokenizer and UMT5 are left out (pass ``prompt_embeds`` and ``negative_prompt_embeds``).
    """
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    spec = WAN_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**wan_transformer_config(spec)).eval()
    # Four stages with two temporal downsamples: Wan's 8x spatial / 4x temporal scale, very few channels.
    vae = AutoencoderKLWan(base_dim=8, z_dim=spec.latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * spec.latent_channels,
                           latents_std=[1.0] * spec.latent_channels).eval()
    tokenizer, text_encoder = (_tiny_umt5(spec.text_dim, spec.text_encoder_layers) if with_text_encoder
                               else (None, None))
    if scheduler == "unipc":
        sched = wan_scheduler()
    elif scheduler == "flow_euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"scheduler must be 'unipc' or 'flow_euler', got {scheduler!r}")
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=sched)


__all__ += ["WAN_PRESETS", "WanPreset", "build_wan_pipeline", "wan_scheduler", "wan_transformer_config"]
