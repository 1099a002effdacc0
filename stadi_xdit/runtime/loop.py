"""The STADI denoising loop: warmup -> profile -> plan -> layout -> periods -> gather.

Model-specific work (CFG, learned sigma, packing, RoPE ids) lives behind `BandModel`; this file
only decides which band each rank holds, which timesteps it visits and when K/V are exchanged.

Calibration (when speeds are measured): warmup times every forward. With at least 3 warmup steps
in `spatial`/`full` mode, the first timed step (step 1, on the initial bands) gives provisional
speeds; the remaining warmup steps run on the spatial bands of those speeds. Each rank thus times
two band sizes, and a line through them (`profile.fit_step_cost`) splits its forward into a fixed
cost and a cost per token row. The planner gets the per-row speeds, the fixed costs
(`step_overhead_seconds`, per rank) and the exchange measured in warmup (`warmup_exchange_seconds`
per warmup step; `exchange_seconds` per sync period of the displaced phase).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from stadi_xdit.config import StadiConfig
from stadi_xdit.planner import Plan, plan, plan_warmup
from stadi_xdit.runtime.adaptive import ScheduleSnapshot, SyncReplanner
from stadi_xdit.runtime.comm import synchronize
from stadi_xdit.runtime.groups import StadiGroups
from stadi_xdit.runtime.kv import DisplacedKVStore, kv_storage_dtype
from stadi_xdit.runtime.layout import BandGeometry, BandLayout, slice_band
from stadi_xdit.runtime.profile import (
    RankTimeline,
    StepCost,
    StepRecord,
    complete_step_costs,
    emulate_slowdown,
    fit_step_cost,
    last_size_seconds,
    timed_warmup,
    work_clock,
)
from stadi_xdit.runtime.schedule import map_history, rank_schedule_indices


class BandModel(Protocol):
    """What the loop needs from a model family."""

    band_dim: int  # dimension of the latent tensor along which bands lie

    def band_sizes(self, layout: BandLayout) -> list[int]:
        """Extent of each rank's band along `band_dim`."""

    def set_band(self, layout: BandLayout, rank: int) -> None:
        """`layout` is now current; this rank holds band `rank` (its global token range is explicit)."""

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Model output for this rank's band (guidance applied), ready for `scheduler.step`."""


@dataclass
class DenoiseResult:
    latents: torch.Tensor  # full latent, on every rank
    warmup_plan: Plan
    plan: Plan
    measured_speeds: list[float] | None  # rows/s per rank, None when speeds were given
    num_evals: int  # model evaluations by this rank
    timeline: RankTimeline = field(repr=False)
    # The calibrated cost terms the plan used (None: speeds were given, nothing was measured).
    costs: dict | None = None
    # The K/V store's account of the run: exchange method, collectives per sync point, bytes.
    exchange: dict = field(default_factory=dict)
    # --stadi_replan sync: one entry per mid-run re-plan (base step, old/new speeds, rows, strides, gain).
    replans: list[dict] = field(default_factory=list)


# Fewer warmup steps leave one timed band size: the fixed cost per forward cannot be separated.
CALIBRATION_WARMUP_STEPS = 3


def _pair_max(groups: StadiGroups, values: list[float], device: torch.device) -> list[float]:
    """With CFG parallelism, the larger of each pair's values (both branches must plan alike)."""
    if groups.cfg.world_size == 1:
        return values
    both = groups.cfg.all_gather(torch.tensor([values], dtype=torch.float64, device=device), [1, 1], dim=0)
    return torch.maximum(both[0], both[1]).tolist()


