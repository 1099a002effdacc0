"""What stale K/V and skipped steps do to real samples: STADI's modes on the trained toy DiT.

    python -m stadi_xdit.toy.quality                 # 2 ranks, writes results/toy_quality/
    python -m stadi_xdit.toy.quality --out docs/img  # refresh the plots and json the docs show

Every arm denoises the same batch (one image per class, the same initial noise) and is compared
with the one-process output: latent PSNR/SSIM, the data set's coherence metrics (against the
one-process output and against ground-truth samples), and a per-row error profile that shows
whether the error gathers at band boundaries (seams).

Arms run on 2 ranks with the speeds *given* (``--stadi_speeds``), so each plan is fixed and the
outputs repeat bit for bit, and the same slowdown *emulated*, so the latencies match the plans:

* ``uniform``, ``spatial``, ``full`` (max stride 2) at 2:1;
* ``full`` at 3:1 with max stride 2 and with max stride 3 (the stride-3 question);
* ``full`` at 2:1 with the exchange broken (fault injection: displaced attention sees zeros
  instead of the other band's K/V), the floor any real exchange must clear;
* ``full`` at 2:1 with the stale store in bfloat16 (the first lever of ``--stadi_memory_budget``);
* ``single``, ``uniform`` and ``full`` at 2:1 with a step cache (cache-dit's DBCache, ``toy_dbcache``):
  what caching costs on its own, and under STADI, where a served step also keeps the K/V the rank's
  peers see from its last computed one.

Latency is the median of ``--repeats`` timed calls after one untimed call, on this CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stadi_xdit.paths import output_dir_problem, save_figure
from stadi_xdit.planner.validation import MAX_STEPS
from stadi_xdit.toy import data, metrics, model

DEFAULT_OUT = Path("results") / "toy_quality"  # under the current folder, as the example's results/


@dataclass(frozen=True)
class QualityArm:
    name: str
    label: str
    load: str  # emulated slowdown per rank, "1,2"; "" for the single rank
    stadi: dict = field(default_factory=dict)  # StadiArgs keywords
    cache: bool = False  # cache-dit's DBCache (`toy_dbcache`), as `--cache_method dbcache` applies it


def toy_dbcache():
    """cache-dit's DBCache on the toy's 8 PixArt blocks, as xDiT's runner entries declare it for their image
    models (`DBCacheSettings`): cache-dit's own PixArt block pattern, and xDiT's usual preset (the first 2
    blocks computed, threshold 0.12, the "fast" step mask)."""
    from xfuser.model_executor.cache.presets import CacheDitAdapterConfig, DBCachePreset, DBCacheSettings

    return DBCacheSettings(adapter=CacheDitAdapterConfig(blocks=(("transformer_blocks", "Pattern_3"),)),
                           preset=DBCachePreset(Fn_compute_blocks=2, residual_diff_threshold=0.12, scm_policy="fast"))


def default_arms() -> tuple[QualityArm, ...]:
    half, third = {"stadi_speeds": "1,0.5", "stadi_emulate_slowdown": "1,2"}, \
        {"stadi_speeds": "1,0.3333", "stadi_emulate_slowdown": "1,3"}
    return (
        QualityArm("single", "single rank", ""),
        QualityArm("uniform", "uniform 2:1", "1,2", {"stadi_mode": "uniform", **half}),
        QualityArm("spatial", "spatial 2:1", "1,2", {"stadi_mode": "spatial", **half}),
        QualityArm("full", "full 2:1, stride <= 2", "1,2", {"stadi_mode": "full", "stadi_max_stride": 2, **half}),
        QualityArm("full-3to1-s2", "full 3:1, stride <= 2", "1,3",
                   {"stadi_mode": "full", "stadi_max_stride": 2, **third}),
        QualityArm("full-3to1-s3", "full 3:1, stride <= 3", "1,3",
                   {"stadi_mode": "full", "stadi_max_stride": 3, **third}),
        QualityArm("fault", "full 2:1, exchange broken", "1,2",
                   {"stadi_mode": "full", "stadi_max_stride": 2, "ignore_foreign_bands": True, **half}),
        # The first lever of plans that fit (planner/memory.py): the stale store in bfloat16.
        QualityArm("full-bf16", "full 2:1, bfloat16 store", "1,2",
                   {"stadi_mode": "full", "stadi_max_stride": 2, "stadi_kv_dtype": "bfloat16", **half}),
        QualityArm("single+dbcache", "single rank + DBCache", "", cache=True),
        QualityArm("uniform+dbcache", "uniform 2:1 + DBCache", "1,2", {"stadi_mode": "uniform", **half}, cache=True),
        QualityArm("full+dbcache", "full 2:1 + DBCache", "1,2",
                   {"stadi_mode": "full", "stadi_max_stride": 2, **half}, cache=True),
    )


def _call(pipe, class_ids: Sequence[int], seed: int, steps: int) -> torch.Tensor:
    return pipe(**model.toy_call_kwargs(class_ids, seed, steps=steps)).images


def _timed_calls(pipe, class_ids, seed, steps, repeats, barrier) -> tuple[torch.Tensor, list[float]]:
    _call(pipe, class_ids, seed, steps)  # untimed: one-time costs
    seconds, latents = [], None
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        latents = _call(pipe, class_ids, seed, steps)
        seconds.append(time.perf_counter() - start)
    return latents, seconds


def _stadi_worker(rank: int, world: int, arms: list[QualityArm], class_ids: list[int], seed: int, steps: int,
                  warmup: int, repeats: int) -> list[dict]:
    import torch.distributed as dist

    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline
    from stadi_xdit.xdit.build import build_stadi_pipeline

    out = []
    for arm in arms:
        base = model.load_toy_pipeline()
        base.set_progress_bar_config(disable=True)
        pipe = build_stadi_pipeline(StadiPixArtAlphaPipeline, base, size=model.HEIGHT,
                                    steps=steps, model="toy-trained", warmup_steps=warmup, **arm.stadi)
        with _cached(pipe, pipe.module.transformer, arm, steps):
            if arm.cache:
                pipe.attach_step_cache()
            latents, seconds = _timed_calls(pipe, class_ids, seed, steps, repeats, dist.barrier)
        plan = pipe.last_result.plan
        served = torch.tensor([pipe.last_result.cached_forwards])
        dist.all_reduce(served)  # both ranks' served forwards, as the table reports them
        out.append({"name": arm.name, "seconds": seconds, "latents": latents if rank == 0 else None,
                    "row_bounds": plan.row_bounds(), "strides": [r.stride for r in plan.ranks],
                    "evals": [r.num_evals for r in plan.ranks], "served": int(served)})
    return out


@contextlib.contextmanager
def _cached(pipe, transformer: torch.nn.Module, arm: QualityArm, steps: int):
    """`arm`'s step cache on `transformer` while the block runs (none without one); cache-dit's hooks, which
    also wrap the pipeline class's `__call__`, are released after it."""
    if not arm.cache:
        yield
        return
    import cache_dit

    from stadi_xdit.xdit.step_cache import apply_cache_dit

    apply_cache_dit(pipe, transformer, toy_dbcache(), steps, None)
    try:
        yield
    finally:
        cache_dit.disable_cache(pipe)


