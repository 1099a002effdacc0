"""Turn raw arm outcomes into the summary, the printed table and the PASS/MISS target checks."""

from __future__ import annotations

import math
import statistics

import torch

from stadi_xdit.bench.catalog import ARMS, XDIT_ARMS
from stadi_xdit.bench.metrics import psnr, ssim
from stadi_xdit.bench.runner import ArmOutcome, BenchSettings
from stadi_xdit.bench.scenarios import Scenario
from stadi_xdit.planner import Plan, predict_latency


def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _ratio(num, den):
    return num / den if num is not None and den else None


def _noise_rate(outcome: ArmOutcome | None) -> float:
    """Wall seconds per CPU second lost inside the single-rank arm's forwards (other tenants, preemption)."""
    if outcome is None or not outcome.runs:
        return 0.0
    rates = []
    for run in outcome.runs:
        spans = run["ranks"][0]["forward_spans"]
        cpu = sum(c for _, _, c, _ in spans)
        if cpu > 0:
            rates.append(max(0.0, sum(e - s for s, e, _, _ in spans) / cpu - 1.0))
    return _median(rates) or 0.0


def _in_step_overhead(rank: dict, noise_rate: float) -> float:
    """Seconds a rank lost inside its displaced-phase forwards to neither compute nor waiting.

    Per forward: wall span - collective wait - CPU time of the compute thread. On CPU this is the
    gloo threads sending/receiving K/V on the rank's own core (and other tenants); the tenants'
    share is removed with the single-rank arm's rate of wall time lost per CPU second.
    """
    spans, steps = rank["forward_spans"], rank["stadi"]["steps"]
    total = 0.0
    for (start, end, cpu, _), step in zip(spans, steps):
        if step["phase"] != "warmup":
            total += max(0.0, (end - start) - step["wait"] - cpu * (1.0 + noise_rate))
    return total


def predicted_seconds(plan: Plan, warmup: Plan, costs: dict | None) -> float:
    """The planner's cost model on the layout that ran, with the cost terms the runtime calibrated.

    Without calibration (speeds given): ``predict_latency`` on the run's warm-up and final bands.
    With it: each warm-up step on the bands it ran (two layouts when the fit needed two sizes),
    plus the displaced phase with the per-rank fixed costs and the exchange per sync period.
    """
    rows = [r.num_rows for r in plan.ranks]
    strides = [r.stride for r in plan.ranks]
    if not costs:
        return predict_latency(rows, strides, plan.speeds, num_steps=plan.num_steps,
                               warmup_steps=plan.warmup_steps,
                               warmup_band_rows=[e - s for s, e in warmup.row_bounds()]).total_seconds
    overheads = costs["step_overhead_seconds"]
    warm = sum(max(r / v + o for r, v, o in zip(step_rows, plan.speeds, overheads))
               + costs["warmup_exchange_seconds"] for step_rows in costs["warmup_rows"])
    stale = predict_latency(rows, strides, plan.speeds, num_steps=plan.num_base_steps, warmup_steps=0,
                            step_overhead_seconds=overheads, exchange_seconds=costs["exchange_seconds"])
    return warm + stale.total_seconds


def collectives_bound(exchange: dict, world: int) -> int | None:
    """The issue's bound on collectives per sync point: ceil(layers / group) x (1 or N)."""
    if not exchange or not exchange.get("layers"):
        return None
    groups = math.ceil(exchange["layers"] / exchange["group_layers"])
    return groups * (1 if exchange["method"] == "all_gather" else world)


