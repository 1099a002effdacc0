"""``stadi-bench``: STADI vs patch parallelism vs xDiT's Ulysses / Ring / PipeFusion on slowed ranks.

With no arguments it runs a short demo (``DEMO_ARGS``). Examples::

    stadi-bench                                          # demo: small preset, 256 px, slowdown:1,2
    stadi-bench --preset small --steps 20 --repeats 3 \\
        --scenario none --scenario slowdown:1,2 --scenario background:1=1
    stadi-bench --simulate --gpus A100x4,RTX3090x4 --preset pixart-alpha-1024
    stadi-bench --construct-only --preset flux-dev-1024

See docs/benchmarks.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEMO_ARGS = ["--preset", "small", "--height", "256", "--steps", "10", "--warmup", "2", "--repeats", "2",
             "--scenario", "slowdown:1,2"]


def build_parser() -> argparse.ArgumentParser:
    from stadi_xdit.bench.arms import ARM_ORDER
    from stadi_xdit.bench.presets import BENCH_PRESETS

    parser = argparse.ArgumentParser(
        prog="stadi-bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="End-to-end latency of STADI vs xDiT's strategies on heterogeneous (slowed) ranks.",
        epilog="With no arguments: stadi-bench " + " ".join(DEMO_ARGS))
    parser.add_argument("--preset", default="small", choices=list(BENCH_PRESETS), help="model preset (default small)")
    parser.add_argument("--height", type=int, default=None, help="image side in px (default: the preset's)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="synchronous warm-up steps of STADI and PipeFusion (default 2)")
    parser.add_argument("--repeats", "-r", type=int, default=3, help="timed runs per arm (median; default 3)")
    parser.add_argument("--ranks", "-n", type=int, default=2, help="ranks N of the parallel arms (default 2)")
    parser.add_argument("--scenario", action="append", default=None,
                        help="none | slowdown:k0,k1,... | background:RANK=LOAD[,...]; repeatable "
                             "(default slowdown:1,2)")
    parser.add_argument("--arms", default=",".join(ARM_ORDER),
                        help=f"comma-separated subset of {','.join(ARM_ORDER)} (default all)")
    parser.add_argument("--cores", default=None,
                        help="core of rank i, comma-separated (default: the allowed cores, in order)")
    parser.add_argument("--order", choices=("interleaved", "blocked"), default="interleaved",
                        help="interleaved: all arms' jobs alive, runs A B C A B C (default); "
                             "blocked: one arm's job at a time (less memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-stride", type=int, default=2, help="STADI --stadi_max_stride (default 2)")
    parser.add_argument("--pipefusion-patches", type=int, default=None, help="PipeFusion patches (default N)")
    parser.add_argument("--profile-cache", action="store_true",
                        help="spatial/full reuse the speeds measured in the scenario's warm-up call "
                             "(--stadi_profile_cache; warm-up steps then use elastic bands) instead of "
                             "measuring in every call (default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: rank i on cuda:i (untested here: no GPU in CI)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
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
    sim.add_argument("--gpus", default=None, help="e.g. A100x4,RTX3090x4 (datasheet ratios from planner.gpus)")
    sim.add_argument("--speeds", default=None, help="relative speeds instead of --gpus, e.g. 1,0.5")
    sim.add_argument("--row-seconds", type=float, default=None,
                     help="seconds per token row per step on the fastest rank (default: from FLOPs)")
    sim.add_argument("--mfu", type=float, default=0.35, help="assumed GPU FLOPs utilisation (default 0.35)")
    sim.add_argument("--link-gbps", type=float, default=None,
                     help="GB/s per rank for K/V exchange; given: exchange is exposed, else hidden")
    sim.add_argument("--calibrate-height", type=int, default=256,
                     help="px of the forward measured on this machine (default 256)")
    sim.add_argument("--no-measure", action="store_true", help="--simulate without the calibration forward")
    parser.add_argument("--construct-only", action="store_true",
                        help="build the preset's transformer on the meta device, check arm validity, exit")
    return parser


def _cores(text: str | None, world: int) -> list[int | None]:
    if text:
        cores = [int(c) for c in text.split(",")]
    else:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        return [None] * world
    if len(cores) < world:
        print(f"note: {world} ranks on {len(cores)} cores: ranks share cores (timings are not meaningful)")
    return [cores[i % len(cores)] for i in range(world)]


def _decoder(preset, seed: int):
    """Latent -> image in [0, 1] with the preset's VAE (same weights as every arm's), or None."""
    if preset.name not in ("tiny", "small"):
        return None
    import torch

    from stadi_xdit.bench.presets import build_pipeline

    vae = build_pipeline(preset, seed=seed).vae

    def decode(latent):
        with torch.no_grad():
            image = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    return decode


def _construct_only(args, preset, height) -> int:
    from stadi_xdit.bench.arms import ARM_ORDER, ARMS, skip_reason
    from stadi_xdit.bench.presets import construct_on_meta

    start = time.perf_counter()
    params = construct_on_meta(preset)
    print(f"{preset.name}: {params / 1e6:.1f} M parameters, constructed on the meta device in "
          f"{time.perf_counter() - start:.1f} s; {preset.forward_flops(height) / 1e12:.2f} TFLOP per forward at "
          f"{height}px, K/V {preset.kv_bytes(height, 2) / 1e9:.2f} GB per exchange (fp16)")
    for name in ARM_ORDER:
        reason = skip_reason(ARMS[name], preset, height, args.ranks, args.steps, args.warmup, args.pipefusion_patches)
        print(f"  {ARMS[name].label(args.ranks):<22} {'ok' if reason is None else 'skip: ' + reason}")
    return 0


def _simulate(args, preset, height) -> int:
    from stadi_xdit.bench.simulate import format_what_if, what_if

    if not args.gpus and not args.speeds:
        raise SystemExit("stadi-bench: --simulate needs --gpus (e.g. A100x4,RTX3090x4) or --speeds (e.g. 1,0.5)")
    speeds = tuple(float(v) for v in args.speeds.split(",")) if args.speeds else None
    result = what_if(args.gpus, speeds, preset, height=height, steps=args.steps, warmup=args.warmup,
                     row_seconds=args.row_seconds, mfu=args.mfu, link_gbps=args.link_gbps,
                     max_stride=args.max_stride, calibrate_height=args.calibrate_height,
                     measure=not args.no_measure)
    print(format_what_if(result, preset, height))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'simulate.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("stadi-bench: no arguments, running the demo: stadi-bench " + " ".join(DEMO_ARGS))
        argv = list(DEMO_ARGS)
    parser = build_parser()
    args = parser.parse_args(argv)

    import stadi_xdit  # noqa: F401  (CPU compat layer before anything imports xfuser)
    from stadi_xdit.bench.arms import ARM_ORDER
    from stadi_xdit.bench.presets import get_preset

    preset = get_preset(args.preset)
    height = args.height or preset.height
    if args.construct_only:
        return _construct_only(args, preset, height)
    if args.simulate:
        return _simulate(args, preset, height)
    return run_bench(args, argv, preset, height, ARM_ORDER)


def run_bench(args, argv, preset, height, arm_order) -> int:
    from stadi_xdit.bench import plots
    from stadi_xdit.bench.report import checks, format_checks, format_table, summarize
    from stadi_xdit.bench.runner import BenchSettings, _Progress, run_scenario
    from stadi_xdit.bench.scenarios import parse_scenario
    from stadi_xdit.bench.simulate import compare_with_measured, format_comparison

    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in arm_order]
    if unknown:
        raise SystemExit(f"stadi-bench: unknown arm(s) {', '.join(unknown)} (known: {', '.join(arm_order)})")
    arms = tuple(a for a in arm_order if a in arms)  # canonical order; single first (the reference)
    scenarios = [parse_scenario(s) for s in (args.scenario or ["slowdown:1,2"])]
    for scenario in scenarios:
        scenario.check_world(args.ranks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings(preset=preset, height=height, steps=args.steps, warmup=args.warmup,
                             repeats=args.repeats, world=args.ranks, arms=arms, cores=_cores(args.cores, args.ranks),
                             seed=args.seed, order=args.order, max_stride=args.max_stride,
                             pipefusion_patches=args.pipefusion_patches, profile_cache=args.profile_cache,
                             device=args.device, dtype=args.dtype, run_timeout=args.run_timeout,
                             verbose_workers=args.verbose_workers, out_dir=out)
    print(f"stadi-bench: preset {preset.name} {height}px, {args.steps} steps (warmup {args.warmup}), "
          f"{args.ranks} ranks on cores {settings.cores}, arms {', '.join(arms)}, "
          f"scenarios {', '.join(s.text for s in scenarios)}, {args.repeats} timed run(s) each after 1 warm-up")
    progress = _Progress(len(scenarios) * len(arms) * (1 + args.repeats), enabled=not args.no_progress)
    decoder = None if args.no_decode else _decoder(preset, args.seed)
    summaries = []
    started = time.time()
    try:
        for scenario in scenarios:
            load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
            outcomes = run_scenario(settings, scenario, progress)
            summary = summarize(settings, scenario, outcomes, decoder)
            summary["load_average_before"] = load_before
            summary["checks"] = checks(summary, settings)
            comparison = compare_with_measured(summary, settings, scenario.nominal_speeds(args.ranks))
            summary["simulator_vs_measured"] = comparison
            summaries.append(summary)
            progress.note("\n" + format_table(summary, settings))
            if comparison:
                progress.note(format_comparison(comparison))
            progress.note(format_checks(summary["checks"]) + "\n")
    finally:
        progress.close()

    files = []
    if not args.no_plots and summaries:
        title = f"{preset.name} {height}px, {args.steps} steps, {args.ranks} ranks"
        files.append(plots.latency_bars(summaries, out / "latency.png", title))
        for summary in summaries:
            if summary["kind"] != "none":
                label = summary["scenario"].replace(":", "_").replace("=", "-").replace(",", "_")
                path = plots.timeline_gantt(summary, out / f"timeline_{label}.png")
                if path:
                    files.append(path)
    results = {
        "command": "stadi-bench " + " ".join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {"preset": preset.name, "height": height, "steps": args.steps, "warmup": args.warmup,
                     "repeats": args.repeats, "ranks": args.ranks, "arms": list(arms), "cores": settings.cores,
                     "order": args.order, "seed": args.seed, "max_stride": args.max_stride,
                     "profile_cache": settings.profile_cache, "device": args.device, "dtype": args.dtype},
        "scenarios": summaries,
        "plots": [str(p) for p in files],
    }
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1, default=str, allow_nan=False))
    print(f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in files))
    return 0


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