def run_arms(arms: Sequence[QualityArm], class_ids: Sequence[int], *, seed: int = 0, steps: int = model.DEFAULT_STEPS,
             warmup: int = 3, repeats: int = 2, timeout: float = 1800.0) -> dict[str, dict]:
    """Latents, latencies and plans of every arm (the single rank here, the others on 2 spawned ranks)."""
    from stadi_xdit.offline.spawn import run_distributed
    from stadi_xdit.xdit.step_cache import cache_dit_served

    results = {}
    for arm in (arm for arm in arms if not arm.load):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, as each rank has
        try:
            pipe = model.load_toy_pipeline()
            pipe.set_progress_bar_config(disable=True)
            with _cached(pipe, pipe.transformer, arm, steps):
                latents, seconds = _timed_calls(pipe, class_ids, seed, steps, repeats, lambda: None)
                served = cache_dit_served(pipe.transformer) if arm.cache else 0
        finally:
            torch.set_num_threads(threads)
        results[arm.name] = {"name": arm.name, "seconds": seconds, "latents": latents, "row_bounds": None,
                             "strides": [1], "evals": [steps], "served": served}
    parallel = [arm for arm in arms if arm.load]
    if parallel:
        per_rank = run_distributed(_stadi_worker, 2, list(parallel), list(class_ids), seed, steps, warmup, repeats,
                                   timeout=timeout)
        for index, arm in enumerate(parallel):
            entry = per_rank[0][index]
            entry["seconds"] = [max(r[index]["seconds"][k] for r in per_rank) for k in range(repeats)]
            results[arm.name] = entry
    return results