def denoise(
    latents: torch.Tensor,
    scheduler,
    model: BandModel,
    *,
    groups: StadiGroups,
    store: DisplacedKVStore,
    config: StadiConfig,
    geometry: BandGeometry,
    warmup_steps: int,
    known_speeds: Sequence[float] | None = None,
) -> DenoiseResult:
    """Run every denoising step of `scheduler` (already set up for the full run) on this rank's bands.

    `geometry` turns plans into band layouts; each new layout goes to the K/V store and to the
    model (`model.set_band`). `known_speeds` (user-given or cached) make warmup already elastic.
    """
    comm = groups.band
    rank, world = comm.rank, comm.world_size
    rows, align = geometry.rows, geometry.align
    num_steps = len(scheduler.timesteps)
    timeline = RankTimeline()
    clock = work_clock(latents.device)
    # Stale K/V only exist outside exact mode; there they may be stored narrower (--stadi_kv_dtype).
    store.configure(kv_dtype=None if config.exact else kv_storage_dtype(config.kv_dtype))

    def forward_and_step(band: torch.Tensor, schedule_index: int, phase: str, base_step: int) -> torch.Tensor:
        t = scheduler.timesteps[schedule_index]
        comm.enter(phase, base_step)
        waited_before = comm.wait_seconds
        start, work_start = timeline.now(), clock()
        output = model.predict(band, t)
        synchronize(output)  # on CUDA, time the kernels rather than their launch
        wait = comm.wait_seconds - waited_before
        # CUDA's clock is wall time, which includes the waits; the CPU clock never does.
        work = clock() - work_start - (wait if latents.is_cuda else 0.0)
        # Base steps of the full grid: the emulated load may change at one (--stadi_emulate_shift).
        slowdown = config.emulated_factor(rank, base_step if phase == "warmup" else warmup_steps + base_step)
        emulated = emulate_slowdown(slowdown, work) if slowdown != 1.0 else 0.0
        band_rows = layout.token_rows[rank][1] - layout.token_rows[rank][0]
        timeline.steps.append(StepRecord(phase, base_step, start, timeline.now(), wait, emulated, band_rows))
        return scheduler.step(output, t, band, return_dict=False)[0]

    def install(layout: BandLayout) -> None:
        store.set_layout(layout.token_counts(), layout.token_range(rank))
        model.set_band(layout, rank)

    def reband(band: torch.Tensor, old: BandLayout, new: BandLayout) -> torch.Tensor:
        """Gather the full latent and scheduler history on the old bands, re-slice for the new ones."""
        old_sizes, new_sizes = model.band_sizes(old), model.band_sizes(new)
        full = comm.all_gather(band, old_sizes, model.band_dim)

        def history(tensor: torch.Tensor) -> torch.Tensor:
            gathered = comm.all_gather(tensor.contiguous(), old_sizes, model.band_dim)
            return slice_band(gathered, new_sizes, rank, model.band_dim)

        map_history(scheduler, history)
        return slice_band(full, new_sizes, rank, model.band_dim)

    # 1. Warmup: synchronous, exact steps that also time each rank.
    warm = plan_warmup(world, rows=rows, align=align, num_steps=num_steps, warmup_steps=warmup_steps,
                       speeds=known_speeds)
    layout = geometry.layout(warm)
    install(layout)
    band = slice_band(latents, model.band_sizes(layout), rank, model.band_dim)
    speeds = list(config.speeds) if config.speeds else None
    calibrate = (speeds is None and world > 1 and config.mode != "uniform"
                 and warmup_steps >= CALIBRATION_WARMUP_STEPS)
    warmup_rows = []  # token rows per rank of each warmup step
    for i in range(warmup_steps):
        # The last warmup step's K/V seed the displaced phase (exact mode never needs them).
        store.set_phase(synchronous=True, publish=i == warmup_steps - 1 and not config.exact)
        warmup_rows.append([end - start for start, end in layout.token_rows])
        band = forward_and_step(band, i, "warmup", i)
        if calibrate and i == 1:
            # A second band size for the fit: the spatial bands of step 1's provisional speeds.
            comm.enter("profile", i)
            record = timeline.steps[-1]
            seconds = comm.all_gather_floats(record.compute, band.device)
            provisional = groups.shared_speeds([n / s for n, s in zip(warmup_rows[-1], seconds)], band.device)
            second = geometry.layout(plan_warmup(world, rows=rows, align=align, num_steps=num_steps,
                                                 warmup_steps=warmup_steps, speeds=provisional))
            if second.token_rows != layout.token_rows:
                band = reband(band, layout, second)
                layout = second
                install(layout)

    # 2. Profile: every rank derives the same speeds and costs, hence the same plan, with no broadcast.
    measured, costs, cost_terms = None, None, {}
    if speeds is None:
        comm.enter("profile")
        fit = fit_step_cost(timeline.steps)
        waits = [r.wait for r in timed_warmup(timeline.steps)]  # as many on every rank
        last_rows, last_seconds = last_size_seconds(timeline.steps)
        per_rank = comm.all_gather_float_lists([fit.fixed_seconds, fit.row_seconds, float(fit.fitted),
                                                last_rows, last_seconds, *waits], band.device)
        fits = complete_step_costs([StepCost(r[0], r[1], (), bool(r[2])) for r in per_rank],
                                   [(int(r[3]), r[4]) for r in per_rank], max_fixed_rows=rows)
        measured = [fit.speed for fit in fits]
        speeds = groups.shared_speeds(measured, band.device)
        fixed = _pair_max(groups, [fit.fixed_seconds for fit in fits], band.device)
        # The rank that arrives last at a synchronous gather waits for the transfer alone; the others
        # also wait for it. So per step the smallest wait over ranks, and of those the smallest.
        warmup_exchange = min(min(step) for step in zip(*(r[5:] for r in per_rank)))
        # Both CFG branches must plan alike: each group measured its own exchange.
        warmup_exchange = _pair_max(groups, [warmup_exchange], band.device)[0]
        cost_terms = {"step_overhead_seconds": fixed, "warmup_exchange_seconds": warmup_exchange,
                      "exchange_seconds": warmup_exchange * store.stale_bytes_ratio()}
        costs = {**cost_terms, "row_seconds": [1.0 / v for v in speeds],
                 "fitted": [bool(r[2]) for r in per_rank], "warmup_rows": warmup_rows}
    final = plan(speeds, rows=rows, align=align, num_steps=num_steps, warmup_steps=warmup_steps,
                 mode=config.mode, max_stride=config.effective_max_stride, tolerance=config.tolerance,
                 warmup_speeds_known=known_speeds is not None, **cost_terms)

    # 3. Transition: gather the full latent and scheduler history once, re-slice for the new bands.
    t0 = timeline.now()
    comm.enter("transition", warmup_steps)
    new_layout = geometry.layout(final)
    if new_layout.token_rows != layout.token_rows:  # every rank plans alike, so all skip alike
        band = reband(band, layout, new_layout)
    layout = new_layout
    install(layout)
    full_schedule = ScheduleSnapshot.of(scheduler)  # a re-plan may pick other timesteps of the grid
    visited = rank_schedule_indices(warmup_steps, [])  # scheduler indices this rank has stepped through
    full_schedule.retime(scheduler, visited + [warmup_steps + k for k in final.ranks[rank].steps])
    synchronize(band)  # a profiling timestamp: the phase ends when its data has arrived
    timeline.phases.append(("transition", t0, timeline.now()))
    transition_seconds = timeline.phases[-1][2] - timeline.phases[-1][1]

    # 4. Sync periods: own steps with displaced K/V; the last step of each period publishes K/V.
    #    With --stadi_replan sync a sync point may re-plan the remaining steps (runtime/adaptive.py):
    #    `current` then covers base steps `offset ...` as its own steps 0, 1, ...
    replanner = SyncReplanner(groups, config.tolerance) if config.replan == "sync" and not config.exact else None
    current, offset, period = final, 0, 0
    while period < current.num_periods:
        steps = current.steps_in_period(rank, period)
        is_last_period = period == current.num_periods - 1
        first_record = len(timeline.steps)
        for j, k in enumerate(steps):
            publish = j == len(steps) - 1 and not is_last_period and not config.exact
            store.set_phase(synchronous=config.exact, publish=publish)
            band = forward_and_step(band, len(visited), "stadi", offset + k)
            visited.append(warmup_steps + offset + k)
        period += 1
        if replanner is None or is_last_period:
            continue
        next_step = current.sync_points[period]
        comm.enter("replan", offset + next_step)
        speeds = replanner.period_speeds(timeline.steps[first_record:], band.device)
        decision = replanner.decide(current, next_step, speeds, transition_seconds)
        if decision is None or not decision.replan:
            continue
        t0 = timeline.now()
        store.drain()  # this sync point's K/V land on the old layout; the full-image buffers stay valid
        new_layout = geometry.layout(decision.new_plan)
        if new_layout.token_rows != layout.token_rows:
            band = reband(band, layout, new_layout)
            layout = new_layout
            install(layout)
        current, offset, period = decision.new_plan, offset + next_step, 0
        replanner.log[-1]["offset"] = offset  # absolute base step where the new plan starts
        full_schedule.retime(scheduler, visited + [warmup_steps + offset + k for k in current.ranks[rank].steps])
        timeline.phases.append(("replan", t0, timeline.now()))
    comm.enter("drain", num_steps)
    store.drain()

    # 5. Gather the bands into the full latent.
    t0 = timeline.now()
    comm.enter("gather", num_steps)
    full = comm.all_gather(band, model.band_sizes(layout), model.band_dim)
    synchronize(full)
    timeline.phases.append(("gather", t0, timeline.now()))
    return DenoiseResult(full, warm, final, measured, len(visited), timeline, costs, store.stats(),
                         replans=replanner.log if replanner is not None else [])
