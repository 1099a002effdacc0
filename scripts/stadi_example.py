"""STADI on PixArt-α/Σ, Flux.1, SD3.5 or Qwen-Image, written the way xDiT's own example scripts are.

    torchrun --nproc_per_node 2 scripts/stadi_example.py --pipeline pixart-alpha --model tiny \
        --use_stadi --height 256 --width 256 --num_inference_steps 8 --warmup_steps 2 \
        --stadi_emulate_slowdown 1,2

The script builds xDiT's own pipeline wrapper (`xFuserPixArtAlphaPipeline`, ...); with
`--use_stadi` xDiT's constructor returns its STADI twin (the CLI hook, `import stadi_xdit.xdit`),
without it xDiT runs as usual, so exactness can be checked from outside with two commands and
`--save_latents PATH` (the output rank saves the final latent with `torch.save`).

`--pipeline` is any family's example choice (`ExampleChoice`, declared in `stadi_xdit/families/`).
`--model` is a local diffusers folder, or one of that family's offline presets (random weights:
`tiny`, `small`; PixArt also `pixart-alpha-1024`/`pixart-sigma-1024`, Flux `flux-dev-1024`), since no
model hub is reachable from our machines. Presets other than `tiny` (and every Qwen-Image preset: no
tiny Qwen2.5-VL) get stand-in text embeddings.

`--pipeline pixart-alpha --model toy-trained` is the small PixArt-α trained here on a procedural data
set (`stadi_xdit.toy`, 256 px only): `--prompt` names one of its classes (e.g. "disc on dusk"; default
by `--seed`), and the output is the data set's 4-channel latent image, saved as a PNG through its
fixed decode (`results/<pipeline class>_<STADI strategy>_n<ranks>.png`).
"""

from __future__ import annotations

# isort: off
import os

# Before any import of transformers: its import-time notices (e.g. "requires torchvision") would
# surround a one-line input error.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import stadi_xdit.xdit  # noqa: F401  (first: the CPU compat layer must be in place before xfuser loads)
# isort: on
import json
import time

import torch
import torch.distributed as dist
from xfuser.config import FlexibleArgumentParser
from xfuser.core.distributed import get_world_group

from stadi_xdit.cli_errors import OneLineErrors, fail
from stadi_xdit.families import ExampleChoice, example_choices, families
from stadi_xdit.paths import model_folder_problem, output_file_problem, save_with_fallback
from stadi_xdit.planner.validation import MAX_ROWS, MAX_STEPS
from stadi_xdit.runtime import heartbeat
from stadi_xdit.runtime.faults import PeerFailure, report_and_exit
from stadi_xdit.toy import data as toy_data
from stadi_xdit.toy import model as toy_model
from stadi_xdit.xdit.args import (
    StadiArgs,
    launch_world_size,
    refuse_step_cache_outside_runner,
    validate_call_inputs,
)
from stadi_xdit.xdit.distributed import init_distributed

TOY_PRESET = "toy-trained"  # the trained toy DiT (PixArt-α architecture, stadi_xdit.toy)
# --pipeline value -> the family's example choice (its declaration in stadi_xdit/families/)
EXAMPLES: dict[str, ExampleChoice] = example_choices()


def _toy_class(prompt: str | None, seed: int) -> int:
    """The toy data set's class named by --prompt, or one chosen by --seed."""
    if prompt is None:
        return seed % toy_data.NUM_CLASSES
    return toy_data.CLASS_NAMES.index(prompt)


def _presets(example: ExampleChoice) -> tuple[str, ...]:
    """The --model names the choice builds offline: its family's presets, then its extra ones."""
    family = next(spec for spec in families() if example in spec.examples)
    return (*family.presets, *example.extra_presets)


def load_pipeline(example: ExampleChoice, model: str):
    """The diffusers pipeline, and whether it needs stand-in text embeddings."""
    if model == TOY_PRESET and TOY_PRESET in example.extra_presets:
        return toy_model.load_toy_pipeline(), False
    if model in _presets(example):
        with_text = model in example.text_presets
        return example.build(model, with_text), not with_text
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32), False


class ExampleParser(OneLineErrors, FlexibleArgumentParser):
    """xDiT's parser; a bad flag is one line, printed by rank 0 only."""


