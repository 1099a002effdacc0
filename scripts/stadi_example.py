"""PixArt-α, PixArt-Σ or Flux.1 under STADI, written the way xDiT's own example scripts are.

    torchrun --nproc_per_node 2 scripts/stadi_example.py --pipeline pixart-alpha --model tiny \
        --use_stadi --height 256 --width 256 --num_inference_steps 8 --warmup_steps 2 \
        --stadi_emulate_slowdown 1,2

`--model` is a local diffusers folder, or one of the offline presets of
`stadi_xdit.testing.tiny` (random weights; PixArt: `tiny`, `small`, `pixart-alpha-1024`,
`pixart-sigma-1024`; Flux: `tiny`, `small`, `flux-dev-1024`), since no model hub is reachable
from our machines. Presets other than `tiny` have no text encoder and get stand-in embeddings.
"""

from __future__ import annotations

# isort: off
import stadi_xdit  # noqa: F401  (first: the CPU compat layer must be in place before xfuser loads)
# isort: on
import os
import time

import torch
import torch.distributed as dist
from xfuser.config import FlexibleArgumentParser
from xfuser.core.distributed import get_world_group

from stadi_xdit.cli_errors import OneLineErrors, fail
from stadi_xdit.runtime.faults import PeerFailure, report_and_exit
from stadi_xdit.testing.tiny import (
    FLUX_PRESETS,
    PIXART_PRESETS,
    build_flux_pipeline,
    build_pixart_pipeline,
    random_prompt_embeds,
)
from stadi_xdit.xdit.args import StadiArgs
from stadi_xdit.xdit.distributed import init_distributed
from stadi_xdit.xdit.flux import StadiFluxPipeline
from stadi_xdit.xdit.pipelines import StadiPixArtAlphaPipeline, StadiPixArtSigmaPipeline

PIPELINES = {"pixart-alpha": StadiPixArtAlphaPipeline, "pixart-sigma": StadiPixArtSigmaPipeline,
             "flux": StadiFluxPipeline}


def load_pipeline(kind: str, model: str):
    """The diffusers pipeline, and whether it needs stand-in text embeddings."""
    presets = FLUX_PRESETS if kind == "flux" else PIXART_PRESETS
    if model in presets:
        with_text = model == "tiny"
        if kind == "flux":
            return build_flux_pipeline(model, with_text_encoder=with_text), not with_text
        return build_pixart_pipeline(model, variant=kind.split("-")[1], with_text_encoder=with_text), not with_text
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32), False


def text_inputs(kind: str, pipeline, prompt: str, seed: int, device: torch.device, dtype: torch.dtype,
                needs_embeds: bool) -> dict:
    if not needs_embeds:
        return {"prompt": prompt}
    if kind == "flux":
        config = pipeline.transformer.config
        return {"prompt_embeds": random_prompt_embeds(config.joint_attention_dim, seed=seed).to(device, dtype),
                "pooled_prompt_embeds": random_prompt_embeds(config.pooled_projection_dim, seq_len=1,
                                                             seed=seed)[:, 0].to(device, dtype)}
    channels = pipeline.transformer.config.caption_channels
    # negative_prompt=None: diffusers refuses a negative prompt and negative embeddings together.
    return {"negative_prompt": None, "prompt_embeds": random_prompt_embeds(channels, seed=seed).to(device, dtype),
            "prompt_attention_mask": torch.ones(1, 8, device=device),
            "negative_prompt_embeds": torch.zeros(1, 8, channels, device=device, dtype=dtype),
            "negative_prompt_attention_mask": torch.ones(1, 8, device=device)}


class ExampleParser(OneLineErrors, FlexibleArgumentParser):
    """xDiT's parser; a bad flag is one line, printed by rank 0 only."""


def parse_args() -> tuple[StadiArgs, str]:
    """Every flag checked before any process group exists; errors are one line naming the flag."""
    parser = ExampleParser(prog="stadi_example.py", description="PixArt / Flux with STADI (xDiT plugin)")
    StadiArgs.add_cli_args(parser)
    parser.add_argument("--pipeline", choices=sorted(PIPELINES), default="pixart-alpha")
    args = parser.parse_args()
    kind = args.pipeline
    try:
        engine_args = StadiArgs.from_cli_args(args)
        if engine_args.use_stadi:
            engine_args.validate()
    except ValueError as error:
        parser.error(str(error))
    if kind == "flux" and engine_args.use_cfg_parallel:
        parser.error("--use_cfg_parallel does not apply to --pipeline flux (Flux.1 has no CFG branches)")
    if engine_args.model not in (FLUX_PRESETS if kind == "flux" else PIXART_PRESETS) \
            and not os.path.isdir(engine_args.model):
        parser.error(f"--model must be a local diffusers folder or a preset, got {engine_args.model!r}")
    return engine_args, kind


def main() -> None:
    engine_args, kind = parse_args()
    try:
        run(engine_args, kind)
    except PeerFailure as error:
        report_and_exit(error)
    except ValueError as error:  # inputs only the loaded model can check (e.g. its size limits)
        fail("stadi_example.py", str(error))


def run(engine_args: StadiArgs, kind: str) -> None:
    device = init_distributed(engine_args.stadi_timeout)
    engine_config, input_config = engine_args.create_config()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine_config.runtime_config.dtype = dtype

    pipeline, needs_embeds = load_pipeline(kind, engine_args.model)
    pipeline = pipeline.to(device=device, dtype=dtype)
    pipe = PIPELINES[kind](pipeline, engine_config)
    inputs = text_inputs(kind, pipeline, input_config.prompt or "a lighthouse at dusk",
                         input_config.seed, device, dtype, needs_embeds)
    if kind == "flux":
        inputs["max_sequence_length"] = 16 if engine_args.model == "tiny" else input_config.max_sequence_length
    else:
        inputs["use_resolution_binning"] = False

    dist.barrier()
    start = time.perf_counter()
    output = pipe(height=input_config.height, width=input_config.width,
                  num_inference_steps=input_config.num_inference_steps, output_type=input_config.output_type,
                  generator=torch.Generator(device="cpu").manual_seed(input_config.seed), **inputs)
    elapsed = time.perf_counter() - start

    result = pipe.last_result
    if get_world_group().rank == 0:
        print(result.plan.explain())
        if result.measured_speeds:
            print("measured speeds (rows/s):", ", ".join(f"{s:.3g}" for s in result.measured_speeds))
        print(f"end-to-end latency: {elapsed:.2f} s")
    if pipe.is_dp_last_group() and output is not None and input_config.output_type == "pil":
        os.makedirs("results", exist_ok=True)
        path = f"results/stadi_{kind}_{result.plan.mode}.png"
        output.images[0].save(path)
        print("saved", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
