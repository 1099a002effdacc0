"""Wan 2.1 text-to-video: the family's declaration (runtime: `stadi_xdit.models.wan`).

Model presets: `tiny` (17 frames at 48x64 px: 5 latent frames of 3x4 tokens) and `small` for tests
and CPU runs, and the released 1.3B and 14B transformers' shapes at their model cards' clips. The
runner model "Wan2.1-T2V" loads Wan-AI/Wan2.1-T2V-14B-Diffusers: its tiny hub-cache recipe has the
UMT5 text encoder, the video VAE and Wan's UniPC scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from stadi_xdit.families import BenchModel, BenchShape, ConformanceCase, FamilySpec, HubModel
from stadi_xdit.families.bench_preset import VideoBenchPreset
from stadi_xdit.geometry import TOKEN_ROW_PX


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
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    from stadi_xdit.families.components import tiny_umt5

    spec = WAN_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**wan_transformer_config(spec)).eval()
    # Four stages with two temporal downsamples: Wan's 8x spatial / 4x temporal scale, very few channels.
    vae = AutoencoderKLWan(base_dim=8, z_dim=spec.latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * spec.latent_channels,
                           latents_std=[1.0] * spec.latent_channels).eval()
    tokenizer, text_encoder = (tiny_umt5(spec.text_dim, spec.text_encoder_layers) if with_text_encoder
                               else (None, None))
    if scheduler == "unipc":
        sched = wan_scheduler()
    elif scheduler == "flow_euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"scheduler must be 'unipc' or 'flow_euler', got {scheduler!r}")
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=sched)


class WanBench(VideoBenchPreset):
    """Wan 2.1 text-to-video under `stadi-bench`: clips of ``num_frames`` (4k+1) frames.

    Tokens are latent frames x (H/16) x (W/16) (patch (1, 2, 2)); every block runs self-attention over
    all tokens of the clip, cross-attention to the text and an FFN of ``ffn_dim``. Guidance runs both
    branches every step (diffusers: two forwards; STADI: one batch of two).
    """

    @property
    def text_channels(self) -> int:
        return self.spec.text_dim

    @property
    def cfg_batch(self) -> int:
        return 2

    def transformer_config(self) -> dict:
        return wan_transformer_config(self.spec)

    def forward_flops(self, height: int, width: int | None = None, batch: int | None = None) -> float:
        """FLOPs (2 per multiply-add) of one denoising step's transformer work (both CFG branches).

        Per token and block: self-attention q,k,v,o ``2 * 4 h^2`` and ``2 * 2 N h`` over all N tokens of
        the clip, cross-attention q,o ``2 * 2 h^2`` and ``2 * 2 S h`` against S text tokens, FFN
        ``2 * 2 h F``. Per block: the text K/V projections ``2 * 2 S h^2``; per forward: the text
        embedding ``2 * S (T h + h^2)`` (T = text width). Patch embedding, norms, modulation and the
        output projection are left out (< 1 % at real sizes).
        """
        width = width or self.width(height)
        batch = batch if batch is not None else self.cfg_batch
        tokens = self.latent_frames * (height // TOKEN_ROW_PX) * (width // TOKEN_ROW_PX)
        h, text, ffn = self.hidden, self.text_tokens, self.spec.ffn_dim
        per_token = 2 * (6 * h * h + 2 * tokens * h + 2 * text * h + 2 * h * ffn)
        per_layer = 2 * 2 * text * h * h
        text_embedding = 2 * text * (self.text_channels * h + h * h)
        return float(batch * (self.layers * (tokens * per_token + per_layer) + text_embedding))

    def build_pipeline(self, seed: int = 0):
        return build_wan_pipeline(self.spec, seed=seed, with_text_encoder=False)

    def call_kwargs(self, height: int, steps: int, seed: int, device: str = "cpu", dtype=None) -> dict:
        """WanPipeline's arguments: both prompts as embeddings of one length (Wan pads its prompts alike)."""
        import torch

        from stadi_xdit.families.components import random_prompt_embeds

        dtype = dtype or torch.float32
        embeds, negative = (random_prompt_embeds(self.text_channels, seq_len=self.text_tokens, seed=seed + i)
                            .to(device=device, dtype=dtype) for i in (0, 1))
        return {"height": height, "width": self.width(height), "num_frames": self.clip_frames,
                "num_inference_steps": steps, "output_type": "latent",
                "generator": torch.Generator("cpu").manual_seed(seed), "prompt_embeds": embeds,
                "negative_prompt_embeds": negative, "guidance_scale": 5.0}

    def transformer(self):
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(**wan_transformer_config(self.spec))

    def decode(self, vae, latent):
        """Latent clip -> video (batch, 3, frames, H, W) in [0, 1], de-normalised as WanPipeline does."""
        import torch

        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latent.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latent.dtype)
        with torch.no_grad():
            video = vae.decode((latent * std + mean).to(vae.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)


def wan_conformance_inputs() -> dict:
    """17 frames at 48x64 px: 5 latent frames (odd) of 3x4 tokens, 15 token rows of the clip, so bands start
    and end inside frames; Wan's 3D RoPE gives every token its absolute (frame, row, column). CFG with a
    negative prompt, Wan's own UniPC scheduler."""
    return {"prompt": "a cat walks", "negative_prompt": "blurry", "guidance_scale": 5.0, "height": 48, "width": 64,
            "num_frames": 17, "num_inference_steps": 8, "max_sequence_length": 16}


SPEC = FamilySpec(
    name="wan",
    presets=WAN_PRESETS,
    hub_models=(HubModel("Wan2.1-T2V", "Wan-AI/Wan2.1-T2V-14B-Diffusers", build_wan_pipeline,
                         # 5 latent frames x 3 token rows: 15 rows of the clip
                         tiny_call=("--height", "48", "--width", "64", "--num_frames", "17")),),
    bench=BenchModel(
        preset="stadi_xdit.families.wan:WanBench",
        # 17 frames = 5 latent frames; the real sizes at their model cards' clips.
        shapes={"wan-tiny": BenchShape("t2v", 48, 8, model="tiny", width=64, num_frames=17, decode=True),
                "wan-small": BenchShape("t2v", 192, 16, model="small", width=256, num_frames=41, decode=True),
                "wan2.1-t2v-1.3b": BenchShape("t2v", 480, 512, width=832, num_frames=81),
                "wan2.1-t2v-14b": BenchShape("t2v", 480, 512, width=832, num_frames=81),
                "wan2.1-t2v-14b-720p": BenchShape("t2v", 720, 512, width=1280, num_frames=81)},
        # xfuser 0.7.0 has no Wan text-to-video wrapper: the plugin's (models.wan), whose twin is
        # StadiWanPipeline; xDiT's arms run the runner's sequence-parallel transformer instead.
        xdit_wrappers={"t2v": "xFuserWanPipeline"},
        xdit_runner_transformers={
            "t2v": "xfuser.model_executor.models.transformers.transformer_wan.xFuserWanTransformer3DWrapper"}),
    conformance=(ConformanceCase("stadi_xdit.models.wan:StadiWanPipeline", build_wan_pipeline, wan_conformance_inputs,
                                 rows=15, output="frames"),),
)
