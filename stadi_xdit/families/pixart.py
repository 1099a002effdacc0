"""PixArt-α and PixArt-Σ: the family's declaration (runtime: `stadi_xdit.models.pixart`).

Model presets: `tiny` for tests, `small` for the CPU benchmark, and the released transformers'
shapes (`pixart-alpha-1024`, `pixart-sigma-1024`). xfuser 0.7.0's runner has no PixArt model, so
the family serves xDiT's pipeline wrappers only (no hub-cache recipe).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from stadi_xdit.families import BenchModel, BenchShape, ConformanceCase, ExampleChoice, FamilySpec
from stadi_xdit.families.bench_preset import BenchPreset
from stadi_xdit.geometry import TOKEN_ROW_PX


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


def pixart_transformer(preset: str | PixArtPreset = "tiny"):
    """The preset's `PixArtTransformer2DModel` with random weights (none allocated on the meta device)."""
    from diffusers import PixArtTransformer2DModel

    spec = PIXART_PRESETS[preset] if isinstance(preset, str) else preset
    return PixArtTransformer2DModel(
        num_attention_heads=spec.num_attention_heads, attention_head_dim=spec.attention_head_dim,
        in_channels=4, out_channels=8, num_layers=spec.num_layers,
        cross_attention_dim=spec.num_attention_heads * spec.attention_head_dim,
        caption_channels=spec.caption_channels, sample_size=spec.sample_size, patch_size=2,
        norm_num_groups=32, interpolation_scale=spec.interpolation_scale,
        use_additional_conditions=spec.use_additional_conditions)


def build_pixart_pipeline(preset: str | PixArtPreset = "tiny", variant: str = "alpha", seed: int = 0,
                          with_text_encoder: bool = True):
    """A float32 CPU PixArt-α/Σ pipeline with random weights seeded by ``seed``.

    With ``with_text_encoder=False`` the tokenizer and T5 are left out (pass ``prompt_embeds``).
    """
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    from stadi_xdit.families.components import tiny_t5, tiny_vae

    if variant not in ("alpha", "sigma"):
        raise ValueError(f"variant must be 'alpha' or 'sigma', got {variant!r}")
    spec = PIXART_PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    transformer = pixart_transformer(spec).eval()
    tokenizer, text_encoder = (tiny_t5(spec.caption_channels, spec.text_encoder_layers)
                               if with_text_encoder else (None, None))
    scheduler = DPMSolverMultistepScheduler()
    pipeline_cls = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    return pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(4),
                        transformer=transformer, scheduler=scheduler)


def tiny_pixart_pipeline(variant: str = "alpha", seed: int = 0):
    return build_pixart_pipeline("tiny", variant=variant, seed=seed)


def pixart_stand_in_text(pipeline, seed: int) -> dict:
    """Stand-in prompt and empty negative embeddings of PixArt's caption width, with their masks."""
    import torch

    from stadi_xdit.families.components import random_prompt_embeds

    channels = pipeline.transformer.config.caption_channels
    # negative_prompt=None: diffusers refuses a negative prompt and negative embeddings together.
    return {"negative_prompt": None, "prompt_embeds": random_prompt_embeds(channels, seed=seed),
            "prompt_attention_mask": torch.ones(1, 8), "negative_prompt_embeds": torch.zeros(1, 8, channels),
            "negative_prompt_attention_mask": torch.ones(1, 8)}


def _example(variant: str, diffusers_class: str, extra_presets: tuple[str, ...] = ()) -> ExampleChoice:
    return ExampleChoice(
        f"pixart-{variant}", f"xfuser:xFuserPixArt{variant.capitalize()}Pipeline", diffusers_class,
        lambda preset, text: build_pixart_pipeline(preset, variant, with_text_encoder=text),
        pixart_stand_in_text,
        call_kwargs=(("use_resolution_binning", False),), extra_presets=extra_presets)


