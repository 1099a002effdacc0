"""The toy DiT: a small PixArt-alpha transformer trained on `stadi_xdit.toy.data` (offline, CPU).

Architecture: diffusers' `PixArtTransformer2DModel` exactly as PixArt-alpha uses it (AdaLN-single,
self-attention over all image tokens, cross-attention to the caption, 2D sincos positions, patch
2), sized to train in about 30 minutes on 2 CPU cores. It is driven by the stock
`PixArtAlphaPipeline` with the stock `DPMSolverMultistepScheduler` (same config as
`stadi_xdit.families.pixart`), at 256x256 "pixels" = 32x32 latents = 16x16 tokens.

* ``out_channels = 4``: epsilon only, no learned-sigma half (the pipeline and `PixArtBandModel`
  both keep the whole output when ``out_channels // 2 != in_channels``).
* No text encoder: pass the class's caption embedding (`toy_call_kwargs`).
* The VAE is a tiny **random** `AutoencoderKL` (the same kind `stadi_xdit.families.components` builds), kept
  only so the pipeline is complete and has the usual 8x VAE scale. The model is trained on the
  latents directly (no autoencoder: see `stadi_xdit.toy.data`), so call it with
  ``output_type="latent"`` and show results with `stadi_xdit.toy.data.decode_to_rgb`; a decoded
  (`output_type="pil"`) image is meaningless.

Weights ship as float32 safetensors at `WEIGHTS_PATH`, with a json of the training run next to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stadi_xdit.toy import data

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "HEIGHT",
    "INFO_PATH",
    "TOY_CONFIG",
    "WEIGHTS_PATH",
    "build_toy_pipeline",
    "build_toy_scheduler",
    "build_toy_transformer",
    "init_pixart_weights_",
    "load_toy_pipeline",
    "load_toy_transformer",
    "reference_latents",
    "toy_call_kwargs",
    "training_info",
    "write_reference",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_PATH = WEIGHTS_DIR / "toy_dit.safetensors"
INFO_PATH = WEIGHTS_PATH.with_suffix(".json")
# A one-process output of the shipped weights, to check that a checkout loads exactly those weights.
REFERENCE_PATH = WEIGHTS_DIR / "toy_reference.safetensors"
REFERENCE_CALL = {"class_ids": (0, 7), "seed": 0, "steps": 4}

HEIGHT = data.SIZE * 8  # pipeline height/width in px: 256 -> 32 latent rows -> 16 token rows
DEFAULT_STEPS = 20  # DPM-Solver++ steps for sampling
DEFAULT_GUIDANCE = 2.0  # coherence metrics over guidance 1.5/2/3/4 (docs/benchmarks.md): 2 balances them

# `PixArtTransformer2DModel` keyword arguments.
TOY_CONFIG: dict = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,  # hidden 128
    "in_channels": data.CHANNELS,
    "out_channels": data.CHANNELS,  # epsilon only (no learned sigma)
    "num_layers": 8,
    "cross_attention_dim": 128,  # = hidden, as in PixArt
    "caption_channels": data.CAPTION_CHANNELS,
    "sample_size": data.SIZE,
    "patch_size": 2,
    "norm_num_groups": 32,
    "interpolation_scale": None,  # PixArt-alpha default: max(sample_size // 64, 1) = 1
    "use_additional_conditions": False,
}


def build_toy_transformer(seed: int = 0):
    """A freshly initialised toy transformer (float32, CPU, random weights seeded by ``seed``)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**TOY_CONFIG)


def init_pixart_weights_(transformer) -> None:
    """PixArt's own initialisation (``PixArt.initialize_weights``), in place, for training from scratch.

    Xavier-uniform linears with zero biases, N(0, 0.02) timestep and caption MLPs, and zeros for every
    cross-attention output projection and for the final projection (so the untrained model predicts
    zero noise). diffusers' constructor leaves PyTorch's default initialisation instead, which
    `build_toy_transformer` keeps: that is the "random weights" reference.
    """
    from torch import nn

    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = transformer.pos_embed.proj.weight
    nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
    embedder = transformer.adaln_single.emb.timestep_embedder
    for linear in (embedder.linear_1, embedder.linear_2, transformer.adaln_single.linear,
                   transformer.caption_projection.linear_1, transformer.caption_projection.linear_2):
        nn.init.normal_(linear.weight, std=0.02)
    for block in transformer.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(transformer.proj_out.weight)
    nn.init.zeros_(transformer.proj_out.bias)