def _stadi_details(outcome: ArmOutcome, fast_rank: int, noise_rate: float) -> dict | None:
    """Plan, planner prediction and measured STADI phases (rank 0's plan; all ranks plan alike)."""
    runs = [run for run in outcome.runs if "stadi" in run["ranks"][0]]
    if not runs:
        return None
    last = runs[-1]["ranks"][0]["stadi"]
    plan = Plan.from_json(last["plan"])
    warm = Plan.from_json(last["warmup_plan"])
    predictions, exchanges, overheads, denoise = [], [], [], []
    for run in runs:
        rank0 = run["ranks"][0]["stadi"]
        p, w = Plan.from_json(rank0["plan"]), Plan.from_json(rank0["warmup_plan"])
        # The planner's own cost model on the layout that ran (warm-up bands and calibrated costs included).
        predictions.append(predicted_seconds(p, w, rank0.get("costs")))
        # Transition and final gather: the rank arriving last sees the pure exchange (the others wait in it).
        labels = {ph["label"] for ph in rank0["phases"]}
        exchanges.append(sum(min(sum(ph["end"] - ph["start"] for ph in r["stadi"]["phases"] if ph["label"] == label)
                                 for r in run["ranks"]) for label in labels))
        overheads.append(_in_step_overhead(run["ranks"][fast_rank], noise_rate))
        denoise.append(max(max(ph["end"] for ph in r["stadi"]["phases"]) for r in run["ranks"]))
    world = len(runs[-1]["ranks"])
    exchange = [r["stadi"].get("exchange") or {} for r in runs[-1]["ranks"]]
    return {
        "mode": plan.mode,
        "costs": last.get("costs"),
        "exchange": exchange,
        "collectives_per_sync_point": [e.get("collectives_per_sync_point") for e in exchange],
        "collectives_bound": collectives_bound(exchange[0], world),
        "kv_store_bytes": [e.get("store_bytes") for e in exchange],
        "speeds": list(plan.speeds),
        "measured_speeds": last["measured_speeds"],
        "rows": [r.num_rows for r in plan.ranks],
        "warmup_rows": [e - s for s, e in warm.row_bounds()],
        "strides": [r.stride for r in plan.ranks],
        "evals": [r.num_evals for r in plan.ranks],
        "predicted_seconds": _median(predictions),
        "planner_predicted_seconds": plan.predicted.total_seconds,
        "denoise_seconds": _median(denoise),
        "exchange_seconds": _median(exchanges),
        "in_step_exchange_seconds": _median(overheads),
        "explain": last["explain"],
        # --stadi_replan sync: the re-plans of each timed call (base step, old/new rows and strides, gain).
        "replans": [run["ranks"][0]["stadi"].get("replans", []) for run in runs],
    }


def per_call(outcome: ArmOutcome) -> list[dict]:
    """Every call of a STADI arm, the cold one first: its plan, the cost model it planned on, its latency.

    Adaptive STADI's sequence of calls (``--stadi_replan calls``): does the plan reach a fixed point?"""
    calls = ([outcome.cold] if outcome.cold else []) + list(outcome.runs)
    out = []
    for index, run in enumerate(calls):
        stadi = run["ranks"][0].get("stadi")
        if stadi is None:
            continue
        p, w = Plan.from_json(stadi["plan"]), Plan.from_json(stadi["warmup_plan"])
        costs = stadi.get("costs") or {}
        out.append({"call": "cold" if outcome.cold and index == 0 else len(out) + (0 if outcome.cold else 1),
                    "latency": run["latency"], "rows": [r.num_rows for r in p.ranks],
                    "warmup_rows": [e - s for s, e in w.row_bounds()], "strides": [r.stride for r in p.ranks],
                    "fixed_ms": [1e3 * o for o in costs.get("step_overhead_seconds", [])],
                    "row_ms": [1e3 * c for c in costs.get("row_seconds", [])],
                    "noise": costs.get("noise"), "samples": costs.get("samples"),
                    "evidence": costs.get("evidence"), "settled": stadi.get("settle_reasons") or {}})
    return out


def _quality(reference: torch.Tensor | None, latent: torch.Tensor | None, decoder) -> dict:
    if reference is None or latent is None or reference.shape != latent.shape:
        return {}
    out = {"latent_psnr": psnr(reference, latent), "latent_ssim": ssim(reference, latent)}
    if decoder is not None:
        ref_img, img = decoder(reference), decoder(latent)
        out.update(image_psnr=psnr(ref_img, img, data_range=1.0), image_ssim=ssim(ref_img, img, data_range=1.0))
    return out