def seam_ratio(profile: torch.Tensor, boundaries: Sequence[int], width: int = 1) -> float:
    """Mean row error within ``width`` latent rows of the band boundaries over the mean elsewhere
    (1: no seam; a seam shows as > 1)."""
    near = set()
    for b in boundaries:
        near.update(range(max(0, b - width), min(len(profile), b + width)))
    inside = [float(profile[i]) for i in sorted(near)]
    outside = [float(v) for i, v in enumerate(profile) if i not in near]
    if not inside or not outside or statistics.fmean(outside) == 0:
        return math.nan
    return statistics.fmean(inside) / statistics.fmean(outside)


def summarize(arms: Sequence[QualityArm], results: dict[str, dict], class_ids: Sequence[int]) -> dict:
    """Per arm: latency, PSNR/SSIM vs single, coherence metrics (and their gap to single), row profile, seams."""
    from stadi_xdit.bench.metrics import psnr, ssim

    reference = results["single"]["latents"]
    truth = metrics.ground_truth_metrics()
    single_metrics = metrics.coherence_metrics(reference, class_ids)
    rows = {}
    for arm in arms:
        entry = results[arm.name]
        # A cached arm against the uniform split with the same cache.
        uniform = results.get("uniform+dbcache" if arm.cache else "uniform")
        uniform_seconds = statistics.median(uniform["seconds"]) if uniform else None
        latents = entry["latents"]
        coherence = metrics.coherence_metrics(latents, class_ids)
        profile = metrics.row_error_profile(latents, reference)
        bounds = entry["row_bounds"]
        # Token-row bands -> latent rows (patch 2): the first latent row of every band but the first.
        boundaries = [2 * start for start, _ in bounds[1:]] if bounds else []
        median = statistics.median(entry["seconds"])
        rows[arm.name] = {
            "label": arm.label, "load": arm.load, "seconds": entry["seconds"], "median_seconds": median,
            "vs_uniform": uniform_seconds / median if uniform_seconds and arm.load == "1,2" else None,
            "strides": entry["strides"], "evals": entry["evals"], "served": entry["served"], "row_bounds": bounds,
            "latent_psnr": psnr(reference, latents) if arm.name != "single" else math.inf,
            "latent_ssim": ssim(reference, latents) if arm.name != "single" else 1.0,
            "coherence": coherence,
            "coherence_minus_single": {k: coherence[k] - single_metrics[k] for k in coherence},
            "row_error": profile.tolist(), "boundaries": boundaries,
            "seam_ratio": seam_ratio(profile, boundaries) if boundaries else None,
        }
    return {"class_ids": list(class_ids), "ground_truth": truth, "arms": rows}


