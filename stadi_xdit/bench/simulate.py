"""Cluster what-if: predicted ``uniform`` / ``spatial`` / ``full`` latency from the planner's cost model.

Model (the planner's, ``stadi_xdit.planner.predict_latency``): a step of rank i costs
``rows_i * row_seconds / speed_i``; warm-up steps run in lock-step; after warm-up each sync
period lasts as long as its slowest rank (plus ``exchange_seconds`` when K/V exchange is exposed).

Calibration of ``row_seconds`` (seconds per token row per denoising step on the fastest rank):

A "row" is the preset's band unit (``BenchPreset.band_units``): a token row of an image, or of a Wan
clip (its frames' rows one after the other); the planner is the same for both (align 1).

* ``--row-seconds``: measured by you, e.g. a single-GPU step time / rows;
* otherwise from FLOPs: ``BenchPreset.forward_flops`` per row at the target size, divided by the
  fastest card's datasheet dense TFLOPS (``planner.gpus``) x an assumed model FLOPs utilisation
  (``--mfu``). One forward of the preset is measured on this machine at a small size and scaled to
  the target size by the same FLOP count, which reports this machine's achieved FLOP rate and
  checks the FLOP model's size scaling (two sizes measured) before it is trusted for GPUs (PixArt
  presets; with --gpus the others skip it: real-size Flux and Wan do not fit a CPU forward).

Memory with ``--gpus``: the weights (parameters from a meta-device construction) plus the K/V store
per rank against each card's memory; a lower bound (activations come on top).
"""

from __future__ import annotations

import math
import time

from stadi_xdit.bench.presets import BenchPreset
from stadi_xdit.planner import plan
from stadi_xdit.planner.gpus import DENSE_TENSOR_TFLOPS, default_link, parse_gpu_list, relative_speeds

MODES = ("uniform", "spatial", "full")
# Memory of the cards in planner.gpus, GiB (datasheets; the larger SKU where there are two: A100 80 GB,
# V100 32 GB).
GPU_MEMORY_GIB: dict[str, float] = {"H200": 141, "H100": 80, "L40S": 48, "A100": 80, "RTX4090": 24, "A10": 24,
                                    "V100": 32, "L4": 24, "RTX3090": 24, "T4": 16}


def predict_modes(relative: tuple[float, ...], *, rows: int, steps: int, warmup: int, row_seconds: float,
                  max_stride: int = 2, exchange_seconds: float = 0.0,
                  warmup_speeds_known: bool = False, align: int = 1) -> dict:
    """Seconds per image of each mode and of the fastest rank alone, for speeds relative to the fastest (bands
    aligned to `align` rows: a group of Ulysses ranks splits its band evenly)."""
    speeds = [v / row_seconds for v in relative]  # token rows per second
    out = {"single": steps * rows / max(speeds)}
    plans = {}
    for mode in MODES:
        plans[mode] = plan(speeds, rows=rows, align=align, num_steps=steps, warmup_steps=warmup, mode=mode,
                           max_stride=max_stride, exchange_seconds=exchange_seconds,
                           warmup_speeds_known=warmup_speeds_known and mode != "uniform")
        out[mode] = plans[mode].predicted.total_seconds
    return {"seconds": out, "plans": plans}


def kv_store_bytes(preset: BenchPreset, height: int, compute_bytes: int, ranks: int,
                   stale_bytes: int | None = None, cpu: bool = False, batch: int | None = None) -> dict:
    """What STADI's K/V store holds per rank, and moves per sync point, for ``preset`` at ``height``.

    Every rank keeps every displaced layer's K/V for the *whole* image (own band fresh, the rest
    stale) in one flat buffer of the stale dtype, plus one layer's full-image staging buffer in the
    compute dtype (synchronous steps) and, on CPU or with a narrower stale dtype, one layer's
    attention buffer. Per sync point a rank receives the other bands of every layer: ``(N - 1) / N``
    of the buffer with equal bands. ``batch``: samples per forward (default the CFG batch; 1 with
    ``--use_cfg_parallel``, one branch per rank).
    """
    stale_bytes = stale_bytes or compute_bytes
    flat = preset.kv_bytes(height, stale_bytes, batch=batch)
    layer = preset.kv_bytes(height, compute_bytes, batch=batch) / preset.layers
    staging = layer * (2 if cpu or stale_bytes != compute_bytes else 1)
    return {"flat_buffer_bytes": flat, "staging_bytes": staging, "store_bytes": flat + staging,
            "received_per_sync_point_bytes": flat * (ranks - 1) / ranks, "stale_bytes_per_value": stale_bytes,
            "compute_bytes_per_value": compute_bytes}


