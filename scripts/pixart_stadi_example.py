"""PixArt-α/Σ under STADI, written the way xDiT's own example scripts are.

    torchrun --nproc_per_node 2 scripts/pixart_stadi_example.py --model small --use_stadi \
        --height 256 --width 256 --num_inference_steps 12 --warmup_steps 2 --stadi_emulate_slowdown 1,2

`--model` is a local diffusers folder, or one of the offline presets of
`stadi_xdit.testing.tiny` (random weights: `tiny`, `small`, `pixart-alpha-1024`,
`pixart-sigma-1024`), since no model hub is reachable from our machines.
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

from stadi_xdit.testing.tiny import PIXART_PRESETS, build_pixart_pipeline, random_prompt_embeds
from stadi_xdit.xdit.args import StadiArgs
from stadi_xdit.xdit.distributed import init_distributed
from stadi_xdit.xdit.pipelines import StadiPixArtAlphaPipeline, StadiPixArtSigmaPipeline


def load_pipeline(model: str, variant: str):
    if model in PIXART_PRESETS:
        # Real-size presets have no text encoder: we feed stand-in prompt embeddings.
        return build_pixart_pipeline(model, variant=variant, with_text_encoder=model == "tiny"), model != "tiny"
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    cls = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    return cls.from_pretrained(model, torch_dtype=torch.float32), False


def main() -> None:
    parser = FlexibleArgumentParser(description="PixArt with STADI (xDiT plugin)")
    StadiArgs.add_cli_args(parser)
    parser.add_argument("--variant", choices=("alpha", "sigma"), default="alpha")
    args = parser.parse_args()
    try:  # one-line errors naming the flag, before any process group exists
        engine_args = StadiArgs.from_cli_args(args)
        if engine_args.use_stadi:
            engine_args.validate()
    except ValueError as error:
        parser.error(str(error))
    device = init_distributed(engine_args.stadi_timeout)
    engine_config, input_config = engine_args.create_config()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    engine_config.runtime_config.dtype = dtype

    pipeline, needs_embeds = load_pipeline(engine_args.model, args.variant)
    pipeline = pipeline.to(device=device, dtype=dtype)
    cls = StadiPixArtAlphaPipeline if args.variant == "alpha" else StadiPixArtSigmaPipeline
    pipe = cls(pipeline, engine_config)

    text = {"prompt": input_config.prompt or "a lighthouse at dusk"}
    if needs_embeds:
        channels = pipeline.transformer.config.caption_channels
        text = {"prompt_embeds": random_prompt_embeds(channels, seed=input_config.seed).to(device, dtype),
                "prompt_attention_mask": torch.ones(1, 8, device=device),
                "negative_prompt_embeds": torch.zeros(1, 8, channels, device=device, dtype=dtype),
                "negative_prompt_attention_mask": torch.ones(1, 8, device=device)}
    dist.barrier()
    start = time.perf_counter()
    output = pipe(height=input_config.height, width=input_config.width,
                  num_inference_steps=input_config.num_inference_steps, output_type=input_config.output_type,
                  generator=torch.Generator(device="cpu").manual_seed(input_config.seed),
                  use_resolution_binning=False, **text)
    elapsed = time.perf_counter() - start

    result = pipe.last_result
    if get_world_group().rank == 0:
        print(result.plan.explain())
        if result.measured_speeds:
            print("measured speeds (rows/s):", ", ".join(f"{s:.3g}" for s in result.measured_speeds))
        print(f"end-to-end latency: {elapsed:.2f} s")
    if pipe.is_dp_last_group() and output is not None and input_config.output_type == "pil":
        os.makedirs("results", exist_ok=True)
        path = f"results/stadi_pixart_{args.variant}_{result.plan.mode}.png"
        output.images[0].save(path)
        print("saved", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