def summarize(settings: BenchSettings, scenario: Scenario, outcomes: dict[str, ArmOutcome],
              decoder=None) -> dict:
    medians = {name: o.median for name, o in outcomes.items() if o.median is not None}
    xdit = {name: medians[name] for name in XDIT_ARMS if name in medians}
    best_xdit = min(xdit, key=xdit.get) if xdit else None
    reference = outcomes["single"].latent if "single" in outcomes else None
    fast_rank = scenario.fast_rank(settings.world)
    noise_rate = _noise_rate(outcomes.get("single"))
    arms = {}
    for name, outcome in outcomes.items():
        median = outcome.median
        busy = None
        if outcome.runs:
            world = len(outcome.runs[0]["ranks"])
            busy = [_median([run["ranks"][r]["busy_fraction"] for run in outcome.runs]) for r in range(world)]
        peak = None
        if outcome.runs:
            peak = [_median([_peak(run["ranks"][r]) for run in outcome.runs])
                    for r in range(len(outcome.runs[0]["ranks"]))]
        arms[name] = {
            "label": outcome.label,
            "status": outcome.status,
            "reason": outcome.reason,
            "median_seconds": median,
            "min_seconds": min(outcome.latencies) if outcome.runs else None,
            "max_seconds": max(outcome.latencies) if outcome.runs else None,
            "latencies": outcome.latencies,
            "warmup_call_seconds": outcome.warmup_latency,
            "reference_call_seconds": outcome.reference_latency,
            # A compiled arm against the compiled uniform and single arms; its eager arm gives the compile speedup.
            "speedup_vs_uniform": _ratio(medians.get(f"uniform{ARMS[name].suffix}"), median),
            "speedup_vs_best_xdit": _ratio(medians.get(best_xdit), median) if best_xdit else None,
            "speedup_vs_single": _ratio(medians.get(f"single{ARMS[name].suffix}"), median),
            "compile": _compile_details(outcome, medians.get(ARMS[name].eager)) if ARMS[name].compiled else None,
            "cache": _cache_details(outcome, medians.get(ARMS[name].uncached)) if ARMS[name].cache else None,
            "busy_fraction": busy,
            "peak_memory_bytes": peak,
            "emulated_seconds": ([_median([run["ranks"][r]["emulated"] for run in outcome.runs])
                                  for r in range(len(outcome.runs[0]["ranks"]))] if outcome.runs else None),
            "quality": _quality(reference, outcome.latent, decoder) if name != "single" else {},
            "stadi": _stadi_details(outcome, fast_rank, noise_rate) if ARMS[name].kind == "stadi" else None,
            "per_call": per_call(outcome) if ARMS[name].kind == "stadi" and settings.per_call else None,
            "runs": outcome.runs,
        }
        stadi = arms[name]["stadi"]
        if stadi and median:
            stadi["prediction_error"] = stadi["predicted_seconds"] / median - 1.0
    before, after = scenario.load_phases(settings.world)
    return {"scenario": scenario.text, "kind": scenario.kind, "factors": list(scenario.factors),
            "varying": scenario.varying,
            "switch_step": scenario.switch_step(settings.steps) if scenario.after_factors is not None else None, "nominal_speeds_before": list(before), "nominal_speeds_after": list(after),
            "load_switches": [run.get("load_switches") for o in outcomes.values() for run in o.runs
                              if run.get("load_switches")],
            "loads": {str(k): v for k, v in scenario.loads.items()}, "fast_rank": fast_rank,
            "single_noise_rate": noise_rate, "best_xdit": best_xdit, "arms": arms}




def _cache_details(outcome: ArmOutcome, uncached_median: float | None) -> dict | None:
    """A cached arm: the forwards its step cache served per rank (median over the timed calls), of how many,
    and its speedup over the same arm uncached (None without it)."""
    if not outcome.runs:
        return None
    world = len(outcome.runs[0]["ranks"])
    return {"served_forwards": [_median([run["ranks"][r]["served_forwards"] or 0 for run in outcome.runs])
                                for r in range(world)],
            "forwards": [_median([run["ranks"][r]["forwards"] for run in outcome.runs]) for r in range(world)],
            "speedup_vs_uncached": _ratio(uncached_median, outcome.median)}