def gpu_memory_fit(names: tuple[str, ...], preset: BenchPreset, compute_bytes: int, memory: dict,
                   divisors: list[int] | None = None) -> dict:
    """Per card type: weights + K/V store per rank (each form in ``memory``) against the card's memory.
    ``divisors``: per rank, what its store is divided by (the Ulysses degree of its group: its head shard);
    a card type's need is that of its rank with the largest store."""
    from stadi_xdit.bench.presets import construct_on_meta

    weights = construct_on_meta(preset) * compute_bytes
    divisors = divisors or [1] * len(names)
    cards = {}
    for name in dict.fromkeys(names):
        capacity = GPU_MEMORY_GIB[name] * 2**30
        divisor = min(d for rank_name, d in zip(names, divisors) if rank_name == name)
        needs = {label: weights + m["store_bytes"] / divisor for label, m in memory.items()}
        cards[name] = {"memory_bytes": capacity, "needs_bytes": needs,
                       "fits": {label: need <= capacity for label, need in needs.items()}}
    return {"weights_bytes": weights, "bytes_per_value": compute_bytes, "cards": cards,
            "refusal": "StadiWanPipeline" if preset.video else None}


def format_memory_fit(fit: dict) -> list[str]:
    lines = [(f"memory per rank, lower bound (weights {fit['weights_bytes'] / 2**30:.1f} GiB at "
              f"{fit['bytes_per_value']} B/parameter + the K/V store; activations come on top):")]
    short = []
    for name, card in fit["cards"].items():
        forms = "; ".join(f"{label} {need / 2**30:.1f} GiB {'fits' if card['fits'][label] else 'does NOT fit'}"
                          for label, need in card["needs_bytes"].items())
        lines.append(f"  {name} ({card['memory_bytes'] / 2**30:.0f} GiB): {forms}")
        if not any(card["fits"].values()):
            alone = fit["weights_bytes"] > card["memory_bytes"]
            short.append(f"{name} ({'the weights alone' if alone else 'with the store'})")
    if short:
        refusal = (f"; {fit['refusal']} refuses such a run before denoising, in one line naming the store and the "
                   "remedies (--use_cfg_parallel, --stadi_kv_dtype, fewer --num_frames, a smaller size, --stadi_exact)"
                   if fit["refusal"] else "")
        lines.append(f"  -> too large for {', '.join(short)}: the latencies below assume it ran anyway{refusal}")
    return lines


