"""``stadi-bench``: STADI vs patch parallelism vs xDiT's Ulysses / Ring / PipeFusion on slowed ranks.

With no arguments it runs a short demo (``DEMO_ARGS``). Examples::

    stadi-bench                                          # demo: small preset, 256 px, slowdown:1,2
    stadi-bench --preset small --steps 20 --repeats 3 \\
        --scenario none --scenario slowdown:1,2 --scenario background:1=1
    stadi-bench --simulate --gpus A100x4,RTX3090x4 --preset pixart-alpha-1024
    stadi-bench --construct-only --preset flux-dev-1024
    stadi-bench --preset wan-small --steps 10 --scenario slowdown:1,2   # Wan 2.1 video, bands of clip rows
    stadi-bench --simulate --gpus A100x4,RTX4090x4 --preset wan2.1-t2v-14b-720p

See docs/benchmarks.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from stadi_xdit.bench.catalog import ARM_ORDER, DEFAULT_ARMS, PRESET_SHAPES
from stadi_xdit.bench.scenarios import parse_scenario
from stadi_xdit.cli_errors import OneLineArgumentParser, comma_subset, fail, stdout_guard
from stadi_xdit.config import parse_counts
from stadi_xdit.geometry import FRAMES_PER_LATENT, TOKEN_ROW_PX
from stadi_xdit.paths import output_dir_problem
from stadi_xdit.planner.cli import parse_checked, parse_numbers
from stadi_xdit.planner.gpus import parse_gpu_list
from stadi_xdit.planner.validation import MAX_RANKS, MAX_ROWS, MAX_STEPS, MAX_STRIDE_LIMIT, MIN_RELATIVE_SPEED

PROG = "stadi-bench"
DEMO_ARGS = ["--preset", "small", "--height", "256", "--steps", "10", "--warmup", "2", "--repeats", "2",
             "--scenario", "slowdown:1,2"]
DEFAULT_SCENARIO = "slowdown:1,2"
DTYPES = ("float32", "float16", "bfloat16", "float64")
MAX_RUN_TIMEOUT = 7 * 24 * 3600.0  # a week: beyond any call, and within every timer's range
MAX_SEED = 2**63 - 2  # torch seeds are 64-bit signed here, and the prompts use seed + 1
MAX_CALLS = 1000  # a calls scenario's timed calls per arm: far beyond any convergence study
# One CPU forward at the calibration size; its cost grows with the square of the token count.
CALIBRATE_HEIGHT_RANGE = (32, 2048)
# --simulate bounds that keep the planner's rows/s finite and > 0 (it rejects 0 and inf):
ROW_SECONDS_RANGE = (1e-9, 1e4)  # seconds per token row per step on the fastest rank
MFU_RANGE = (0.01, 1.0)
LINK_GBPS_RANGE = (1e-3, 1e6)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="End-to-end latency of STADI vs xDiT's strategies on heterogeneous (slowed) ranks.",
        epilog="With no arguments: stadi-bench " + " ".join(DEMO_ARGS))
    parser.add_argument("--preset", default="small", choices=list(PRESET_SHAPES),
                        help="model preset (default small)")
    parser.add_argument("--height", type=int, default=None,
                        help="image side in px; video: frame height, width keeps the preset's aspect (default: "
                             "the preset's)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="video presets (wan-*): frames of the clip, 4k+1 (default: the preset's)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="synchronous warm-up steps of STADI and PipeFusion (default 2)")
    parser.add_argument("--repeats", "-r", type=int, default=None, help="timed runs per arm (median; default 3)")
    parser.add_argument("--calls", type=int, default=None,
                        help="a calls scenario: N timed calls per arm (instead of --repeats), with the plan, "
                             "the measured cost model and the latency of every call (adaptive STADI's "
                             "convergence), and a per-call plot")
    parser.add_argument("--ranks", "-n", type=int, default=2, help="ranks N of the parallel arms (default 2)")
    parser.add_argument("--scenario", action="append", default=None,
                        help="none | slowdown:k0,k1,... | background:RANK=LOAD[,...]; load changing mid-call: "
                             "slowdown:k0,k1->k0',k1'@F | shift:RANK=A->B@F[,...]; repeatable "
                             "(default slowdown:1,2)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated subset of {','.join(ARM_ORDER)} (default: all but the "
                             "adaptive full-calls and full-sync and the +compile, +teacache and +fbcache arms)")
    parser.add_argument("--cores", default=None,
                        help="core of rank i, comma-separated (default: the allowed cores, in order)")
    parser.add_argument("--order", choices=("interleaved", "blocked"), default="interleaved",
                        help="interleaved: all arms' jobs alive, runs A B C A B C (default); "
                             "blocked: one arm's job at a time (less memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-stride", type=int, default=2, help="STADI --stadi_max_stride (default 2)")
    parser.add_argument("--pipefusion-patches", type=int, default=None, help="PipeFusion patches (default N)")
    parser.add_argument("--cache-threshold", type=float, default=None,
                        help="the cached arms' residual_diff_threshold (--cache_config; default xDiT's 0.12)")
    parser.add_argument("--profile-cache", action="store_true",
                        help="spatial/full reuse the speeds measured in the scenario's warm-up call "
                             "(--stadi_profile_cache; warm-up steps then use elastic bands) instead of "
                             "measuring in every call (default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: rank i on cuda:i (untested here: no GPU in CI)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32)")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before a stuck call fails its arm (default: 20x its warm-up, >= 60)")
    parser.add_argument("--out", default="bench-out", help="output folder (default ./bench-out, git-ignored)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-decode", action="store_true",
                        help="skip decoded-image PSNR/SSIM (only done for the tiny and small presets)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose-workers", action="store_true", help="keep xDiT/diffusers logs of the ranks")
    sim = parser.add_argument_group("cluster what-if (--simulate)")
    sim.add_argument("--simulate", action="store_true", help="predict uniform/spatial/full; runs no arm")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--gpus", default=None,
                        help="e.g. A100x4,RTX3090x4 (datasheet ratios from planner.gpus)")
    source.add_argument("--speeds", default=None, help="relative speeds instead of --gpus, e.g. 1,0.5")
    sim.add_argument("--row-seconds", type=float, default=None,
                     help="seconds per token row per step on the fastest rank (default: from FLOPs)")
    sim.add_argument("--mfu", type=float, default=0.35, help="assumed GPU FLOPs utilisation (default 0.35)")
    sim.add_argument("--link-gbps", type=float, default=None,
                     help="GB/s per rank for the K/V exchange (default: NVLink inside a node of one GPU type, "
                          "PCIe for cards without NVLink, a 100 Gb/s network between nodes of mixed types or "
                          "for --speeds; the line 'K/V exchange per sync' names the one assumed)")
    sim.add_argument("--calibrate-height", type=int, default=256,
                     help="px of the forward measured on this machine (default 256)")
    sim.add_argument("--no-measure", action="store_true", help="--simulate without the calibration forward")
    sim.add_argument("--ulysses-degree", type=int, default=1,
                     help="also predict STADI over groups of this many consecutive ranks, Ulysses inside each "
                          "(issue 23), next to xDiT's Ulysses over every rank (default 1: off)")
    sim.add_argument("--stadi-groups", default=None, metavar="SIZES",
                     help="also predict STADI over groups of these sizes in rank order, Ulysses inside each (nodes "
                          "of different sizes: H100x2,A100x4 with 2,4; launched with --stadi_groups)")
    parser.add_argument("--construct-only", action="store_true",
                        help="build the preset's transformer on the meta device, check arm validity, exit")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and fully validate ``argv`` without running anything (no arm, no process, no file).

    Bad input exits with status 2 and one ``stadi-bench: error: argument --FLAG: ...`` line. The namespace
    also carries the resolved values: ``height`` (the preset's unless given), ``arm_names`` (canonical
    order), ``scenarios`` (parsed; the default only outside --simulate/--construct-only), ``core_list``
    (ints, or None for the allowed cores), ``speed_values`` (--speeds) and ``gpu_names`` (--gpus).
    """
    args = parse_checked(build_parser(), argv)
    _validate_shape(args)
    _validate_run(args)
    _validate_simulate(args)
    return args