def _compile_details(outcome: ArmOutcome, eager_median: float | None) -> dict | None:
    """A compiled arm: its compile warmup (the slowest rank's seconds, the graphs it compiled), graphs compiled
    in the timed calls after it (recompiles), and its speedup over the same arm eager (None without it)."""
    reports = [rank["compile"] for run in outcome.runs for rank in run["ranks"] if rank.get("compile")]
    if not reports:
        return None
    return {"warmup_seconds": max(r["warmup_seconds"] for r in reports),
            "warmup_graphs": max(r["warmup_graphs"] for r in reports),
            "recompiles": max(r["recompiles"] for r in reports),
            "speedup_vs_eager": _ratio(eager_median, outcome.median)}


def _peak(rank: dict) -> float | None:
    """A rank's peak memory in one run (the runner's field, else the STADI timeline's)."""
    value = rank.get("peak_memory_bytes")
    if value is None:
        value = (rank.get("stadi") or {}).get("peak_memory_bytes")
    return float(value) if value is not None else None


# ------------------------------------------------------------------------------------------ checks


# The setup the issues' targets were set for (with one rank slowed 2:1, or no load, per scenario).
TARGET_SETUP = {"preset": "small", "px": 512, "steps": 20, "ranks": 2}


def off_target_setup(settings: BenchSettings | None) -> str | None:
    """How this run's setup differs from TARGET_SETUP ("px 256, steps 10"), or None where the targets apply."""
    if settings is None:
        return None
    this = {"preset": settings.preset.name, "px": settings.height, "steps": settings.steps, "ranks": settings.world}
    return ", ".join(f"{key} {this[key]}" for key in TARGET_SETUP if this[key] != TARGET_SETUP[key]) or None


def checks(summary: dict, settings: BenchSettings | None) -> list[dict]:
    """The issue's targets, evaluated on this scenario's numbers: PASS/MISS where they apply (the setup of
    TARGET_SETUP), INFO on another setup (the same numbers, no verdict), N/A without a value."""
    arms = summary["arms"]
    elsewhere = off_target_setup(settings)
    setup = ", ".join(f"{key} {value}" for key, value in TARGET_SETUP.items())

    def med(name):
        return arms.get(name, {}).get("median_seconds")

    out = []

    def add(name, value, bound, ok, detail):
        status = "N/A" if value is None else "INFO" if elsewhere else ("PASS" if ok(value) else "MISS")
        if elsewhere:
            detail = f"{detail} [a target for {setup}; this run: {elsewhere}]"
        out.append({"target": name, "status": status, "value": value, "bound": bound, "detail": detail})

    _adaptive_checks(summary, med, add)
    _compile_checks(summary, med, add)
    if summary["varying"]:
        return out
    if summary["kind"] == "none":
        for mode in ("spatial", "full"):
            value = _ratio(med(mode), med("uniform"))
            add(f"{mode} no slower than uniform (none)", value, 1.03, lambda v: v <= 1.03,
                f"{mode}/uniform = {_fmt(value, 3)} (<= 1.03)")
        return out
    full, uniform = med("full"), med("uniform")
    value = _ratio(uniform, full)
    add("full >= 1.9x uniform", value, 1.9, lambda v: v >= 1.9,
        f"uniform {_fmt(uniform)} s / full {_fmt(full)} s = {_fmt(value, 2)}x (>= 1.9x)")
    best = summary["best_xdit"]
    value = _ratio(med(best), full) if best else None
    add("full >= 1.5x best xDiT", value, 1.5, lambda v: v >= 1.5,
        f"{arms[best]['label'] if best else 'no xDiT arm'} {_fmt(med(best))} s / full {_fmt(full)} s = "
        f"{_fmt(value, 2)}x (>= 1.5x)")
    spatial, single = arms.get("spatial", {}), med("single")
    details = spatial.get("stadi") or {}
    speeds = details.get("speeds")
    bound = share = None
    exchange, in_step = details.get("exchange_seconds") or 0.0, details.get("in_step_exchange_seconds") or 0.0
    if speeds and single:
        share = speeds[summary["fast_rank"]] / sum(speeds)
        bound = single * share + exchange + in_step
    value = _ratio(bound, spatial.get("median_seconds"))
    add("spatial >= 0.90 of ideal balance", value, 0.90, lambda v: v >= 0.90,
        f"bound {_fmt(bound)} s = single {_fmt(single)} s x v_fast/sum(v) {_fmt(share, 3)} + exchange "
        f"{_fmt(exchange)} s (transition+gather) + {_fmt(in_step)} s (K/V exchange inside steps, fast rank) "
        f"vs spatial {_fmt(spatial.get('median_seconds'))} s -> {_fmt(value, 3)} of the bound (>= 0.90)")
    return out


