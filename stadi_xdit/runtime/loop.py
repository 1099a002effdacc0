"""The STADI denoising loop: warmup -> profile -> plan -> layout -> periods -> gather.

Model-specific work (CFG, learned sigma, packing, RoPE ids) lives behind `BandModel`; this file
only decides which band each rank holds, which timesteps it visits and when K/V are exchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from stadi_xdit.config import StadiConfig
from stadi_xdit.planner import Plan, plan, plan_warmup
from stadi_xdit.runtime.comm import synchronize
from stadi_xdit.runtime.groups import StadiGroups
from stadi_xdit.runtime.kv import DisplacedKVStore
from stadi_xdit.runtime.layout import BandGeometry, BandLayout, slice_band
from stadi_xdit.runtime.profile import (
    RankTimeline,
    StepRecord,
    emulate_slowdown,
    measured_step_seconds,
    work_clock,
)
from stadi_xdit.runtime.schedule import map_history, rank_schedule_indices, restrict_to_indices


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
    slowdown = config.emulate_slowdown[rank] if config.emulate_slowdown else 1.0
    clock = work_clock(latents.device)

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
        emulated = emulate_slowdown(slowdown, work) if slowdown != 1.0 else 0.0
        timeline.steps.append(StepRecord(phase, base_step, start, timeline.now(), wait, emulated))
        return scheduler.step(output, t, band, return_dict=False)[0]

    def install(layout: BandLayout) -> None:
        store.set_layout(layout.token_counts(), layout.token_range(rank))
        model.set_band(layout, rank)

    # 1. Warmup: synchronous, exact steps that also time each rank.
    warm = plan_warmup(world, rows=rows, align=align, num_steps=num_steps, warmup_steps=warmup_steps,
                       speeds=known_speeds)
    layout = geometry.layout(warm)
    install(layout)
    band = slice_band(latents, model.band_sizes(layout), rank, model.band_dim)
    store.set_phase(synchronous=True)
    for i in range(warmup_steps):
        band = forward_and_step(band, i, "warmup", i)

    # 2. Profile: every rank derives the same speeds, hence the same plan, with no broadcast.
    measured = None
    speeds = list(config.speeds) if config.speeds else None
    if speeds is None:
        comm.enter("profile")
        seconds = comm.all_gather_floats(measured_step_seconds(timeline.steps), band.device)
        counts = [r.num_rows for r in warm.ranks]
        measured = [count / s for count, s in zip(counts, seconds)]
        speeds = groups.shared_speeds(measured, band.device)
    final = plan(speeds, rows=rows, align=align, num_steps=num_steps, warmup_steps=warmup_steps,
                 mode=config.mode, max_stride=config.effective_max_stride, tolerance=config.tolerance,
                 warmup_speeds_known=known_speeds is not None)

    # 3. Transition: gather the full latent and scheduler history once, re-slice for the new bands.
    t0 = timeline.now()
    comm.enter("transition", warmup_steps)
    old_sizes = model.band_sizes(layout)
    full = comm.all_gather(band, old_sizes, model.band_dim)
    new_layout = geometry.layout(final)
    new_sizes = model.band_sizes(new_layout)

    def reband(history: torch.Tensor) -> torch.Tensor:
        gathered = comm.all_gather(history.contiguous(), old_sizes, model.band_dim)
        return slice_band(gathered, new_sizes, rank, model.band_dim)

    map_history(scheduler, reband)
    band = slice_band(full, new_sizes, rank, model.band_dim)
    layout = new_layout
    install(layout)
    me = final.ranks[rank]
    restrict_to_indices(scheduler, rank_schedule_indices(warmup_steps, me.steps))
    timeline.phases.append(("transition", t0, timeline.now()))

    # 4. Sync periods: own steps with displaced K/V; the last step of each period publishes K/V.
    for period in range(final.num_periods):
        steps = final.steps_in_period(rank, period)
        is_last_period = period == final.num_periods - 1
        for j, k in enumerate(steps):
            publish = j == len(steps) - 1 and not is_last_period
            store.set_phase(synchronous=config.exact, publish=publish)
            band = forward_and_step(band, warmup_steps + me.steps.index(k), "stadi", k)
    comm.enter("drain", num_steps)
    store.drain()

    # 5. Gather the bands into the full latent.
    t0 = timeline.now()
    comm.enter("gather", num_steps)
    full = comm.all_gather(band, model.band_sizes(layout), model.band_dim)
    timeline.phases.append(("gather", t0, timeline.now()))
    return DenoiseResult(full, warm, final, measured, warmup_steps + len(me.steps), timeline)
