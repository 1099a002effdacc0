"""An xDiT example script, written the way xDiT's `examples/pixartalpha_example.py` is.

It never mentions STADI. Run through the plugin it picks STADI up from `--use_stadi`:

    torchrun --nproc_per_node 2 -m stadi_xdit.run tests/xdit_style_example.py --model DIR --use_stadi ...

CPU differences from xDiT's example: float32, a CPU generator, no CUDA memory statistics, and
`XDIT_EXAMPLE_OUT` (a folder) receives what each rank ran, for the tests, and the images xDiT's
example would save (same names, same save loop).
"""

import os
import time

import torch
from xfuser import xFuserArgs, xFuserPixArtAlphaPipeline
from xfuser.config import FlexibleArgumentParser
from xfuser.core.distributed import (
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_runtime_state,
    get_world_group,
)


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
    parallel_info = (  # xDiT's example names its images exactly so
        f"dp{engine_args.data_parallel_degree}_cfg{engine_config.parallel_config.cfg_degree}_"
        f"ulysses{engine_args.ulysses_degree}_ring{engine_args.ring_degree}_"
        f"pp{engine_args.pipefusion_parallel_degree}_patch{engine_args.num_pipeline_patch}_tc_{engine_args.use_torch_compile}"
    )
    if out_dir and input_config.output_type == "pil":  # xDiT's save loop, into XDIT_EXAMPLE_OUT
        dp_group_index = get_data_parallel_rank()
        num_dp_groups = get_data_parallel_world_size()
        dp_batch_size = (input_config.batch_size + num_dp_groups - 1) // num_dp_groups
        if pipe.is_dp_last_group():
            for i, image in enumerate(output.images):
                image_rank = dp_group_index * dp_batch_size + i
                image.save(os.path.join(out_dir, f"pixart_alpha_result_{parallel_info}_{image_rank}.png"))
    if rank == get_world_group().world_size - 1:
        print(f"epoch time: {elapsed_time:.2f} sec")
    get_runtime_state().destroy_distributed_env()


if __name__ == "__main__":
    main()