def _reject(flag: str, message: str) -> NoReturn:
    fail(PROG, f"argument {flag}: {message}", always=True)  # the driver is never a rank


def _require_range(flag: str, value: float | None, low: float, high: float, what: str = "a number") -> None:
    """``value`` (skipped when None) is finite and in [low, high]; nan fails every comparison."""
    if value is not None and not low <= value <= high:
        low, high = (f"{bound:g}" if isinstance(bound, float) else str(bound) for bound in (low, high))
        bounds = f">= {low}" if high == "inf" else f"in [{low}, {high}]"
        _reject(flag, f"must be {what} {bounds}, got {value!r}")


def _validate_shape(args: argparse.Namespace) -> None:
    """Image or clip size, steps and ranks: what every mode (run, --simulate, --construct-only) uses."""
    shape = PRESET_SHAPES[args.preset]
    args.height = shape.height if args.height is None else args.height
    if args.height % TOKEN_ROW_PX or not TOKEN_ROW_PX <= args.height <= MAX_ROWS * TOKEN_ROW_PX:
        _reject("--height", f"must be a multiple of {TOKEN_ROW_PX} px (one token row: VAE 8 x patch 2) in "
                            f"[{TOKEN_ROW_PX}, {MAX_ROWS * TOKEN_ROW_PX}] (at most {MAX_ROWS} token rows are supported), "
                            f"got {args.height}")
    _require_range("--steps", args.steps, 1, MAX_STEPS, "an integer (denoising steps)")
    _require_range("--warmup", args.warmup, 0, args.steps - 1, "an integer below --steps")
    _require_range("--ranks", args.ranks, 1, MAX_RANKS, "an integer")
    if shape.video:
        per, frames = FRAMES_PER_LATENT, shape.num_frames if args.num_frames is None else args.num_frames
        most = per * (MAX_ROWS // (args.height // TOKEN_ROW_PX) - 1) + 1  # the clip's token rows within MAX_ROWS
        if frames % per != 1 or not 1 <= frames <= most:
            _reject("--num-frames", f"must be {per}k+1 (Wan's VAE packs {per} frames per latent frame after the "
                                    f"first) in [1, {most}], got {frames}")
        args.num_frames = frames
        units = shape.band_units(args.height, frames)
        if units < args.ranks and not args.simulate:  # --simulate: its ranks are --gpus/--speeds
            _reject("--num-frames", f"{frames} frames at --height {args.height} are {units} token rows of the clip, "
                                    f"fewer than --ranks {args.ranks} (every STADI band has >= 1 row)")
    elif args.num_frames is not None:
        _reject("--num-frames", f"is for video presets; {args.preset} is an image preset")
    _require_range("--max-stride", args.max_stride, 1, MAX_STRIDE_LIMIT, "an integer (the planner's limit)")
    if args.pipefusion_patches is not None and args.pipefusion_patches < 1:
        _reject("--pipefusion-patches", f"must be an integer >= 1, got {args.pipefusion_patches}")
    _require_range("--cache-threshold", args.cache_threshold, 0.0, 1e6)


def _validate_run(args: argparse.Namespace) -> None:
    """Arms, scenarios, cores and the other settings of a measured run."""
    try:
        names = comma_subset(args.arms, ARM_ORDER)
    except ValueError:
        _reject("--arms", f"expected a comma-separated subset of {','.join(ARM_ORDER)}, got {args.arms!r}")
    # Canonical order: single first (the reference).
    args.arm_names = tuple(name for name in ARM_ORDER if name in names)

    measured = not (args.simulate or args.construct_only)
    texts = args.scenario or ([DEFAULT_SCENARIO] if measured else [])
    args.scenarios = []
    for text in texts:
        try:
            scenario = parse_scenario(text)
            scenario.check_world(args.ranks)
        except ValueError as error:
            default = "" if args.scenario else f" (the default --scenario; pass one for --ranks {args.ranks})"
            _reject("--scenario", f"{error}{default}")
        args.scenarios.append(scenario)

    args.core_list = None
    if args.cores is not None:
        try:
            args.core_list = list(parse_numbers(args.cores, int, example="0,1"))
        except ValueError as error:
            _reject("--cores", str(error))
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        outside = [c for c in args.core_list if c < 0 or (allowed is not None and c not in allowed)]
        if outside:
            _reject("--cores", f"core(s) {','.join(map(str, outside))} are not among this process's allowed "
                               f"cores {','.join(map(str, allowed or []))}, got {args.cores!r}")
        if len(args.core_list) < args.ranks:
            _reject("--cores", f"needs one core per rank (--ranks {args.ranks}), got {len(args.core_list)}: "
                               f"{args.cores!r}")
    if args.calls is not None and args.repeats is not None:
        _reject("--calls", "sets the timed calls per arm itself: give --calls or --repeats, not both")
    _require_range("--calls", args.calls, 2, MAX_CALLS, "an integer")
    _require_range("--repeats", args.repeats, 1, math.inf, "an integer")
    args.per_call = args.calls is not None
    args.repeats = args.calls if args.calls is not None else (args.repeats if args.repeats is not None else 3)
    _require_range("--seed", args.seed, 0, MAX_SEED, "an integer")
    _require_range("--run-timeout", args.run_timeout, 1e-3, MAX_RUN_TIMEOUT, "a number of seconds")
    if measured and args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.ranks:
            _reject("--device", f"cuda puts rank i on cuda:i: {args.ranks} ranks need {args.ranks} GPUs, "
                                f"found {torch.cuda.device_count()}")
    if not args.construct_only:
        problem = output_dir_problem(args.out)
        if problem:
            _reject("--out", problem)


def _validate_simulate(args: argparse.Namespace) -> None:
    """--gpus/--speeds and the cost-model options, checked whenever given (used by --simulate)."""
    args.gpu_names = args.speed_values = None
    if args.gpus is not None:
        try:
            args.gpu_names = parse_gpu_list(args.gpus)
        except ValueError as error:
            _reject("--gpus", str(error).removeprefix("gpus: "))
    if args.speeds is not None:
        try:
            args.speed_values = parse_numbers(args.speeds)
        except ValueError as error:
            _reject("--speeds", str(error))
        fastest = max(args.speed_values)
        if len(args.speed_values) > MAX_RANKS or not all(v >= MIN_RELATIVE_SPEED * fastest > 0
                                                         for v in args.speed_values):
            _reject("--speeds", f"expected 1 to {MAX_RANKS} speeds > 0, each >= {MIN_RELATIVE_SPEED:g} x the "
                                f"fastest, got {args.speeds!r}")
    _require_range("--row-seconds", args.row_seconds, *ROW_SECONDS_RANGE, "a number of seconds")
    _require_range("--mfu", args.mfu, *MFU_RANGE, "a fraction")
    _require_range("--link-gbps", args.link_gbps, *LINK_GBPS_RANGE, "a number of GB/s")
    low, high = CALIBRATE_HEIGHT_RANGE
    if args.calibrate_height % TOKEN_ROW_PX or not low <= args.calibrate_height <= high:
        _reject("--calibrate-height", f"must be a multiple of {TOKEN_ROW_PX} px in [{low}, {high}], "
                                      f"got {args.calibrate_height}")
    if args.ulysses_degree < 1:
        _reject("--ulysses-degree", f"must be an integer >= 1, got {args.ulysses_degree}")
    args.group_sizes = None
    if args.stadi_groups is not None:
        try:
            args.group_sizes = parse_counts(args.stadi_groups, "--stadi-groups")
        except ValueError as error:
            _reject("--stadi-groups", str(error).removeprefix("--stadi-groups "))
        if args.ulysses_degree != 1:
            _reject("--stadi-groups", f"cannot be combined with --ulysses-degree {args.ulysses_degree} (each group's "
                                      "size is its Ulysses degree)")
    if not args.simulate:
        for flag, given in (("--ulysses-degree", args.ulysses_degree != 1), ("--stadi-groups", args.group_sizes)):
            if given:  # a measured run's grouped arm is --arms full-ulysses2: refused, not ignored
                _reject(flag, "only with --simulate (the measured grouped arm is --arms full-ulysses2)")
        return
    ranks = args.gpu_names or args.speed_values
    if not ranks:
        _reject("--simulate", "needs --gpus (e.g. A100x4,RTX3090x4) or --speeds (e.g. 1,0.5)")
    if len(ranks) % args.ulysses_degree:
        _reject("--ulysses-degree", f"must divide the {len(ranks)} ranks into equal groups, got {args.ulysses_degree}")
    if args.group_sizes is not None and sum(args.group_sizes) != len(ranks):
        _reject("--stadi-groups", f"must add up to the {len(ranks)} ranks, got {args.stadi_groups} "
                                  f"({sum(args.group_sizes)})")
    if args.ulysses_degree > 1:
        args.group_sizes = (args.ulysses_degree,) * (len(ranks) // args.ulysses_degree)
    shape = PRESET_SHAPES[args.preset]
    units = shape.band_units(args.height, args.num_frames)
    if units < len(ranks):
        size = f"{args.num_frames} frames at {args.height} px have" if shape.video else f"{args.height} px has"
        _reject("--num-frames" if shape.video else "--height",
                f"{size} {units} {shape.band_unit}s, fewer than the {len(ranks)} simulated ranks (the planner "
                f"gives every rank >= 1 {shape.band_unit})")
    # With --gpus the row cost comes from FLOPs and the calibration forward only checks the FLOP model on
    # this CPU; a preset without one (real-size Flux/Wan do not fit a CPU forward) then skips it.
    calibrate = args.row_seconds is None and not args.no_measure
    if calibrate and not shape.calibrates and not args.gpu_names:
        _reject("--simulate", f"the calibration forward needs a PixArt preset ({args.preset} is {shape.family}); "
                              "with --speeds pass --row-seconds")
    if args.speed_values and args.row_seconds is None and args.no_measure:
        _reject("--no-measure", "with --speeds, --simulate needs --row-seconds or the calibration forward")


def _cores(cores: list[int] | None, world: int) -> list[int | None]:
    if cores is None:  # given cores were validated in parse_args: one per rank, all allowed
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        return [None] * world
    chosen = [cores[i % len(cores)] for i in range(world)]
    if len(set(chosen)) < world:  # fewer cores than ranks, or a --cores list that repeats one
        print(f"note: {world} ranks on {len(set(chosen))} cores {sorted(set(chosen))}: ranks share cores "
              "(timings are not meaningful)")
    return chosen


def _decoder(preset, seed: int):
    """Latent -> image (or video) in [0, 1] with the preset's VAE (same weights as every arm's), or None."""
    if not preset.shape.decode:
        return None
    from stadi_xdit.bench.presets import build_pipeline

    vae = build_pipeline(preset, seed=seed).vae
    return functools.partial(preset.decode, vae)


def _construct_only(args, preset, height) -> int:
    from stadi_xdit.bench.arms import skip_reason
    from stadi_xdit.bench.catalog import ARM_ORDER, ARMS
    from stadi_xdit.bench.presets import construct_on_meta

    start = time.perf_counter()
    params = construct_on_meta(preset)
    print(f"{preset.name}: {params / 1e6:.1f} M parameters, constructed on the meta device in "
          f"{time.perf_counter() - start:.1f} s; {preset.forward_flops(height) / 1e12:.2f} TFLOP per denoising step "
          f"at {preset.shape_label(height)} ({preset.band_units(height)} {preset.band_unit}s), "
          f"K/V {preset.kv_bytes(height, 2) / 1e9:.2f} GB per exchange (fp16)")
    if preset.video:  # every rank holds the whole clip's K/V (runtime.video_bands.displaced_kv_bytes)
        branch = preset.kv_bytes(height, 2, batch=1)
        print(f"  = the displaced K/V store of every STADI rank (bf16, batched CFG pair); {branch / 1e9:.2f} GB "
              f"({branch / 2**30:.2f} GiB) with --use_cfg_parallel")
    for name in ARM_ORDER:
        reason = skip_reason(ARMS[name], preset, height, args.ranks, args.steps, args.warmup, args.pipefusion_patches)
        print(f"  {ARMS[name].label(args.ranks):<22} {'ok' if reason is None else 'skip: ' + reason}")
    return 0


def _simulate(args, preset, height) -> int:
    from stadi_xdit.bench.simulate import format_what_if, what_if

    result = what_if(args.gpus, args.speed_values, preset, height=height, steps=args.steps, warmup=args.warmup,
                     row_seconds=args.row_seconds, mfu=args.mfu, link_gbps=args.link_gbps,
                     max_stride=args.max_stride, calibrate_height=args.calibrate_height,
                     measure=not args.no_measure, group_sizes=args.group_sizes)
    print(format_what_if(result, preset, height))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'simulate.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stadi-bench``; ``parse_args`` rejects bad input before any arm or process starts, and an
    output that cannot be written ends it with one line (exit 1)."""
    with stdout_guard("stadi-bench"):
        return _bench_command(argv)


def _bench_command(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("stadi-bench: no arguments, running the demo: stadi-bench " + " ".join(DEMO_ARGS))
        argv = list(DEMO_ARGS)
    args = parse_args(argv)

    import stadi_xdit.xdit  # noqa: F401  (CPU compat layer before anything imports xfuser)
    from stadi_xdit.bench.presets import get_preset

    preset = get_preset(args.preset, num_frames=args.num_frames)  # video: the validated --num-frames
    height = args.height  # the preset's when not given (parse_args)
    if args.construct_only:
        return _construct_only(args, preset, height)
    if args.simulate:
        return _simulate(args, preset, height)
    return run_bench(args, argv, preset, height)


def run_bench(args: argparse.Namespace, argv: Sequence[str], preset, height: int) -> int:
    """The measured benchmark for arguments validated by ``parse_args``."""
    from stadi_xdit.bench import plots
    from stadi_xdit.bench.report import checks, format_checks, format_table, summarize
    from stadi_xdit.bench.runner import BenchSettings, _Progress, calls_per_arm, run_scenario
    from stadi_xdit.bench.simulate import compare_with_measured, format_comparison

    arms, scenarios = args.arm_names, args.scenarios  # validated by parse_args; arms in canonical order
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").exists():  # said before minutes of work, not after
        print(f"stadi-bench: {out} holds an earlier run's results.json and plots; this run replaces them")
    settings = BenchSettings(preset=preset, height=height, steps=args.steps, warmup=args.warmup,
                             repeats=args.repeats, world=args.ranks, arms=arms,
                             cores=_cores(args.core_list, args.ranks),
                             seed=args.seed, order=args.order, max_stride=args.max_stride,
                             pipefusion_patches=args.pipefusion_patches, profile_cache=args.profile_cache,
                             cache_threshold=args.cache_threshold,
                             device=args.device, dtype=args.dtype, run_timeout=args.run_timeout,
                             verbose_workers=args.verbose_workers, out_dir=out, per_call=args.per_call)
    print(f"stadi-bench: preset {preset.name} {preset.shape_label(height)}, {args.steps} steps (warmup {args.warmup}), "
          f"{args.ranks} ranks on cores {settings.cores}, arms {', '.join(arms)}, "
          f"scenarios {', '.join(s.text for s in scenarios)}, {args.repeats} timed run(s) each after 1 warm-up")
    calls = sum(calls_per_arm(scenario, args.repeats) for scenario in scenarios)
    progress = _Progress(calls * len(arms), enabled=not args.no_progress)
    decoder = None if args.no_decode else _decoder(preset, args.seed)
    summaries = []
    started = time.time()

    def results(files: list, complete: bool) -> dict:
        return {
            "command": "stadi-bench " + " ".join(argv),
            "complete": complete,  # False: written after a scenario, before the run ended
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "wall_seconds": time.time() - started,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "settings": {"preset": preset.name, "num_frames": preset.num_frames, "height": height, "steps": args.steps,
                         "warmup": args.warmup, "repeats": args.repeats, "per_call": args.per_call,
                         "ranks": args.ranks, "arms": list(arms),
                         "cores": settings.cores, "order": args.order, "seed": args.seed, "max_stride": args.max_stride,
                         "profile_cache": settings.profile_cache, "device": args.device, "dtype": args.dtype,
                         "cache_threshold": args.cache_threshold},
            "scenarios": summaries,
            "plots": [str(p) for p in files],
        }

    try:
        for scenario in scenarios:
            load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
            outcomes = run_scenario(settings, scenario, progress)
            summary = summarize(settings, scenario, outcomes, decoder)
            summary["load_average_before"] = load_before
            summary["checks"] = checks(summary, settings)
            # The simulator assumes one load per call: nothing to compare under a changing load.
            comparison = (None if scenario.varying
                          else compare_with_measured(summary, settings, scenario.nominal_speeds(args.ranks)))
            summary["simulator_vs_measured"] = comparison
            summaries.append(summary)
            progress.note("\n" + format_table(summary, settings))
            if comparison:
                progress.note(format_comparison(comparison))
            progress.note(format_checks(summary["checks"]) + "\n")
            # Saved after every scenario: a failure later (a full disk, a crash, Ctrl-C) keeps these.
            _save_json(out / "results.json", results([], complete=False), quiet=True)
    finally:
        progress.close()

    files = []
    if not args.no_plots and summaries:
        title = f"{preset.name} {height}px, {args.steps} steps, {args.ranks} ranks"
        files.append(plots.latency_bars(summaries, out / "latency.png", title))
        for scenario, summary in zip(scenarios, summaries):
            if summary["kind"] != "none":
                shown = ("full", "full-sync") if scenario.varying else ("uniform", "full")
                path = plots.timeline_gantt(summary, out / f"timeline_{scenario.label}.png", arms=shown)
                if path:
                    files.append(path)
            if settings.per_call:
                files.append(plots.per_call(summary, out / f"calls_{scenario.label}.png", title))
        files = [path for path in files if path]  # a plot that could not be saved has said so
    saved = _save_json(out / "results.json", results(files, complete=True))
    if saved is None:
        return 1
    print(f"wrote {saved}" + "".join(f", {p}" for p in files))
    skipped = [arm for summary in summaries for arm in summary["arms"].values()]
    if skipped and all(arm["status"] == "skipped" for arm in skipped):  # asked for nothing that can run
        reasons = sorted({arm["reason"] for arm in skipped})
        fail("stadi-bench", f"--arms: none of {', '.join(arms)} can run this setup: {'; '.join(reasons)}", always=True)
    return 0


def _save_json(path: Path, results: dict, quiet: bool = False) -> Path | None:
    """`results` as strict JSON, written atomically; elsewhere (said in one line) when `path` fails."""
    from stadi_xdit.paths import save_with_fallback

    text = json.dumps(_finite(results), indent=1, default=str, allow_nan=False)
    if quiet:  # an intermediate save: the final one reports (and falls back) if the folder stays broken
        try:
            from stadi_xdit.paths import write_bytes_atomically

            write_bytes_atomically(path, text.encode())
            return path
        except OSError:
            return None
    return save_with_fallback(path, lambda temp: temp.write_text(text), "benchmark results")


def _finite(value):
    """Strict JSON: non-finite floats (PSNR of identical outputs is inf) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