class PixArtBench(BenchPreset):
    """PixArt under `stadi-bench`: caption cross-attention, CFG as a batch of two."""

    @property
    def text_channels(self) -> int:
        return self.spec.caption_channels

    @property
    def cfg_batch(self) -> int:
        return 2

    def forward_flops(self, height: int, width: int | None = None, batch: int | None = None) -> float:
        """FLOPs (2 per multiply-add) of one denoising step's transformer work.

        Per image token and layer: projections and MLP ``2 * 12 h^2`` (q,k,v,o = 4h^2, MLP 8h^2),
        cross-attention q,o ``2 * 2 h^2`` plus ``2 * 2 S h`` against S text tokens, self-attention
        ``2 * 2 N h`` over all N image tokens. Per layer, independent of the image: the text K/V
        projections ``2 * 2 S h^2``; per forward: the caption projection ``2 * S (C h + h^2)``.
        Norms, embeddings and the final layer are left out (a few %).
        """
        width = width or self.width(height)
        batch = batch if batch is not None else self.cfg_batch
        tokens, h, text = (height // TOKEN_ROW_PX) * (width // TOKEN_ROW_PX), self.hidden, self.text_tokens
        per_token = 2 * (12 * h * h + 2 * h * h + 2 * text * h + 2 * tokens * h)
        per_layer = 2 * 2 * text * h * h
        caption = 2 * text * (self.text_channels * h + h * h)
        return float(batch * (self.layers * (tokens * per_token + per_layer) + caption))

    def build_pipeline(self, seed: int = 0):
        return build_pixart_pipeline(self.spec, variant=self.variant, seed=seed, with_text_encoder=False)

    def call_kwargs(self, height: int, steps: int, seed: int, device: str = "cpu", dtype=None) -> dict:
        import torch

        from stadi_xdit.families.components import random_prompt_embeds

        dtype = dtype or torch.float32
        embeds, negative = (random_prompt_embeds(self.text_channels, seq_len=self.text_tokens, seed=seed + i)
                            .to(device=device, dtype=dtype) for i in (0, 1))
        mask = torch.ones(1, self.text_tokens, device=device, dtype=dtype)
        return {"height": height, "width": self.width(height), "num_inference_steps": steps, "output_type": "latent",
                "generator": torch.Generator("cpu").manual_seed(seed), "prompt_embeds": embeds,
                "prompt_attention_mask": mask, "negative_prompt": None, "negative_prompt_embeds": negative,
                "negative_prompt_attention_mask": mask, "guidance_scale": 4.5, "use_resolution_binning": False}

    def transformer(self):
        return pixart_transformer(self.spec)


def pixart_conformance_inputs() -> dict:
    """112x80 px: 7 token rows (odd) by 5 columns; xDiT's patch embedding slices the full image's sincos
    table by the band's global tokens. CFG (empty negative prompt) as a batch of two."""
    return {"prompt": "a red cat", "height": 112, "width": 80, "num_inference_steps": 6,
            "use_resolution_binning": False}


SPEC = FamilySpec(
    name="pixart",
    presets=PIXART_PRESETS,
    # The example script's trained toy DiT has PixArt-α's architecture (stadi_xdit.toy).
    examples=(_example("alpha", "PixArtAlphaPipeline", extra_presets=("toy-trained",)),
              _example("sigma", "PixArtSigmaPipeline")),
    bench=BenchModel(
        preset="stadi_xdit.families.pixart:PixArtBench",
        # `tiny` and `small` are the CPU presets (their arms' outputs are decoded); every PixArt preset
        # can calibrate `--simulate` with a measured forward on this machine.
        shapes={"tiny": BenchShape("alpha", 128, 8, decode=True, calibrates=True),
                "small": BenchShape("alpha", 512, 8, decode=True, calibrates=True),
                "pixart-alpha-1024": BenchShape("alpha", 1024, 120, calibrates=True),
                "pixart-sigma-1024": BenchShape("sigma", 1024, 300, calibrates=True)},
        xdit_wrappers={"alpha": "xFuserPixArtAlphaPipeline", "sigma": "xFuserPixArtSigmaPipeline"}),
    conformance=tuple(ConformanceCase(f"stadi_xdit.models.pixart:StadiPixArt{variant.capitalize()}Pipeline",
                                      functools.partial(tiny_pixart_pipeline, variant), pixart_conformance_inputs,
                                      rows=7) for variant in ("alpha", "sigma")),
)
