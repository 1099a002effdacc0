"""An xDiT example script, written the way xDiT's `examples/pixartalpha_example.py` is.

It never mentions STADI. Run through the plugin it picks STADI up from `--use_stadi`:

    torchrun --nproc_per_node 2 -m stadi_xdit.run tests/xdit_style_example.py --model DIR --use_stadi ...

CPU differences from xDiT's example: float32, a CPU generator, no CUDA memory statistics, and
`XDIT_EXAMPLE_OUT` (a folder) receives what each rank ran, for the tests.
"""

import os
import time

import torch
from xfuser import xFuserArgs, xFuserPixArtAlphaPipeline
from xfuser.config import FlexibleArgumentParser
from xfuser.core.distributed import get_runtime_state, get_world_group


def main():
    parser = FlexibleArgumentParser(description="xFuser Arguments")
    args = xFuserArgs.add_cli_args(parser).parse_args()
    engine_args = xFuserArgs.from_cli_args(args)
    engine_config, input_config = engine_args.create_config()

    pipe = xFuserPixArtAlphaPipeline.from_pretrained(
        pretrained_model_name_or_path=engine_config.model_config.model,
        engine_config=engine_config,
        torch_dtype=torch.float32,
    )

    start_time = time.time()
    output = pipe(
        height=input_config.height,
        width=input_config.width,
        prompt=input_config.prompt,
        num_inference_steps=input_config.num_inference_steps,
        output_type=input_config.output_type,
        use_resolution_binning=input_config.use_resolution_binning,
        guidance_scale=input_config.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(input_config.seed),
    )
    elapsed_time = time.time() - start_time

    rank = get_world_group().rank
    out_dir = os.environ.get("XDIT_EXAMPLE_OUT")
    if out_dir:
        last = getattr(pipe, "last_result", None)
        torch.save({
            "pipeline": type(pipe).__name__,
            "engine_config": type(engine_config).__name__,
            "args": type(engine_args).__name__,
            "dp_degree": engine_config.parallel_config.dp_degree,
            "latents": output.images if output is not None else None,
            "num_evals": last.num_evals if last is not None else None,
            "plan": last.plan.to_json() if last is not None else None,
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == get_world_group().world_size - 1:
        print(f"epoch time: {elapsed_time:.2f} sec")
    get_runtime_state().destroy_distributed_env()


if __name__ == "__main__":
    main()