def build_toy_scheduler():
    """The pipeline's scheduler: stock `DPMSolverMultistepScheduler` (DDPM linear betas 1e-4..0.02, 1000
    steps, epsilon prediction); training uses its ``betas``."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler()


def _tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four blocks: the usual 8x spatial scale with very few channels. Random and unused for latents.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=data.CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4).eval()


def build_toy_pipeline(transformer=None, seed: int = 0):
    """A `PixArtAlphaPipeline` around ``transformer`` (default: a random one), without text encoder."""
    from diffusers import PixArtAlphaPipeline

    transformer = build_toy_transformer(seed) if transformer is None else transformer
    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(seed),
                               transformer=transformer.eval(), scheduler=build_toy_scheduler())


def load_toy_transformer(weights: str | Path = WEIGHTS_PATH):
    """The toy transformer with the weights at ``weights`` (strict: every tensor must match)."""
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"no toy DiT weights at {weights}: run `python scripts/train_toy_dit.py`")
    transformer = build_toy_transformer()
    state = load_file(str(weights))
    transformer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return transformer.eval()


def load_toy_pipeline(weights: str | Path = WEIGHTS_PATH):
    """The trained toy pipeline (float32, CPU, offline): `PixArtAlphaPipeline` with the toy transformer."""
    return build_toy_pipeline(load_toy_transformer(weights))


def reference_latents(pipe=None) -> torch.Tensor:
    """The one-process output of `REFERENCE_CALL` (single-threaded, so the float sums run in one order)."""
    pipe = load_toy_pipeline() if pipe is None else pipe
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        call = dict(REFERENCE_CALL)
        return pipe(**toy_call_kwargs(call.pop("class_ids"), **call)).images
    finally:
        torch.set_num_threads(threads)


def write_reference(weights: str | Path = WEIGHTS_PATH, path: str | Path = REFERENCE_PATH) -> Path:
    """Store `reference_latents` of ``weights`` (done by the training script after it saves them)."""
    from safetensors.torch import save_file

    save_file({"latents": reference_latents(load_toy_pipeline(weights)).contiguous()}, str(path),
              metadata={"call": json.dumps(REFERENCE_CALL)})
    return Path(path)


def training_info(weights: str | Path = WEIGHTS_PATH) -> dict:
    """The json written next to the weights by `scripts/train_toy_dit.py` (config, steps, loss, time)."""
    return json.loads(Path(weights).with_suffix(".json").read_text())


def toy_call_kwargs(class_ids, seed: int, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of ``pipe(**kwargs)``: one image per class id, latents out.

    Caption embeddings from the data set's table, the null embedding as the negative prompt (CFG when
    ``guidance_scale > 1``), all-ones masks, ``output_type="latent"`` (shape ``[B, 4, 32, 32]``, the
    data set's space), no resolution binning, and a CPU generator seeded by ``seed`` for the initial
    noise (the same on every arm).
    """
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    batch = int(ids.shape[0])
    mask = data.caption_mask(batch).to(device=device, dtype=dtype)
    return {
        "prompt": None,
        "negative_prompt": None,
        "prompt_embeds": data.caption_embeds(ids).to(device=device, dtype=dtype),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": data.null_embeds(batch).to(device=device, dtype=dtype),
        "negative_prompt_attention_mask": mask.clone(),
        "guidance_scale": guidance_scale,
        "num_inference_steps": steps,
        "height": HEIGHT,
        "width": HEIGHT,
        "output_type": "latent",
        "use_resolution_binning": False,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