def _compile_checks(summary: dict, med, add) -> None:
    """Issue 24's targets for torch.compile: no graph compiled after the compile warmup, and under a steady
    imbalance the compiled STADI arm keeps eager STADI's ratio over uniform (>= 1.7x)."""
    arms = summary["arms"]
    for name, arm in arms.items():
        if arm.get("compile"):
            recompiles = arm["compile"]["recompiles"]
            add(f"{name}: nothing compiled in timed calls", recompiles, 0, lambda v: v == 0,
                f"{recompiles} graph(s) compiled after the compile warmup (0)")
    if summary["varying"] or summary["kind"] == "none" or "full+compile" not in arms or "uniform+compile" not in arms:
        return
    value = _ratio(med("uniform+compile"), med("full+compile"))
    add("full+compile >= 1.7x uniform+compile", value, 1.7, lambda v: v >= 1.7,
        f"uniform+compile {_fmt(med('uniform+compile'))} s / full+compile {_fmt(med('full+compile'))} s = "
        f"{_fmt(value, 2)}x (>= 1.7x)")


def _adaptive_checks(summary: dict, med, add) -> None:
    """Issue targets of --stadi_replan (arms full-calls / full-sync vs full, i.e. replan off)."""
    arms, off = summary["arms"], med("full")
    if "full-sync" not in arms and "full-calls" not in arms:
        return
    if summary["varying"]:
        before, after = summary["nominal_speeds_before"], summary["nominal_speeds_after"]
        appears = min(after) < min(before)
        bound = 1.3 if appears else 1.2
        what = "appears" if appears else "disappears"
        value = _ratio(off, med("full-sync"))
        add(f"load {what} mid-call: sync >= {bound}x off", value, bound, lambda v: v >= bound,
            f"full off {_fmt(off)} s / full sync {_fmt(med('full-sync'))} s = {_fmt(value, 2)}x (>= {bound}x)")
        return
    # No regression: at most 2 % slower than off (`calls` is meant to be faster from its second call on).
    for mode in ("calls", "sync"):
        value = _ratio(med(f"full-{mode}"), off)
        add(f"steady load: {mode} within 2% of off", value, 1.02, lambda v: v <= 1.02,
            f"full {mode} {_fmt(med(f'full-{mode}'))} s / full off {_fmt(off)} s = {_fmt(value, 3)} (<= 1.02)")
    if summary["kind"] == "none" and "full-sync" in arms:
        fired = sum(len(call) for call in ((arms["full-sync"].get("stadi") or {}).get("replans") or []))
        add("none: no re-plan fires (sync)", fired, 0, lambda v: v == 0,
            f"{fired} re-plan(s) over {len(arms['full-sync']['latencies'])} timed call(s) (0)")
    if summary["kind"] != "none" and "full-calls" in arms:
        value = _ratio(med("uniform"), med("full-calls"))
        add("steady load, 2nd+ calls: full calls >= 1.9x uniform", value, 1.9, lambda v: v >= 1.9,
            f"uniform {_fmt(med('uniform'))} s / full calls {_fmt(med('full-calls'))} s = {_fmt(value, 2)}x "
            f"(>= 1.9x; its first, cold call: {_fmt(arms['full-calls']['warmup_call_seconds'])} s)")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _mb(value) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------ tables