def measure_forwards(preset: BenchPreset, heights: list[int], seed: int = 0, repeats: int = 2) -> list[float]:
    """Best-of seconds of one transformer forward (CFG batch of 2) of ``preset`` at each height, here."""
    import torch

    from stadi_xdit.bench.presets import build_pipeline
    from stadi_xdit.families.components import random_prompt_embeds

    if not preset.shape.calibrates:
        raise ValueError("forward calibration is implemented for PixArt presets; pass --row-seconds")
    transformer = build_pipeline(preset, seed=seed).transformer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, like one bench rank
    embeds = random_prompt_embeds(preset.text_channels, seq_len=preset.text_tokens, batch=2, seed=seed)
    out = []
    for height in heights:
        latent = torch.randn(2, transformer.config.in_channels, height // 8, height // 8)
        cond = {"resolution": None, "aspect_ratio": None}
        if transformer.config.use_additional_conditions:
            cond = {"resolution": torch.tensor([[float(height), float(height)]] * 2),
                    "aspect_ratio": torch.tensor([[1.0]] * 2)}
        best = float("inf")
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first call pays one-time costs
                start = time.perf_counter()
                transformer(latent, encoder_hidden_states=embeds, timestep=torch.tensor([500, 500]),
                            added_cond_kwargs=cond, return_dict=False)
                best = min(best, time.perf_counter() - start)
        out.append(best)
    torch.set_num_threads(threads)
    return out


def calibrate_cpu(preset: BenchPreset, target_height: int, small_height: int) -> dict:
    """This machine's seconds per token row at ``target_height``, scaled from a measured small forward."""
    half = max(32, (small_height // 2) // 16 * 16)
    t_half, t_small = measure_forwards(preset, [half, small_height])
    f_small, f_half = preset.forward_flops(small_height), preset.forward_flops(half)
    target_rows = preset.band_units(target_height)
    seconds_target = t_small * preset.forward_flops(target_height) / f_small
    return {
        "small_height": small_height,
        "small_forward_seconds": t_small,
        "achieved_gflops": f_small / t_small / 1e9,
        "scaling_check": {"heights": [half, small_height], "measured_ratio": t_small / t_half,
                          "flop_ratio": f_small / f_half},
        "cpu_step_seconds_at_target": seconds_target,
        "cpu_row_seconds_at_target": seconds_target / target_rows,
    }


def what_if(gpus: str | None, speeds: tuple[float, ...] | None, preset: BenchPreset, *, height: int, steps: int,
            warmup: int, row_seconds: float | None, mfu: float, link_gbps: float | None, max_stride: int,
            calibrate_height: int, measure: bool = True, group_sizes: tuple[int, ...] | None = None) -> dict:
    """Everything ``stadi-bench --simulate`` prints, as data (with ``group_sizes``, also STADI over groups of
    that many consecutive ranks each, Ulysses inside, `grouped_what_if`)."""
    rows = preset.band_units(height)
    if gpus:
        names = parse_gpu_list(gpus)
        relative = relative_speeds(names)
    else:
        names = tuple(f"rank{i}" for i in range(len(speeds)))
        fastest = max(speeds)
        relative = tuple(v / fastest for v in speeds)
    measure = measure and row_seconds is None and preset.shape.calibrates
    calibration = calibrate_cpu(preset, height, calibrate_height) if measure else None
    flops_per_row = preset.forward_flops(height) / rows
    if row_seconds is not None:
        source = "given (--row-seconds)"
    elif gpus:
        fastest = max(DENSE_TENSOR_TFLOPS[n] for n in names)
        row_seconds = flops_per_row / (fastest * 1e12 * mfu)
        source = f"FLOPs {flops_per_row / 1e9:.1f} GFLOP/{preset.band_unit} / ({fastest:g} TFLOPS x MFU {mfu:g})"
    elif calibration is not None:
        row_seconds = calibration["cpu_row_seconds_at_target"]
        source = "this machine's measured forward, scaled by FLOPs"
    else:
        raise ValueError("--simulate needs --row-seconds, --gpus or a measurement")
    exchange = 0.0
    bytes_per_value = 2 if gpus else 4
    cpu = not gpus
    memory = {"as computed": kv_store_bytes(preset, height, bytes_per_value, len(relative), cpu=cpu)}
    if bytes_per_value == 4:
        memory["--stadi_kv_dtype bfloat16"] = kv_store_bytes(preset, height, 4, len(relative), stale_bytes=2, cpu=cpu)
    if preset.cfg_batch > 1:
        memory["--use_cfg_parallel"] = kv_store_bytes(preset, height, bytes_per_value, len(relative), cpu=cpu, batch=1)
    fit = gpu_memory_fit(names, preset, bytes_per_value, memory) if gpus else None
    if link_gbps:
        link = f"{link_gbps:g} GB/s (given, --link-gbps)"
    else:  # a stated default, never "free": Flux-dev 1024 on 8 ranks receives GiBs per sync point
        link_gbps, link = default_link(names if gpus else None)
        link += "; --link-gbps to set"
    exchange = preset.kv_bytes(height, bytes_per_value) * (len(relative) - 1) / len(relative) / (link_gbps * 1e9)
    predicted = predict_modes(relative, rows=rows, steps=steps, warmup=warmup, row_seconds=row_seconds,
                              max_stride=max_stride, exchange_seconds=exchange)
    grouped = None
    if group_sizes is not None and max(group_sizes) > 1:
        grouped = grouped_what_if(names, relative, preset, height, group_sizes=group_sizes, row_seconds=row_seconds,
                                  steps=steps, warmup=warmup, max_stride=max_stride, bytes_per_value=bytes_per_value,
                                  network_gbps=link_gbps, memory=memory, hardware=bool(gpus))
    return {"ulysses_groups": grouped,
            "ranks": list(names), "relative_speeds": list(relative), "rows": rows, "band_unit": preset.band_unit,
            "shape": preset.shape_label(height), "steps": steps, "warmup": warmup,
            "row_seconds": row_seconds, "row_seconds_source": source, "exchange_seconds": exchange,
            "link_gbytes_per_s": link_gbps, "link": link,
            "calibration": calibration, "seconds": predicted["seconds"], "kv_store": memory, "memory_fit": fit,
            "plans": {m: p.to_json() for m, p in predicted["plans"].items()},
            "explain": {m: p.explain() for m, p in predicted["plans"].items()}}


def grouped_what_if(names: tuple[str, ...], relative: tuple[float, ...], preset: BenchPreset, height: int, *,
                    group_sizes: tuple[int, ...], row_seconds: float, steps: int, warmup: int, max_stride: int,
                    bytes_per_value: int, network_gbps: float, memory: dict, hardware: bool) -> dict:
    """STADI over groups of consecutive ranks, ``group_sizes`` in rank order (issue 23: ``--ulysses_degree U``,
    equal, or ``--stadi_groups``, nodes of different sizes), next to xDiT's Ulysses over every rank.

    A group of U splits its band evenly over its ranks and runs at its slowest member's pace; each forward adds
    Ulysses' all-to-alls (Q, K, V and the output: twice the K/V bytes of the band; a rank sends (U - 1) / U of
    its part) over the group's link: NVLink or PCIe of its card type, the network for mixed cards or bare
    speeds. Bands come in whole units of lcm(sizes) rows. Groups are nodes joined by ``network_gbps``; a node's
    link carries its U ranks' head shards, so the exchange per sync point moves the flat store's bytes per node
    (the flat form's model gives each rank a link of its own), and a rank's store is the flat one / U. xDiT's
    Ulysses over all N ranks: an even split at the slowest card's pace, its all-to-all crossing nodes over the
    network, the node whose ranks send the most across it (U (N - U) / N^2 of the bytes) setting the pace.
    """
    count = len(names)
    if not group_sizes or min(group_sizes) < 1 or sum(group_sizes) != count:
        raise ValueError(f"group sizes {list(group_sizes)} do not add up to the {count} ranks")
    rows = preset.band_units(height)
    align = math.lcm(*group_sizes)
    # The plan is in whole units of `align` rows, as the launch plans it (`BandGeometry.of_rows`); the last group
    # also computes the rows past the last whole unit, which the prediction leaves out.
    planned_rows = rows - rows % align
    kv_per_row = preset.kv_bytes(height, bytes_per_value) / rows  # K and V of one band unit, every layer
    starts = [sum(group_sizes[:m]) for m in range(len(group_sizes))]
    groups = [tuple(range(start, start + size)) for start, size in zip(starts, group_sizes)]
    members, row_costs = [], []
    for group in groups:
        size, cards = len(group), tuple(names[rank] for rank in group)
        link_gbps, link = default_link(cards if hardware else None)
        compute = row_seconds / min(relative[rank] for rank in group) / size
        all_to_all = 2 * kv_per_row * (size - 1) / size**2 / (link_gbps * 1e9)
        row_costs.append(compute + all_to_all)
        members.append({"ranks": list(group), "cards": list(cards), "link": link,
                        "row_seconds": compute + all_to_all, "all_to_all_row_seconds": all_to_all})
    fastest = min(row_costs)
    group_relative = tuple(fastest / cost for cost in row_costs)
    exchange = preset.kv_bytes(height, bytes_per_value) * (len(groups) - 1) / len(groups) / (network_gbps * 1e9)
    predicted = predict_modes(group_relative, rows=planned_rows, steps=steps, warmup=warmup, row_seconds=fastest,
                              max_stride=max_stride, exchange_seconds=exchange, align=align)
    crossing = (max(size * (count - size) for size in group_sizes) / count**2 if len(groups) > 1
                else (count - 1) / count**2)
    all_link = network_gbps if len(groups) > 1 else default_link(names if hardware else None)[0]
    xdit_ulysses = steps * rows * (row_seconds / min(relative) / count
                                   + 2 * kv_per_row * crossing / (all_link * 1e9))
    # Per group size, what each of its ranks holds and receives; the memory fit takes each card's largest.
    sharded = {size: {label: {**form, "store_bytes": form["store_bytes"] / size,
                              "received_per_sync_point_bytes": form["flat_buffer_bytes"] / size
                              * (len(groups) - 1) / len(groups)}
                      for label, form in memory.items()}
               for size in sorted(set(group_sizes))}
    rank_sizes = [len(group) for group in groups for _ in group]
    fit = gpu_memory_fit(names, preset, bytes_per_value, memory, divisors=rank_sizes) if hardware else None
    return {"group_sizes": list(group_sizes), "align": align, "groups": members,
            "relative_speeds": list(group_relative), "rows": rows, "planned_rows": planned_rows,
            "exchange_seconds": exchange, "seconds": predicted["seconds"], "xdit_ulysses_seconds": xdit_ulysses,
            "kv_store": {str(size): forms for size, forms in sharded.items()}, "memory_fit": fit,
            "plan": predicted["plans"]["full"].to_json(), "explain": predicted["plans"]["full"].explain()}


def groups_label(sizes: list[int]) -> tuple[str, str]:
    """How the output names groups of these sizes, and the launch flag that runs them."""
    if len(set(sizes)) == 1:
        return f"groups of Ulysses-{sizes[0]}", f"--ulysses_degree {sizes[0]}"
    shown = ",".join(map(str, sizes))
    return f"groups of Ulysses-{shown}", f"--stadi_groups {shown}"


def format_grouped(grouped: dict, flat_seconds: dict) -> list[str]:
    sizes = grouped["group_sizes"]
    label, flag = groups_label(sizes)
    lines = [f"STADI over {label} (simulated; launched with stadi-xdit {flag}):"]
    for index, (group, speed) in enumerate(zip(grouped["groups"], grouped["relative_speeds"])):
        lines.append(f"  group {index}: {', '.join(group['cards'])}; relative speed {speed:.3f}; all-to-all "
                     f"{group['all_to_all_row_seconds'] * 1e3:.3g} ms per row per step over {group['link']}")
    lines.append(f"  K/V exchange per sync: {grouped['exchange_seconds'] * 1e3:.3g} ms (a node's link carries its "
                 "ranks' head shards)")
    for size, forms in grouped["kv_store"].items():
        for form_label, form in forms.items():
            lines.append(f"  K/V store per rank of a group of {size} ({form_label}): {form['store_bytes'] / 2**30:.3f} "
                         f"GiB (the flat store / {size}); receives {form['received_per_sync_point_bytes'] / 2**30:.3f} "
                         "GiB per sync point")
    if grouped["memory_fit"]:
        lines.extend("  " + line for line in format_memory_fit(grouped["memory_fit"]))
    seconds = grouped["seconds"]
    count = sum(len(group["ranks"]) for group in grouped["groups"])
    arms = [(f"xDiT Ulysses-{count} (every rank)", grouped["xdit_ulysses_seconds"]),
            *((f"STADI {mode} over {label}", seconds[mode]) for mode in MODES),
            ("flat STADI full (above)", flat_seconds["full"])]
    width = max(len(arm) for arm, _ in arms) + 2
    lines.append(f"  {'arm':<{width}}{'predicted s':>12}{'vs xDiT Ulysses':>17}")
    for arm, value in arms:
        lines.append(f"  {arm:<{width}}{value:>12.3f}{grouped['xdit_ulysses_seconds'] / value:>16.2f}x")
    lines.extend("  " + line for line in grouped["explain"].splitlines())
    if grouped["planned_rows"] != grouped["rows"]:
        extra, align = grouped["rows"] - grouped["planned_rows"], grouped["align"]
        lines.append(f"  ({grouped['rows']} rows are not a multiple of {align}: planned in {align}-row units "
                     f"on {grouped['planned_rows']}; the last group also computes the {extra} row{'s' * (extra > 1)} past them, as the "
                     "launch does, which the prediction leaves out)")
    return lines


def format_what_if(result: dict, preset: BenchPreset, height: int) -> str:
    seconds = result["seconds"]
    unit = preset.band_unit
    lines = [(f"what-if: {', '.join(result['ranks'])} | preset {preset.name} {preset.shape_label(height)}, "
              f"{result['rows']} {unit}s, {result['steps']} steps (warmup {result['warmup']})"),
             (f"row cost on the fastest rank: {result['row_seconds'] * 1e3:.4g} ms per {unit} per step "
              f"({result['row_seconds_source']})"),
             f"K/V exchange per sync: {result['exchange_seconds'] * 1e3:.3g} ms over {result['link']}"]
    for label, memory in result.get("kv_store", {}).items():
        lines.append(f"K/V store per rank ({label}, {preset.layers} layers, {memory['stale_bytes_per_value']}-byte "
                     f"values): {memory['store_bytes'] / 2**30:.3f} GiB = flat buffer "
                     f"{memory['flat_buffer_bytes'] / 2**30:.3f} GiB + one-layer buffers "
                     f"{memory['staging_bytes'] / 2**20:.1f} MiB; receives "
                     f"{memory['received_per_sync_point_bytes'] / 2**30:.3f} GiB per sync point")
    fit = result.get("memory_fit")
    if fit:
        lines.extend(format_memory_fit(fit))
    if not preset.shape.calibrates:
        lines.append(f"this machine: no calibration forward ({preset.family} presets skip it; the row cost is the FLOP "
                     "model's or --row-seconds)")
    cal = result.get("calibration")
    if cal:
        check = cal["scaling_check"]
        lines.append(f"this machine: one forward at {cal['small_height']}px = {cal['small_forward_seconds']:.3f} s "
                     f"({cal['achieved_gflops']:.1f} GFLOP/s); {check['heights'][0]}->{check['heights'][1]}px "
                     f"time ratio {check['measured_ratio']:.2f} vs FLOP ratio {check['flop_ratio']:.2f}; "
                     f"scaled to {height}px: {cal['cpu_step_seconds_at_target']:.2f} s/step on one core")
    lines.append(f"{'mode':<10}{'predicted s':>12}{'vs uniform':>12}{'vs fastest alone':>18}")
    for mode in ("single", *MODES):
        lines.append(f"{mode:<10}{seconds[mode]:>12.3f}{seconds['uniform'] / seconds[mode]:>11.2f}x"
                     f"{seconds['single'] / seconds[mode]:>17.2f}x")
    lines.append(result["explain"]["full"])
    if result.get("ulysses_groups"):
        lines.extend(format_grouped(result["ulysses_groups"], seconds))
    return "\n".join(lines)


def compare_with_measured(summary: dict, settings, relative: tuple[float, ...]) -> dict | None:
    """Simulator prediction for a measured scenario: row cost from the single-rank arm, nominal speeds."""
    single = summary["arms"].get("single", {}).get("median_seconds")
    if not single:
        return None
    rows = settings.preset.band_units(settings.height)
    row_seconds = single / (settings.steps * rows)
    predicted = predict_modes(relative, rows=rows, steps=settings.steps, warmup=settings.warmup,
                              row_seconds=row_seconds, max_stride=settings.max_stride,
                              warmup_speeds_known=settings.profile_cache)["seconds"]
    measured = {m: summary["arms"].get(m, {}).get("median_seconds") for m in MODES}
    return {"row_seconds": row_seconds, "relative_speeds": list(relative),
            "predicted": {m: predicted[m] for m in MODES}, "measured": measured}


def format_comparison(comparison: dict) -> str:
    parts = []
    for mode in MODES:
        measured = comparison["measured"][mode]
        predicted = comparison["predicted"][mode]
        if measured:
            parts.append(f"{mode} {predicted:.3f}/{measured:.3f} s ({measured / predicted - 1:+.0%})")
    speeds = ", ".join(f"{v:.3g}" for v in comparison["relative_speeds"])
    return (f"  simulator (row cost from single rank, nominal speeds {speeds}) predicted/measured: "
            + "; ".join(parts))
