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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from stadi_xdit.config import StadiConfig
from stadi_xdit.planner import Plan, plan
from stadi_xdit.planner.anchor import settle_plan
from stadi_xdit.planner.calls import CallMemory, plan_call, remember_call, warmup_layout, with_step_cache
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
from stadi_xdit.runtime.layout import BandGeometry, BandLayout, BandView, slice_band
from stadi_xdit.runtime.profile import RankTimeline, StepRecord, forward_timer
from stadi_xdit.runtime.schedule import map_history, rank_schedule_indices


class BandPositionsUser(Protocol):
    """The family's positions (`xdit/injection.py`), told each band before the model runs on it."""

    def set_band(self, band: BandView) -> None: ...


class StepCache(Protocol):
    """A step cache inside the model (xDiT's TeaCache or FBCache blocks, cache-dit's DBCache;
    `xdit/step_cache.py`): on a forward whose input barely changed since the rank's last computed one, it
    reuses that forward's residual for most blocks. Each STADI member decides for its own band (a Ulysses
    group as one); the loop says where it may, and at which step of the denoising grid the forward is."""

    def reset(self) -> None:
        """Forget the last forward's inputs and residuals (a new call, or a new band: other tokens)."""

    def begin_forward(self, step: int, may_serve: bool) -> None:
        """The next forward is at step `step` of the full timestep grid (a stride-2 rank's are every other
        one), and may reuse the cache only if `may_serve`."""

    def last_forward_cached(self) -> bool:
        """Whether the last forward reused it."""


class BandModel(Protocol):
    """What the loop needs from a model family."""

    band_dim: int  # dimension of the latent tensor along which bands lie

    def band_sizes(self, layout: BandLayout) -> list[int]:
        """Extent of each rank's band along `band_dim`."""

    def set_band(self, band: BandView) -> None:
        """`band` (this rank's band of the current layout) is now current."""

    def predict(self, band_latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Model output for this rank's band (guidance applied), ready for `scheduler.step`."""


@dataclass(frozen=True)
class Calibration:
    """What the plan of a call with measured speeds was planned on (the same on every rank)."""

    step_overhead_seconds: list[float]  # each rank's fixed cost of a forward
    row_seconds: list[float]  # ... and its cost per token row
    noise: list[float]  # relative spread of one forward
    samples: list[float]  # forwards behind each estimate
    fitted: list[bool]  # the fixed cost came from a line through two or more band sizes
    warmup_exchange_seconds: float  # the synchronous K/V gathers of one warmup step
    exchange_seconds: float  # the K/V exchange of one sync point
    warmup_rows: list[list[int]]  # token rows per rank of each warmup step
    evidence: list[str]  # per rank: "warmup" (this call's) or "memory" (earlier calls')

    @classmethod
    def of(cls, estimates: Sequence[CostEstimate], warmup_exchange: float, stale_bytes_ratio: float,
           warmup_rows: list[list[int]], evidence: list[str]) -> Calibration:
        return cls([e.fixed_seconds for e in estimates], [e.row_seconds for e in estimates],
                   [e.noise for e in estimates], [e.weight for e in estimates], [e.fitted for e in estimates],
                   warmup_exchange, warmup_exchange * stale_bytes_ratio, warmup_rows, evidence)

    def plan_terms(self) -> dict:
        """The cost terms `plan()` takes."""
        return {"step_overhead_seconds": self.step_overhead_seconds,
                "warmup_exchange_seconds": self.warmup_exchange_seconds, "exchange_seconds": self.exchange_seconds}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WarmupOutcome:
    """The warmup phase's layouts: the one it began on, and the one the displaced phase starts from
    (step-1 calibration may have moved the bands in between)."""

    first: Plan
    last: Plan


@dataclass
class DenoiseResult:
    latents: torch.Tensor  # full latent, on every rank
    warmup_plan: Plan  # the warmup's last layout: what the plan re-bands from (WarmupOutcome.last)
    plan: Plan
    measured_speeds: list[float] | None  # rows/s per rank, None when speeds were given
    num_evals: int  # model evaluations by this rank
    timeline: RankTimeline = field(repr=False)
    # What the plan was planned on (None: speeds were given, nothing was measured).
    costs: Calibration | None = None
    # The K/V store's account of the run: exchange method, collectives per sync point, bytes.
    kv_exchange: dict = field(default_factory=dict)
    # --stadi_replan sync: one entry per mid-run re-plan (base step, old/new speeds, rows, strides, gain).
    replans: list[ReplanEvent] = field(default_factory=list)
    # What the next call of this size starts from (measured speeds only; the same on every rank).
    memory: CallMemory | None = None
    settle_reasons: dict[str, str] = field(default_factory=dict)  # phase -> why the plan moved or stayed
    warmup_start: Plan | None = None  # the layout the warmup began on (WarmupOutcome.first)
    cached_forwards: int = 0  # forwards of this rank that the step cache served (--cache_method)


# Fewer warmup steps leave one timed band size: the fixed cost per forward cannot be separated.
CALIBRATION_WARMUP_STEPS = 3


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
    positions: BandPositionsUser | None = None,
    step_cache: StepCache | None = None,
) -> DenoiseResult:
    """Run every denoising step of `scheduler` (already set up for the full run) on this rank's bands.

    `geometry` turns plans into band layouts; each new layout's `BandView` goes to the K/V store, to the
    family's `positions` and to the model (`set_band`). `known_speeds` (user-given or cached) make warmup already elastic;
    `memory` (the last calls of this size) makes it elastic on settled estimates, and anchors the plan.
    `step_cache` (xDiT's `--cache_method`) may serve displaced forwards; never a synchronous one, where every layer
    gathers its K/V, nor the rank's last, which finishes its band.
    """
    call = _Call(latents, scheduler, model, groups, store, config, geometry, warmup_steps, memory, positions,
                 step_cache)
    warm = call.warmup(known_speeds)
    final = call.profile(known_speeds)
    call.transition(final)
    ran = call.periods(final)
    full = call.gather()
    return DenoiseResult(full, warm.last, final, [e.speed for e in call.estimates] if call.estimates else None,
                         len(call.visited), call.timeline, call.calibration, store.stats(), replans=call.replans,
                         memory=call.remember(ran), settle_reasons=call.reasons, warmup_start=warm.first,
                         cached_forwards=call.cached_forwards)