def _cache_line(arm: dict) -> str:
    cache = arm["cache"]
    served = ", ".join(f"{_fmt(s, 0)}/{_fmt(n, 0)}" for s, n in zip(cache["served_forwards"], cache["forwards"]))
    return (f"  {arm['label']}: forwards served by the step cache per rank {served}, "
            f"{_fmt(cache['speedup_vs_uncached'], 2)}x its uncached arm; 'vs unif' and 'vs single' against the cached arms")


def _compile_line(arm: dict) -> str:
    compiled = arm["compile"]
    return (f"  {arm['label']}: torch.compile warmup {_fmt(compiled['warmup_seconds'], 1)} s ({compiled['warmup_graphs']} "
            f"graphs), {compiled['recompiles']} graphs compiled in the timed calls, "
            f"{_fmt(compiled['speedup_vs_eager'], 2)}x its eager arm; 'vs unif' and 'vs single' against the compiled arms")


def format_table(summary: dict, settings: BenchSettings) -> str:
    p = settings.preset
    head = (f"scenario {summary['scenario']}: preset {p.name} {p.shape_label(settings.height)}, {settings.steps} steps "
            f"(warmup {settings.warmup}), {settings.world} ranks, median of {settings.repeats} run(s)")
    cols = (f"{'arm':<22}{'median s':>10}{'min-max s':>17}{'vs unif':>9}{'vs xDiT':>9}{'vs single':>10}"
            f"  {'busy % per rank':<16}{'PSNR dB':>8}{'SSIM':>7}{'pred s':>8}")
    lines = [head, cols, "-" * len(cols)]
    for name, arm in summary["arms"].items():
        if arm["status"] != "ok":
            lines.append(f"{arm['label']:<22}{arm['status'].upper() + ': ' + str(arm['reason'])}")
            continue
        busy = "/".join(f"{100 * b:.0f}" for b in arm["busy_fraction"] or [])
        quality = arm["quality"]
        stadi = arm["stadi"] or {}
        rng = f"{arm['min_seconds']:.3f}-{arm['max_seconds']:.3f}"
        lines.append(
            f"{arm['label']:<22}{arm['median_seconds']:>10.3f}{rng:>17}"
            f"{_fmt(arm['speedup_vs_uniform'], 2) + 'x':>9}{_fmt(arm['speedup_vs_best_xdit'], 2) + 'x':>9}"
            f"{_fmt(arm['speedup_vs_single'], 2) + 'x':>10}  {busy:<16}"
            f"{_fmt(quality.get('latent_psnr'), 1) if name != 'single' else 'ref':>8}"
            f"{_fmt(quality.get('latent_ssim'), 3) if name != 'single' else 'ref':>7}"
            f"{_fmt(stadi.get('predicted_seconds'), 2):>8}")
    for name, arm in summary["arms"].items():
        stadi = arm.get("stadi")
        if stadi:
            lines.append(f"  {arm['label']}: speeds {', '.join(f'{v:.4g}' for v in stadi['speeds'])} rows/s, "
                         f"rows {stadi['rows']} (warm-up {stadi['warmup_rows']}), strides {stadi['strides']}, "
                         f"evals {stadi['evals']}, exchange {_fmt(stadi['exchange_seconds'])} s "
                         f"+ {_fmt(stadi['in_step_exchange_seconds'])} s in steps, planner predicted "
                         f"{_fmt(stadi['predicted_seconds'])} s ({_pct(stadi.get('prediction_error'))} vs measured)")
            costs = stadi.get("costs")
            if costs:
                lines.append(f"    calibrated: fixed {', '.join(f'{1e3 * o:.1f}' for o in costs['step_overhead_seconds'])}"
                             f" ms/forward, row {', '.join(f'{1e3 * r:.2f}' for r in costs['row_seconds'])} ms, "
                             f"exchange {1e3 * costs['warmup_exchange_seconds']:.1f} ms/warm-up step, "
                             f"{1e3 * costs['exchange_seconds']:.1f} ms/sync point")
            if any(stadi.get("replans") or []):
                lines.append("    re-plans per timed call: " + "; ".join(
                    ", ".join(f"displaced step {r['offset']}: rows {r['old_rows']}->{r['new_rows']}, strides {r['old_strides']}"
                              f"->{r['new_strides']} (gain {100 * r['predicted_gain']:.0f}%, {r.get('reason', 'faster')})"
                              for r in call) or "none"
                    for call in stadi["replans"]))
            first = (stadi.get("exchange") or [{}])[0]
            lines.append(f"    K/V exchange {first.get('method')}, {first.get('layers')} layers in groups of "
                         f"{first.get('group_layers')}: collectives per sync point "
                         f"{stadi['collectives_per_sync_point']} (bound {stadi['collectives_bound']}), "
                         f"{_mb(first.get('bytes_received_per_sync_point'))} received per sync point; "
                         f"K/V store {'/'.join(_mb(b) for b in stadi['kv_store_bytes'])} per rank")
    lines.extend(_compile_line(arm) for arm in summary["arms"].values() if arm.get("compile"))
    lines.extend(_cache_line(arm) for arm in summary["arms"].values() if arm.get("cache"))
    for arm in summary["arms"].values():
        if arm.get("per_call"):
            lines.append(f"  {arm['label']}, every call (cost model per rank: fixed ms + ms/row, noise, samples):")
            lines.extend(f"    call {c['call']!s:>4}: {c['latency']:7.3f} s  rows {c['rows']} strides {c['strides']} "
                         f"(warm-up {c['warmup_rows']})  "
                         + ", ".join(f"{o:.2f}+{r:.3f}/row ±{100 * (n or 0):.0f}% n={w or 0:.0f}"
                                     for o, r, n, w in zip(c["fixed_ms"], c["row_ms"], c["noise"] or [],
                                                           c["samples"] or []))
                         + (f"  [{c['settled'].get('plan', '')}]" if c["settled"] else "")
                         for c in arm["per_call"])
    firsts = [f"{a['label']} {_fmt(a['warmup_call_seconds'])} s" for a in summary["arms"].values()
              if a.get("warmup_call_seconds") is not None]
    if firsts:
        lines.append("  first (untimed, cold) call: " + ", ".join(firsts))
    references = [f"{a['label']} {_fmt(a['reference_call_seconds'])} s" for a in summary["arms"].values()
                  if a.get("reference_call_seconds") is not None]
    if references:
        lines.append("  second (untimed) call, under the initial load throughout; F x it times the switch: "
                     + ", ".join(references))
    switches = summary.get("load_switches") or []
    if switches:
        flat = [t for call in switches for t in call]
        lines.append(f"  load switched {min(flat):.2f}-{max(flat):.2f} s after the barrier release ({len(flat)} switches)")
    peaks = [(arm["label"], arm.get("peak_memory_bytes")) for arm in summary["arms"].values()
             if arm.get("peak_memory_bytes")]
    if peaks:
        lines.append("  peak memory per rank (RSS on CPU, allocator on CUDA): " + "; ".join(
            f"{label} {'/'.join(_mb(b) for b in values)}" for label, values in peaks))
    if any(a.get("quality", {}).get("image_psnr") is not None for a in summary["arms"].values()):
        lines.append("  decoded image PSNR/SSIM vs single rank: " + ", ".join(
            f"{a['label']} {_fmt(a['quality']['image_psnr'], 1)} dB/{_fmt(a['quality']['image_ssim'], 3)}"
            for a in summary["arms"].values() if a.get("quality", {}).get("image_psnr") is not None))
    return "\n".join(lines)


def format_checks(results: list[dict]) -> str:
    setup = ", ".join(f"{key} {value}" for key, value in TARGET_SETUP.items())
    lines = [f"targets (set for {setup}, one rank slowed 2:1; INFO: another setup, no verdict):"]
    return "\n".join(lines + [f"{c['status']:<5} {c['target']}: {c['detail']}" for c in results])