def _on(value, device: torch.device, dtype: torch.dtype):
    """Stand-in embeddings in the model's device and dtype; integer masks keep their dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def parse_args() -> tuple[StadiArgs, str, str | None]:
    """Every flag checked before any process group exists; errors are one line naming the flag."""
    parser = ExampleParser(prog="stadi_example.py", description="xDiT pipelines with STADI (xDiT plugin)")
    StadiArgs.add_cli_args(parser)
    parser.add_argument("--pipeline", choices=sorted(EXAMPLES), default="pixart-alpha")
    parser.add_argument("--save_latents", default=None, metavar="PATH",
                        help="the output rank saves the final latent here (torch.save)")
    args = parser.parse_args()
    example = EXAMPLES[args.pipeline]
    try:
        engine_args = StadiArgs.from_cli_args(args)
        if engine_args.use_stadi:
            engine_args.validate(launch_world_size())
            refuse_step_cache_outside_runner(engine_args)
    except ValueError as error:
        parser.error(str(error))
    if engine_args.use_cfg_parallel and not example.has_cfg:
        parser.error(f"--use_cfg_parallel does not apply to --pipeline {args.pipeline} (no CFG branches)")
    presets = _presets(example)
    if engine_args.model not in presets and not os.path.isdir(engine_args.model):
        parser.error(f"--model must be a local diffusers folder or one of {', '.join(presets)}, "
                     f"got {engine_args.model!r}")
    if engine_args.model not in presets:
        problem = _folder_problem(engine_args.model, example.diffusers_class)
        if problem:
            parser.error(f"--model {engine_args.model!r} {problem} (--pipeline {args.pipeline})")
    problem = _call_problem(engine_args)
    if problem:
        parser.error(problem)
    if engine_args.model == TOY_PRESET:
        if (engine_args.height, engine_args.width) != (toy_model.HEIGHT, toy_model.HEIGHT):
            parser.error(f"--model {TOY_PRESET} is trained at {toy_model.HEIGHT}x{toy_model.HEIGHT} px: use "
                         f"--height {toy_model.HEIGHT} --width {toy_model.HEIGHT}, got {engine_args.height}x"
                         f"{engine_args.width}")
        prompt = engine_args.prompt[0] if isinstance(engine_args.prompt, list) else engine_args.prompt
        if prompt not in (None, "", *toy_data.CLASS_NAMES):
            parser.error(f"--prompt with --model {TOY_PRESET} names a class of its data set: "
                         f"{', '.join(toy_data.CLASS_NAMES)}; got {prompt!r}")
    if args.save_latents is not None:
        problem = output_file_problem(args.save_latents) if args.save_latents else "is empty"
        if problem:
            parser.error(f"--save_latents: {problem}")
    return engine_args, args.pipeline, args.save_latents


def _folder_problem(folder: str, diffusers_class: str) -> str | None:
    """Why a local folder is not a diffusers pipeline of the expected class (None when it is)."""
    try:
        with open(os.path.join(folder, "model_index.json")) as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return "is not a diffusers pipeline folder (no readable model_index.json)"
    name = index.get("_class_name") if isinstance(index, dict) else None
    if diffusers_class and name != diffusers_class:
        return f"holds a {name!r}, not a {diffusers_class}"
    # A listed component without its folder or weights, a truncated safetensors file: one line here,
    # before any process group, as the runner's launcher says it (it was a traceback per rank).
    return model_folder_problem(folder)


def _call_problem(args: StadiArgs) -> str | None:
    """The call's own inputs (xDiT's parser takes any value): one line naming the flag, or None. Without
    --use_stadi no STADI check has run: the runner's call checks, and this script's own limits."""
    try:
        validate_call_inputs(args)
    except ValueError as error:
        return str(error)
    if not 1 <= args.num_inference_steps <= MAX_STEPS:
        return f"--num_inference_steps must be in [1, {MAX_STEPS}], got {args.num_inference_steps}"
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if not 0 < value <= MAX_ROWS * 16:
            return f"{flag} must be in [16, {MAX_ROWS * 16}] px, got {value}"
    if args.output_type not in ("pil", "latent", "np", "pt"):
        return f"--output_type must be one of pil, latent, np, pt, got {args.output_type!r}"
    return None


def main() -> None:
    engine_args, kind, save_latents = parse_args()
    try:
        run(engine_args, EXAMPLES[kind], save_latents)
    except PeerFailure as error:
        report_and_exit(error)
    except ValueError as error:  # inputs only the loaded model can check (e.g. its size limits)
        fail("stadi_example.py", str(error))


def run(engine_args: StadiArgs, example: ExampleChoice, save_latents: str | None) -> None:
    heartbeat.phase("process-group")  # each phase under --stadi_timeout when the launcher watches
    device = init_distributed(engine_args.stadi_timeout)
    engine_config, input_config = engine_args.create_config()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine_config.runtime_config.dtype = dtype

    heartbeat.phase("load")
    pipeline, needs_embeds = load_pipeline(example, engine_args.model)
    pipeline = pipeline.to(device=device, dtype=dtype)
    # xDiT's wrapper; with --use_stadi its constructor returns the STADI twin.
    pipe = example.wrapper_class()(pipeline, engine_config)
    heartbeat.phase("setup")
    toy = engine_args.model == TOY_PRESET
    if toy:
        prompt = input_config.prompt[0] if isinstance(input_config.prompt, list) else input_config.prompt
        call = toy_model.toy_call_kwargs([_toy_class(prompt or None, input_config.seed)], input_config.seed)
        inputs = {name: _on(call[name], device, dtype) for name in
                  ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                   "negative_prompt_attention_mask", "guidance_scale")}
        inputs["negative_prompt"] = None
    elif needs_embeds:
        inputs = {name: _on(value, device, dtype)
                  for name, value in example.stand_in_text(pipeline, input_config.seed).items()}
    else:
        inputs = {"prompt": input_config.prompt or "a lighthouse at dusk"}
    inputs.update(example.call_kwargs)
    if example.tiny_text_tokens is not None:
        tokens = example.tiny_text_tokens if engine_args.model == "tiny" else input_config.max_sequence_length
        inputs["max_sequence_length"] = tokens
    # The toy model's images are its latents (its VAE is a random stand-in): decoded here instead.
    output_type = "latent" if save_latents or toy else input_config.output_type

    call = {"height": input_config.height, "width": input_config.width, **inputs}
    if engine_args.use_stadi and engine_args.use_torch_compile:
        # As xDiT's runner: one untimed call compiles every code path first (and is not measured as speed).
        with pipe.compile_warmup():
            pipe(**call, num_inference_steps=pipe.compile_warmup_steps(input_config.num_inference_steps),
                 output_type="latent", generator=torch.Generator(device="cpu").manual_seed(input_config.seed))
    dist.barrier()
    start = time.perf_counter()
    output = pipe(**call, num_inference_steps=input_config.num_inference_steps, output_type=output_type,
                  generator=torch.Generator(device="cpu").manual_seed(input_config.seed))
    elapsed = time.perf_counter() - start

    if get_world_group().rank == 0:
        print(f"{type(pipe).__name__}: end-to-end latency {elapsed:.2f} s")
    if pipe.is_dp_last_group() and output is not None:
        heartbeat.phase("save")
        # Atomic writes; a result that cannot be saved where asked goes to the launch or temp folder.
        saved = True
        if save_latents:
            latents = output.images.cpu()
            saved = save_with_fallback(save_latents, lambda temp: torch.save(latents, temp), "latents")
            if saved:
                print("saved latents to", saved)
        elif toy or output_type == "pil":
            from PIL import Image

            if toy:
                rgb = toy_data.decode_to_rgb(output.images.float().cpu())[0]
                image = Image.fromarray((rgb.permute(1, 2, 0) * 255).round().byte().numpy())
            else:
                image = output.images[0]
            saved = save_with_fallback(_result_path(pipe, engine_args),
                                       lambda temp: image.save(temp, format="PNG"), "image")
            if saved:
                print("saved", saved)
        if not saved:
            raise SystemExit(1)
    heartbeat.phase("cleanup")
    dist.destroy_process_group()


def _result_path(pipe, engine_args: StadiArgs) -> str:
    """results/<pipeline class>[_<STADI strategy>]_n<ranks>.png: runs of different strategies or rank counts
    never share a name; a run that replaces an earlier one says so."""
    strategy = (f"_{engine_args.stadi.output_label(engine_args.use_torch_compile, engine_args.topology)}"
                if engine_args.use_stadi else "")
    path = f"results/{type(pipe).__name__}{strategy}_n{get_world_group().world_size}.png"
    if os.path.exists(path):  # the atomic save creates results/ itself
        print("replacing", path)
    return path


if __name__ == "__main__":
    main()