class _Call:
    """One call's state, which its phases read and write in order (one data path, read one way):
    warmup -> profile -> transition -> periods (with re-plans) -> gather -> remember."""

    def __init__(self, latents: torch.Tensor, scheduler, model: BandModel, groups: StadiGroups,
                 store: DisplacedKVStore, config: StadiConfig, geometry: BandGeometry, warmup_steps: int,
                 memory: CallMemory | None, positions: BandPositionsUser | None = None,
                 step_cache: StepCache | None = None):
        self.scheduler, self.model, self.groups, self.store = scheduler, model, groups, store
        self.positions, self.step_cache = positions, step_cache
        self.cached_forwards = 0
        # A publishing step the cache cut short still publishes every layer (the K/V it last computed).
        store.layers_may_skip = step_cache is not None
        self.config, self.geometry, self.warmup_steps = config, geometry, warmup_steps
        self.comm = groups.band
        self.rank, self.world = groups.member, groups.members
        # With Ulysses inside STADI groups, `rank` is this rank's group and the group's band is computed in
        # parts, one per group rank, this rank's being `part` of the layout's `split_groups` (the store still
        # holds the group's band, per head shard).
        self.sequence = groups.sequence if groups.sequence_size > 1 else None
        self.parts, self.part = groups.sequence_size, groups.part
        self.rows, self.align = geometry.rows, geometry.align
        self.num_steps = len(scheduler.timesteps)
        self.device = latents.device
        self.timeline = RankTimeline()
        self.timer = forward_timer(latents.device, self.timeline, self.comm, record_work=config.timing == "work")
        self.latents = latents
        self.measured = not config.speeds
        # Nothing to settle in exact and uniform plans, and given speeds are trusted; a memory of
        # another layout (rank count, image size) does not apply.
        if (config.exact or config.mode == "uniform" or not self.measured or memory is None
                or len(memory.plan_rows) != self.world or sum(memory.plan_rows) != self.rows):
            memory = None
        self.memory = memory
        self.reasons: dict[str, str] = {}
        self.estimates: list[CostEstimate] | None = None
        self.calibration: Calibration | None = None
        self.evidence = None  # what the plan was estimated from (planner.calls.Evidence)
        self.served: tuple[tuple[float, float], ...] = ()  # the step cache's record the plan used (CallMemory.served)
        self.exchange_now = 0.0  # this call's measured exchange of one warmup step
        self.warmup_rows: list[list[int]] = []  # token rows per rank of each warmup step
        self.visited: list[int] = []  # scheduler indices this rank has stepped through
        self.replans: list[ReplanEvent] = []
        self.layout: BandLayout | None = None
        self.band: torch.Tensor | None = None
        # Stale K/V only exist outside exact mode; there they may be stored narrower (--stadi_kv_dtype).
        store.configure(kv_dtype=None if config.exact else kv_storage_dtype(config.kv_dtype))

    # --- mechanism shared by the phases ---------------------------------------------------------
    def _forward_and_step(self, schedule_index: int, phase: str, base_step: int, may_cache: bool = False) -> None:
        t = self.scheduler.timesteps[schedule_index]  # this rank's (restricted) schedule
        # The step's index in the full grid: the emulated load may change at one (--stadi_emulate_shift), and a
        # step cache's warmup steps and step masks index it.
        grid_step = base_step if phase == "warmup" else self.warmup_steps + base_step
        self.comm.enter(phase, base_step)
        if self.step_cache is not None:
            self.step_cache.begin_forward(grid_step, may_cache)
        self.timer.begin()
        output = self.model.predict(self.band, t)
        cached = self.step_cache is not None and self.step_cache.last_forward_cached()
        self.cached_forwards += cached
        start_row, end_row = self.layout.token_rows[self.rank]
        self.timer.end(phase, base_step, end_row - start_row, self.config.emulated_factor(self.rank, grid_step),
                       cached=cached)
        self.band = self.scheduler.step(output, t, self.band, return_dict=False)[0]

    def _install(self, layout: BandLayout) -> None:
        """`layout` is current: the band is re-sliced (gathered on the old bands) where it changed, and its
        one `BandView` goes to the store, the family's positions and the model."""
        if self.layout is not None and layout.token_rows != self.layout.token_rows:
            self.band = self._reband(self.layout, layout)
        if self.step_cache is not None and (self.layout is None or layout.token_rows != self.layout.token_rows):
            self.step_cache.reset()
        self.layout = layout
        self.store.set_band(BandView(layout, self.rank))  # the group's band
        view = BandView(layout.split_groups(self.groups.group_sizes), self.part)  # what this rank computes
        if self.positions is not None:
            self.positions.set_band(view)
        self.model.set_band(view)

    def _slice(self, full: torch.Tensor, layout: BandLayout) -> torch.Tensor:
        """This rank's part of `full` (the whole latent) under `layout`."""
        sizes = self.model.band_sizes(layout.split_groups(self.groups.group_sizes))
        return slice_band(full, sizes, self.part, self.model.band_dim)

    def _gather(self, part: torch.Tensor, layout: BandLayout) -> torch.Tensor:
        """The whole latent from every rank's `part` under `layout`: each group's parts first, then the groups."""
        dim = self.model.band_dim
        if self.groups.shards is not None:  # unequal groups: one gather of every part over the CFG branch
            return self.comm.all_gather(part.contiguous(),
                                        self.model.band_sizes(layout.split_groups(self.groups.group_sizes)), dim)
        if self.sequence is not None:
            sizes = self.model.band_sizes(layout.split(self.parts))
            part = self.sequence.all_gather(part.contiguous(), sizes[self.rank * self.parts:][:self.parts], dim)
        return self.comm.all_gather(part.contiguous(), self.model.band_sizes(layout), dim)

    def _reband(self, old: BandLayout, new: BandLayout) -> torch.Tensor:
        """Gather the full latent and scheduler history on the old bands, re-slice for the new ones."""
        full = self._gather(self.band, old)
        map_history(self.scheduler, lambda tensor: self._slice(self._gather(tensor, old), new))
        return self._slice(full, new)

    def _settle_spatial(self, estimates: list[CostEstimate], anchor_rows: Sequence[int]):
        return settle_plan(estimates, anchor_rows=anchor_rows, rows=self.rows, align=self.align,
                           num_steps=self.num_steps, warmup_steps=self.warmup_steps, mode="spatial")

    # --- the phases -----------------------------------------------------------------------------
    def warmup(self, known_speeds: Sequence[float] | None) -> WarmupOutcome:
        """Synchronous, exact steps that also time each rank; returns the layouts it began and ended on."""
        warm, self.reasons["warmup"] = warmup_layout(self.memory, num_ranks=self.world, rows=self.rows,
                                                     align=self.align, num_steps=self.num_steps,
                                                     warmup_steps=self.warmup_steps, known_speeds=known_speeds)
        layout = self.geometry.layout(warm)
        self.band = self._slice(self.latents, layout)
        self._install(layout)
        last = warm
        calibrate = (self.measured and self.memory is None and self.world > 1 and self.config.mode != "uniform"
                     and self.warmup_steps >= CALIBRATION_WARMUP_STEPS)
        for i in range(self.warmup_steps):
            # The last warmup step's K/V seed the displaced phase (exact mode never needs them).
            self.store.set_phase(synchronous=True, publish=i == self.warmup_steps - 1 and not self.config.exact)
            self.warmup_rows.append(self._planned_rows())
            self._forward_and_step(i, "warmup", i)
            if calibrate and i == 1:
                # A second band size for the fit: the settled spatial bands of step 1's timing.
                first = gather_evidence(self.groups, rank_evidence(self.timer.settle()[-1:]), self.device,
                                        phase="profile")
                settled = self._settle_spatial(first.estimates(self.rows), self.warmup_rows[-1])
                self.reasons["calibration"] = settled.reason
                last = settled.plan
                self._install(self.geometry.layout(last))
        return WarmupOutcome(warm, last)

    def profile(self, known_speeds: Sequence[float] | None) -> Plan:
        """Every rank derives the same estimates, hence the same plan, with no broadcast."""
        config, rows = self.config, self.rows
        timed = call_records(self.timer.settle()) if self.measured else []  # given speeds need no timing
        if not (self.measured and timed):  # speeds given, or exact mode without a warmup step to time
            self.measured = False
            return plan(config.speeds or (1.0,) * self.world, rows=rows, align=self.align, num_steps=self.num_steps,
                        warmup_steps=self.warmup_steps, mode=config.mode, max_stride=config.effective_max_stride,
                        tolerance=config.tolerance, warmup_speeds_known=known_speeds is not None)
        # With a memory, its displaced forwards (planner/calls.py: the warmup's are another workload).
        if self.memory is not None:
            self.evidence, how = self.memory.evidence, ["memory"] * self.world
        else:
            self.evidence = gather_evidence(self.groups, rank_evidence(timed), self.device, phase="profile")
            how = ["warmup"] * self.world
        # Under a step cache, what each rank's cache served in the last call (none remembered: computed forwards).
        self.served = self.memory.served if self.memory is not None and self.step_cache is not None else ()
        self.estimates = with_step_cache(self.evidence.estimates(rows), self.served)
        # The rank that arrives last at a synchronous gather waits for the transfer alone; the others
        # also wait for it. So per step the smallest wait over ranks, and of those the smallest; both
        # CFG branches must plan alike (each group measured its own exchange): the larger.
        waits = self.comm.all_gather_float_lists([r.wait for r in timed], self.device)
        self.exchange_now = self.groups.planning_max(min(min(step) for step in zip(*waits)), self.device)
        warmup_exchange = self.memory.typical_exchange_seconds(self.exchange_now) if self.memory else self.exchange_now
        self.calibration = Calibration.of(self.estimates, warmup_exchange, self.store.stale_bytes_ratio(),
                                          self.warmup_rows, how)
        settled = plan_call(self.estimates, self.memory, rows=rows, align=self.align, num_steps=self.num_steps,
                            warmup_steps=self.warmup_steps, mode=config.mode, max_stride=config.effective_max_stride,
                            tolerance=config.tolerance, warmup_rows=self._last_warmup_rows(),
                            **self.calibration.plan_terms())
        self.reasons["plan"] = settled.reason
        return settled.plan

    def _last_warmup_rows(self) -> tuple[int, ...]:
        return tuple(self.warmup_rows[-1]) if self.warmup_rows else tuple(self._planned_rows())

    def _planned_rows(self) -> list[int]:
        """The current layout's rows per band in the planner's units (the last band without the geometry's
        `extra_rows`, which it computes beyond the plan's whole units)."""
        rows = [end - start for start, end in self.layout.token_rows]
        rows[-1] -= self.geometry.extra_rows
        return rows

    def transition(self, final: Plan) -> None:
        """Gather the full latent and scheduler history once, re-slice for the plan's bands, and restrict
        the scheduler to this rank's sub-sequence of the timestep grid."""
        t0 = self.timeline.now()
        self.comm.enter("transition", self.warmup_steps)
        self._install(self.geometry.layout(final))  # every rank plans alike, so all skip a no-op alike
        self.full_schedule = ScheduleSnapshot.of(self.scheduler)  # a re-plan may pick other timesteps
        self.visited = rank_schedule_indices(self.warmup_steps, [])
        self.full_schedule.retime(self.scheduler, self.visited + [self.warmup_steps + k for k in final.ranks[self.rank].steps])
        synchronize(self.band)  # a profiling timestamp: the phase ends when its data has arrived
        self.timeline.phases.append(("transition", t0, self.timeline.now()))
        self.transition_seconds = self.timeline.phases[-1][2] - t0

    def periods(self, final: Plan) -> Plan:
        """Own steps with displaced K/V; the last step of each period publishes K/V. With
        `--stadi_replan sync` a sync point may re-plan the remaining steps (runtime/adaptive.py):
        `current` then covers base steps `offset ...` as its own steps 0, 1, .... Returns the plan that
        ran last."""
        config, rank = self.config, self.rank
        replanner = None
        if config.replan == "sync" and not config.exact:
            replanner = SyncReplanner(self.groups, config.tolerance, self.evidence, max_fixed_rows=self.rows,
                                      served=self.served)
        current, offset, period = final, 0, 0
        while period < current.num_periods:
            steps = current.steps_in_period(rank, period)
            is_last_period = period == current.num_periods - 1
            first_record = self.timer.count
            for j, k in enumerate(steps):
                last_of_period = j == len(steps) - 1
                publish = last_of_period and not is_last_period and not config.exact
                self.store.set_phase(synchronous=config.exact, publish=publish)
                may_cache = not config.exact and not (is_last_period and last_of_period)
                self._forward_and_step(len(self.visited), "stadi", offset + k, may_cache)
                self.visited.append(self.warmup_steps + offset + k)
            period += 1
            if replanner is None or is_last_period:
                continue
            next_step = current.sync_points[period]
            self.comm.enter("replan", offset + next_step)
            estimates = replanner.period_estimates(self.timer.settle()[first_record:], self.device)
            decision = replanner.decide(current, next_step, estimates, self.transition_seconds)
            if not decision.replan:
                continue
            t0 = self.timeline.now()
            self.store.drain()  # this sync point's K/V land on the old layout; the full-image buffers stay valid
            self._install(self.geometry.layout(decision.new_plan))
            self.replans.append(ReplanEvent.of(current, decision, offset + next_step))
            current, offset, period = decision.new_plan, offset + next_step, 0
            self.full_schedule.retime(self.scheduler, self.visited + [self.warmup_steps + offset + k
                                                                      for k in current.ranks[rank].steps])
            self.timeline.phases.append(("replan", t0, self.timeline.now()))
        self.comm.enter("drain", self.num_steps)
        self.store.drain()
        return current

    def gather(self) -> torch.Tensor:
        """The bands gathered into the full latent, on every rank."""
        t0 = self.timeline.now()
        self.comm.enter("gather", self.num_steps)
        full = self._gather(self.band, self.layout)
        synchronize(full)
        self.timer.settle()  # the call's timeline is complete
        self.timeline.phases.append(("gather", t0, self.timeline.now()))
        return full

    def _served_record(self, records: Sequence[StepRecord]) -> list[tuple[float, float]]:
        """Every rank's share of its displaced forwards that the step cache served, and a served forward's
        seconds (the lower median); nothing without a cache."""
        if self.step_cache is None:
            return []
        served = sorted(r.compute for r in records if r.cached)
        mine = [len(served) / max(len(records), 1), served[(len(served) - 1) // 2] if served else 0.0]
        return [(share, max(seconds, 0.0))
                for share, seconds in self.groups.per_member(self.comm.all_gather_float_lists(mine, self.device))]

    def remember(self, ran: Plan) -> CallMemory | None:
        """What the next call starts from: this call's displaced forwards, merged into the memory."""
        if not self.measured or self.config.exact or self.config.mode == "uniform":
            return None
        records = [r for r in self.timer.settle() if r.phase == "stadi"]
        displaced = gather_evidence(self.groups, rank_evidence(records), self.device, phase="memory")
        memory, how = remember_call(self.memory, displaced, rows=self.rows, warmup_rows=self._last_warmup_rows(),
                                    ran=ran, exchange_seconds=self.exchange_now, served=self._served_record(records))
        self.reasons["memory"] = ",".join(how)
        return memory