def format_table(summary: dict) -> str:
    names = ("symmetry_error", "color_match", "pole_continuity", "horizon_continuity", "background_accuracy",
             "shape_accuracy")
    short = ("sym.err", "colour", "pole", "horizon", "bg acc", "shape acc")
    head = ("| arm | strides | served | latency s | vs uniform | PSNR dB | SSIM | seam ratio | "
            + " | ".join(short) + " |")
    lines = [head, "|" + " --- |" * (8 + len(short))]
    truth = summary["ground_truth"]
    lines.append("| ground truth (data set) | | | | | | | | " + " | ".join(f"{truth[n]:.3f}" for n in names) + " |")
    for arm in summary["arms"].values():
        psnr_text = "ref" if math.isinf(arm["latent_psnr"]) else f"{arm['latent_psnr']:.1f}"
        vs = f"{arm['vs_uniform']:.2f}x" if arm["vs_uniform"] else "-"
        seam = f"{arm['seam_ratio']:.2f}" if arm["seam_ratio"] is not None else "-"
        served = f"{arm['served']}/{sum(arm['evals'])}"  # forwards the step cache served, of all ranks' forwards
        lines.append(f"| {arm['label']} | {arm['strides']} | {served} | {arm['median_seconds']:.2f} | {vs} | {psnr_text} | "
                     f"{arm['latent_ssim']:.4f} | {seam} | "
                     + " | ".join(f"{arm['coherence'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def plot_tradeoff(summary: dict, path: Path) -> Path | None:
    """Left: PSNR vs single against latency; right: per-row error vs single with band boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name, arm in summary["arms"].items():
        if name == "single":
            left.axvline(arm["median_seconds"], color="#7f7f7f", linestyle=":", label="single rank (latency)")
            continue
        marker = "x" if name == "fault" else ("s" if arm["load"] == "1,3" else ("^" if arm["served"] else "o"))
        left.scatter(arm["median_seconds"], arm["latent_psnr"], marker=marker, s=50, label=arm["label"])
        line, = right.plot(arm["row_error"], label=arm["label"])
        for b in arm["boundaries"]:
            right.axvline(b - 0.5, color=line.get_color(), linestyle=":", linewidth=0.8)
    left.set_xlabel("latency [s] (median, 2 CPU ranks, emulated slowdown)")
    left.set_ylabel("latent PSNR vs single rank [dB]")
    left.set_title("quality vs latency (circles 2:1, squares 3:1, triangles 2:1 cached)", fontsize=10)
    left.legend(fontsize=7)
    right.set_yscale("log")
    right.set_xlabel("latent row (dotted: band boundaries of each arm)")
    right.set_ylabel("mean |error| vs single rank")
    right.set_title("where the error is: per-row profile (seams would peak at boundaries)", fontsize=10)
    right.legend(fontsize=7)
    fig.tight_layout()
    saved = save_figure(fig, path, "plot")
    plt.close(fig)
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    from stadi_xdit.cli_errors import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m stadi_xdit.toy.quality", description=__doc__.split("\n\n")[0])
    # Not docs/img by default: a run must not rewrite tracked files (the docs' own figures) unasked.
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder of the plots and json (default {DEFAULT_OUT}; --out docs/img refreshes the docs)")
    parser.add_argument("--steps", type=int, default=model.DEFAULT_STEPS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.steps <= MAX_STEPS:
        parser.error(f"argument --steps: must be in [2, {MAX_STEPS}], got {args.steps}")
    if not 1 <= args.warmup < args.steps:
        parser.error(f"argument --warmup: must be in [1, --steps - 1] = [1, {args.steps - 1}], got {args.warmup}")
    if args.repeats < 1:
        parser.error(f"argument --repeats: must be >= 1, got {args.repeats}")
    if not 0 <= args.seed <= 2**63 - 1:
        parser.error(f"argument --seed: must be in [0, 2**63 - 1], got {args.seed}")
    problem = output_dir_problem(args.out)
    if problem:
        parser.error(f"argument --out: {problem}")
    earlier = sorted(path.name for path in args.out.glob("toy_quality*"))
    if earlier:  # said before minutes of work, not after
        print(f"replacing {', '.join(earlier)} in {args.out} at the end of this run")

    import stadi_xdit.xdit  # noqa: F401  (xfuser's CPU compat layer before the ranks import it)

    class_ids = list(range(data.NUM_CLASSES))
    arms = default_arms()
    started = time.time()
    results = run_arms(arms, class_ids, seed=args.seed, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    summary = summarize(arms, results, class_ids)
    summary["settings"] = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                           "wall_seconds": time.time() - started}
    print(format_table(summary))
    from stadi_xdit.paths import save_with_fallback
    from stadi_xdit.toy import viz

    # The numbers first, then each figure: a figure that cannot be saved loses nothing else.
    text = json.dumps(summary, indent=1, default=str)
    saved_json = save_with_fallback(args.out / "toy_quality.json", lambda temp: temp.write_text(text), "quality results")
    grid_arms = ("single", "uniform", "spatial", "full", "full-3to1-s3", "fault")
    grid = viz.save_image_grid(args.out / "toy_quality_grid.png", [results[n]["latents"] for n in grid_arms],
                               labels=[summary["arms"][n]["label"] for n in grid_arms],
                               col_labels=[data.CLASS_NAMES[i].replace(" on ", "\non ") for i in class_ids],
                               title=f"same seed and noise per column, {args.steps} steps; dashed: 2-rank band "
                                     "boundary of full 2:1",
                               boundaries=summary["arms"]["full"]["boundaries"])
    plot = plot_tradeoff(summary, args.out / "toy_quality_tradeoff.png")
    print(f"wrote {', '.join(str(path) for path in (grid, plot, saved_json) if path)}")
    return 0 if saved_json and grid and plot else 1


if __name__ == "__main__":
    raise SystemExit(main())
