"""The STADI denoising loop: warmup -> profile -> plan -> layout -> periods -> gather.

Model-specific work (CFG, learned sigma, packing, RoPE ids) lives behind `BandModel`; this file
only decides which band each rank holds, which timesteps it visits and when K/V are exchanged.

Measured speeds (no `--stadi_speeds`): every forward is a sample of its rank's cost model
``t(rows) = fixed + rows * row`` (`planner/evidence.py`). The profile after warmup fits every
rank's model from what the pipeline remembers of earlier calls (`CallMemory`, with
``--stadi_replan calls|sync``: their displaced forwards), or else from this call's warmup, and
settles the plan against the plan in use (`planner/anchor.py`): a plan moves only on gains the
measured noise cannot explain. With at least 3 warmup steps and no memory, the first timed step's
(settled) spatial bands give the rest of the warmup a second band size for the fit. At the end of
the call its displaced forwards update the memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from stadi_xdit.config import StadiConfig
from stadi_xdit.planner import Plan, plan
from stadi_xdit.planner.anchor import settle_plan
from stadi_xdit.planner.calls import CallMemory, plan_call, remember_call, warmup_layout
from stadi_xdit.planner.evidence import CostEstimate
from stadi_xdit.runtime.adaptive import (
    ReplanEvent,
    ScheduleSnapshot,
    SyncReplanner,
    call_records,
    gather_evidence,
    rank_evidence,
)
from stadi_xdit.runtime.comm import synchronize
from stadi_xdit.runtime.groups import StadiGroups
from stadi_xdit.runtime.kv import DisplacedKVStore, kv_storage_dtype
from stadi_xdit.runtime.layout import BandGeometry, BandLayout, slice_band
from stadi_xdit.runtime.profile import RankTimeline, StepRecord, emulate_slowdown, work_clock
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
    replans: list[ReplanEvent] = field(default_factory=list)
    # What the next call of this size starts from (measured speeds only; the same on every rank).
    memory: CallMemory | None = None
    settle_reasons: dict = field(default_factory=dict)  # phase -> why the plan moved or stayed


# Fewer warmup steps leave one timed band size: the fixed cost per forward cannot be separated.
CALIBRATION_WARMUP_STEPS = 3


def _cost_terms(estimates: Sequence[CostEstimate], warmup_exchange: float, stale_bytes_ratio: float) -> dict:
    return {"step_overhead_seconds": [e.fixed_seconds for e in estimates], "warmup_exchange_seconds": warmup_exchange,
            "exchange_seconds": warmup_exchange * stale_bytes_ratio}


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
    memory: CallMemory | None = None,
) -> DenoiseResult:
    """Run every denoising step of `scheduler` (already set up for the full run) on this rank's bands.

    `geometry` turns plans into band layouts; each new layout goes to the K/V store and to the
    model (`model.set_band`). `known_speeds` (user-given or cached) make warmup already elastic;
    `memory` (the last calls of this size) makes it elastic on settled estimates, and anchors the plan.
    """
    comm = groups.band
    rank, world = comm.rank, comm.world_size
    rows, align = geometry.rows, geometry.align
    num_steps = len(scheduler.timesteps)
    timeline = RankTimeline()
    clock = work_clock(latents.device)
    device = latents.device
    measured = not config.speeds
    if config.exact or config.mode == "uniform" or not measured:
        memory = None  # nothing to settle: exact and uniform plans are fixed, given speeds are trusted
    reasons: dict[str, str] = {}
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
    if memory is not None and (len(memory.plan_rows) != world or sum(memory.plan_rows) != rows):
        memory = None
    warm, reasons["warmup"] = warmup_layout(memory, num_ranks=world, rows=rows, align=align, num_steps=num_steps,
                                            warmup_steps=warmup_steps, known_speeds=known_speeds)
    layout = geometry.layout(warm)
    install(layout)
    band = slice_band(latents, model.band_sizes(layout), rank, model.band_dim)
    calibrate = (measured and memory is None and world > 1 and config.mode != "uniform"
                 and warmup_steps >= CALIBRATION_WARMUP_STEPS)
    warmup_rows = []  # token rows per rank of each warmup step
    for i in range(warmup_steps):
        # The last warmup step's K/V seed the displaced phase (exact mode never needs them).
        store.set_phase(synchronous=True, publish=i == warmup_steps - 1 and not config.exact)
        warmup_rows.append([end - start for start, end in layout.token_rows])
        band = forward_and_step(band, i, "warmup", i)
        if calibrate and i == 1:
            # A second band size for the fit: the settled spatial bands of step 1's timing.
            first = gather_evidence(groups, rank_evidence(timeline.steps[-1:]), device, phase="profile")
            settled = settle_plan(first.estimates(rows), anchor_rows=warmup_rows[-1], rows=rows, align=align,
                                  num_steps=num_steps, warmup_steps=warmup_steps, mode="spatial")
            reasons["calibration"] = settled.reason
            second = geometry.layout(settled.plan)
            if second.token_rows != layout.token_rows:
                band = reband(band, layout, second)
                layout = second
                install(layout)

    # 2. Profile: every rank derives the same estimates, hence the same plan, with no broadcast.
    estimates, costs, evidence, cost_terms = None, None, None, {}
    last_warmup_rows = tuple(warmup_rows[-1]) if warmup_rows else tuple(r.num_rows for r in warm.ranks)
    timed = call_records(timeline.steps)
    measured = measured and bool(timed)  # exact mode may have no warmup step to time: equal bands then
    if measured:
        # With a memory, its displaced forwards (planner/calls.py: the warmup's are another workload).
        if memory is not None:
            evidence, how = memory.evidence, ["memory"] * world
        else:
            evidence = gather_evidence(groups, rank_evidence(timed), device, phase="profile")
            how = ["warmup"] * world
        estimates = evidence.estimates(rows)
        # The rank that arrives last at a synchronous gather waits for the transfer alone; the others
        # also wait for it. So per step the smallest wait over ranks, and of those the smallest; both
        # CFG branches must plan alike (each group measured its own exchange): the larger.
        waits = comm.all_gather_float_lists([r.wait for r in timed], device)
        exchange_now = groups.pair_max(min(min(step) for step in zip(*waits)), device)
        warmup_exchange = memory.exchange(exchange_now) if memory else exchange_now
        cost_terms = _cost_terms(estimates, warmup_exchange, store.stale_bytes_ratio())
        costs = {**cost_terms, "row_seconds": [e.row_seconds for e in estimates],
                 "fitted": [e.fitted for e in estimates], "warmup_rows": warmup_rows,
                 "noise": [e.noise for e in estimates], "samples": [e.weight for e in estimates],
                 "evidence": how}
        settled = plan_call(estimates, memory, rows=rows, align=align, num_steps=num_steps,
                            warmup_steps=warmup_steps, mode=config.mode, max_stride=config.effective_max_stride,
                            tolerance=config.tolerance, warmup_rows=last_warmup_rows, **cost_terms)
        final = settled.plan
        reasons["plan"] = settled.reason
    else:
        final = plan(config.speeds or (1.0,) * world, rows=rows, align=align, num_steps=num_steps, warmup_steps=warmup_steps,
                     mode=config.mode, max_stride=config.effective_max_stride, tolerance=config.tolerance,
                     warmup_speeds_known=known_speeds is not None)

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
    replanner = None
    if config.replan == "sync" and not config.exact:
        replanner = SyncReplanner(groups, config.tolerance, evidence, max_fixed_rows=rows)
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
        period_estimates = replanner.period_estimates(timeline.steps[first_record:], device)
        decision = replanner.decide(current, next_step, period_estimates, transition_seconds)
        if not decision.replan:
            continue
        t0 = timeline.now()
        store.drain()  # this sync point's K/V land on the old layout; the full-image buffers stay valid
        new_layout = geometry.layout(decision.new_plan)
        if new_layout.token_rows != layout.token_rows:
            band = reband(band, layout, new_layout)
            layout = new_layout
            install(layout)
        replanner.log.append(ReplanEvent.of(current, decision, offset + next_step))
        current, offset, period = decision.new_plan, offset + next_step, 0
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

    # 6. What the next call starts from: the whole call's samples, merged into the memory.
    next_memory = None
    if measured and not config.exact and config.mode != "uniform":
        displaced = gather_evidence(groups, rank_evidence([r for r in timeline.steps if r.phase == "stadi"]),
                                    device, phase="memory")
        next_memory, how = remember_call(memory, displaced, rows=rows, warmup_rows=last_warmup_rows, ran=current,
                                         exchange_seconds=exchange_now)
        reasons["memory"] = ",".join(how)
    return DenoiseResult(full, warm, final, [e.speed for e in estimates] if estimates else None, len(visited),
                         timeline, costs, store.stats(), replans=replanner.log if replanner is not None else [],
                         memory=next_memory, settle_reasons=reasons)
