"""`StadiPipelineMixin`: STADI's part of every xFuser pipeline twin (one per model family, in
`stadi_xdit/models/`).

Construction goes through xDiT unchanged (`from_pretrained` builds `cls(pipeline, engine_config)`);
what differs is the runtime state (bands from a plan), the transformer (removable STADI
injection instead of xDiT's wrappers) and `__call__` (warmup, profile, plan, periods, gather).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from xfuser.core.distributed import get_cfg_group, get_dp_group, get_sp_group, get_world_group
from xfuser.logger import init_logger
from xfuser.model_executor.pipelines.base_pipeline import xFuserPipelineBaseWrapper

from stadi_xdit.cli_errors import StadiInputError
from stadi_xdit.config import StadiConfig
from stadi_xdit.planner.calls import CallMemory
from stadi_xdit.planner.memory import GIB, StoreDoesNotFit
from stadi_xdit.runtime import heartbeat
from stadi_xdit.runtime.adaptive import executed_evals
from stadi_xdit.runtime.comm import BandComm
from stadi_xdit.runtime.compile import CompiledBlocks, compile_blocks, compiled_graphs
from stadi_xdit.runtime.faults import PeerWatch
from stadi_xdit.runtime.groups import StadiGroups
from stadi_xdit.runtime.head_shards import HeadShards
from stadi_xdit.runtime.kv import DisplacedKVStore
from stadi_xdit.runtime.layout import BandGeometry, BandView
from stadi_xdit.runtime.loop import DenoiseResult, denoise
from stadi_xdit.runtime.profile_cache import ProfileCache, profile_key
from stadi_xdit.runtime.schedule import to_subsequence_capable
from stadi_xdit.topology import Topology, check_ulysses_heads
from stadi_xdit.xdit.injection import InjectionPlan, apply_injection
from stadi_xdit.xdit.runtime_state import StadiRuntimeState, install_runtime_state
from stadi_xdit.xdit.step_cache import CacheDitStepCache, XditStepCache, find_step_cache

logger = init_logger(__name__)


def hardware_identity() -> str:
    """What this rank runs on: the GPU's name, or on CPU the host and the cores it may use."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    spans, start = [], None
    for i, core in enumerate(cores):
        start = core if start is None else start
        if i + 1 == len(cores) or cores[i + 1] != core + 1:
            spans.append(str(start) if start == core else f"{start}-{core}")
            start = None
    return f"{socket.gethostname()}/cpu{'+'.join(spans) or '?'}"


def _bounded_comm(group, timeout_seconds: float, *, times_device_waits: bool = True) -> BandComm:
    """STADI's collectives over one xDiT group: bounded waits, and a failed peer named by rank."""
    watch = PeerWatch(list(group.ranks), group.rank_in_group, timeout_seconds,
                      rewaits=torch.distributed.get_backend(group.device_group) == "gloo")
    return BandComm(group.device_group, group.rank_in_group, group.world_size,
                    timedelta(seconds=timeout_seconds), watch=watch, times_device_waits=times_device_waits)


def _unequal_sequence_group(branch, shards: HeadShards) -> SimpleNamespace:
    """This rank's Ulysses group among STADI groups of unequal sizes, as xDiT describes a group (its ranks, this
    rank's place, its process group). Every rank creates every group of every CFG branch, in one order, as
    torch.distributed requires; the branches' ranks come from xDiT's data-parallel groups."""
    branches: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(branches, list(branch.ranks))
    mine = None
    for ranks in sorted({tuple(ranks) for ranks in branches}):
        for member in range(shards.members):
            members_ranks = [ranks[i] for i in shards.ranks_of(member)]
            group = torch.distributed.new_group(members_ranks)
            if torch.distributed.get_rank() in members_ranks:
                mine = SimpleNamespace(ranks=members_ranks, world_size=len(members_ranks), device_group=group,
                                       rank_in_group=members_ranks.index(torch.distributed.get_rank()))
    return mine


def stadi_config_of(engine_config: Any) -> StadiConfig:
    config = getattr(engine_config, "stadi_config", None)
    return config if config is not None else StadiConfig(use_stadi=True)


class XditBandModel:
    """Base of the family band models: this rank's current band (`band`, the loop's `BandView`).
    Subclasses set `band_dim` and implement `band_sizes`/`predict`."""

    band: BandView | None = None

    def set_band(self, band: BandView) -> None:
        self.band = band


def log_plan(result: DenoiseResult) -> None:
    """STADI says it is on: the plan, the measured speeds and the re-band, through xDiT's logger."""
    logger.info("STADI plan:\n%s", result.plan.explain())
    if result.measured_speeds:
        logger.info("STADI measured speeds (token rows/s): %s",
                    ", ".join(f"{speed:.3g}" for speed in result.measured_speeds))
    logger.info("STADI re-band after warmup: rows %s -> %s, strides %s",
                [end - start for start, end in result.warmup_plan.row_bounds()],
                [end - start for start, end in result.plan.row_bounds()],
                [rank.stride for rank in result.plan.ranks])
    if result.kv_exchange:
        logger.info("STADI K/V exchange: %s", ", ".join(f"{key}={value}" for key, value in result.kv_exchange.items()))
    if result.costs:
        costs = result.costs
        logger.info("STADI cost model per rank (fixed ms + ms/row, noise, samples): %s; evidence %s; %s",
                    ", ".join(f"{1e3 * o:.3g}+{1e3 * c:.3g}/row ±{n:.0%} n={w:.0f}" for o, c, n, w in
                              zip(costs.step_overhead_seconds, costs.row_seconds, costs.noise, costs.samples)),
                    ",".join(costs.evidence), "; ".join(f"{k}: {v}" for k, v in result.settle_reasons.items()))
    for event in result.replans:
        logger.info("STADI re-plan at base step %d: speeds %s -> %s, rows %s -> %s, strides %s -> %s, "
                    "predicted gain %.0f%% (%s)", event.offset, [f"{v:.3g}" for v in event.old_speeds],
                    [f"{v:.3g}" for v in event.new_speeds], event.old_rows, event.new_rows,
                    event.old_strides, event.new_strides, 100 * event.predicted_gain, event.reason)


class StadiPipelineMixin:
    """STADI's part of an xFuser pipeline wrapper; the xFuser base class follows it in the MRO."""

    injection_plan: InjectionPlan

    def __init__(self, pipeline, engine_config, cache_args=None, stadi_config: StadiConfig | None = None):
        self.stadi_config = stadi_config or stadi_config_of(engine_config)
        # Under xDiT's model runner (StadiEngineConfig.served_by_runner): the runner saves on its last
        # process, and shards the VAE decoder itself after loading (VAEManager.setup_parallel_vae);
        # sharding it here as well would hand the runner an already sharded decoder, which it refuses.
        self.served_by_runner = bool(getattr(engine_config, "served_by_runner", False))
        self.injection = None
        self.compiled: CompiledBlocks | None = None  # --use_torch_compile: the blocks compiled
        self.step_cache: XditStepCache | CacheDitStepCache | None = None  # --cache_method, steered by the loop
        self._compiling_call = False  # inside `compile_warmup()`
        self.last_result: DenoiseResult | None = None
        # --stadi_replan calls/sync: per (height, width), the evidence of the last calls of that size
        # (runtime/adaptive.CallMemory); the next call warms up and plans from it.
        self._call_memory: dict[tuple[int, int], CallMemory] = {}
        super().__init__(pipeline, engine_config, cache_args)
        # Each block of every model reports progress to the launcher's supervisor and to peers waiting for
        # this rank (when anyone reads it): a long decode or a slow step is work, not a stall.
        self._progress_hooks = heartbeat.watch_progress(
            [component for component in self.module.components.values() if isinstance(component, torch.nn.Module)])

    bands_are_image_rows = True  # False where bands are rows of something taller (a video clip's frames)
    # True where the family runs Ulysses inside STADI groups (--ulysses_degree with --use_stadi): its displaced
    # attention goes through band attention's all-to-alls, and its positions through `BandView` (checked by
    # tests/test_ulysses_groups.py for each family that sets it).
    ulysses_groups = False

    @classmethod
    def check_launch(cls, args: Any, stadi_degree: int) -> None:
        """Family-specific input checks before any process group exists (e.g. Wan's `--num_frames`);
        one-line `ValueError`s naming the flag. Most families need none beyond `StadiArgs.validate`."""

    # --- xDiT override points -------------------------------------------------------------
    def _init_runtime_state(self, pipeline, engine_config) -> None:
        if engine_config.parallel_config.ulysses_degree > 1 and not self.ulysses_groups:
            raise StadiInputError(f"--ulysses_degree {engine_config.parallel_config.ulysses_degree} cannot be combined "
                                  f"with --use_stadi for {type(self).__name__}: its family does not run Ulysses "
                                  "inside STADI groups")
        # Before xDiT builds its groups, which refuses such heads in every rank with a traceback.
        try:
            check_ulysses_heads(getattr(pipeline.transformer.config, "num_attention_heads", None),
                                engine_config.parallel_config.ulysses_degree, type(pipeline.transformer).__name__)
        except ValueError as error:
            raise StadiInputError(str(error)) from None
        checked = getattr(engine_config, "topology", None)
        shards = self._head_shards(pipeline, checked) if checked is not None and checked.unequal_groups else None
        # Building the runtime state creates xDiT's process groups; STADI's group is the dp group.
        heartbeat.phase("process-group")
        state = StadiRuntimeState(pipeline, engine_config)
        install_runtime_state(state)
        self._stadi_runtime_state = state
        dp, cfg, sp = get_dp_group(), get_cfg_group(), get_sp_group()
        # The topology the launch was checked with (StadiArgs.validate), else the one xDiT's groups form
        # (an engine config built by hand); either way checked once against the groups xDiT built.
        self.topology = getattr(engine_config, "topology", None) or Topology.for_stadi_degree(
            dp.world_size, cfg.world_size, ulysses_degree=sp.world_size)
        self.topology.check_groups(dp.world_size, cfg.world_size, sp.world_size)
        if shards is None and sp.world_size == 1 and not self.topology.vae_ranks and not self._members_named():
            shards = self._groups_from_nodes(pipeline, dp)
        self.stadi_config.check_world(self.topology.stadi_degree)
        timeout = self.stadi_config.timeout_seconds
        # The forward timer takes the band group's waits out of a forward's cost; the CFG pair's stay in it (the
        # two branches of a band move in lockstep and plan alike), and so do a group's Ulysses all-to-alls (they
        # are the group's forward), so those groups keep no CUDA wait events.
        sequence = _bounded_comm(sp, timeout, times_device_waits=False) if sp.world_size > 1 else None
        if shards is not None:  # xDiT's groups are flat: STADI builds the Ulysses groups itself
            sequence = _bounded_comm(_unequal_sequence_group(dp, shards), timeout, times_device_waits=False)
        self.groups = StadiGroups(band=_bounded_comm(dp, timeout),
                                  cfg=_bounded_comm(cfg, timeout, times_device_waits=False), sequence=sequence,
                                  shards=shards)
        self.kv_store = DisplacedKVStore(self.groups.band, sequence=sequence, shards=shards)

    def _members_named(self) -> bool:
        """The flags say what the STADI members are: their count (--stadi_degree), a list per member, or groups."""
        config = self.stadi_config
        return any(value is not None for value in (config.degree, config.groups, config.speeds, config.emulate_slowdown,
                                                   config.emulate_shift, config.memory_budget))

    def _groups_from_nodes(self, pipeline, branch) -> HeadShards | None:
        """Nodes of different sizes, named by no flag: each node's ranks of this CFG branch become one STADI member,
        Ulysses inside it (`--stadi_groups` of the nodes' sizes), where the family and its heads allow; otherwise
        flat STADI, as on equal nodes. Decided once from the node of every rank of the branch (torchrun's
        GROUP_RANK), gathered over it; xDiT orders a data-parallel index's CFG pair side by side, so both branches
        see the same runs and every rank decides alike. Returns the groups' head shards (None: flat)."""
        nodes: list = [None] * branch.world_size
        torch.distributed.all_gather_object(nodes, os.environ.get("GROUP_RANK"), group=branch.device_group)
        grouped = self.topology.grouped_by_nodes(nodes)
        if grouped is None:
            return None
        sizes = grouped.group_sizes
        try:
            shards = self._head_shards(pipeline, grouped)
        except StadiInputError as error:
            logger.info("STADI runs flat on nodes of different sizes %s: %s", list(sizes), error)
            return None
        logger.info("STADI groups from the nodes' sizes: %s (one member per node, Ulysses inside it; "
                    "--stadi_groups or --stadi_degree choose otherwise)", list(sizes))
        self.topology = grouped
        return shards

    def _head_shards(self, pipeline, topology: Topology) -> HeadShards:
        """The heads of each unequal group: for `--stadi_groups`, checked before xDiT builds its groups; for the
        nodes' own groups (`_groups_from_nodes`), once their sizes are known."""
        shown = ",".join(map(str, topology.group_sizes))
        if not self.ulysses_groups:
            raise StadiInputError(f"--stadi_groups {shown} cannot run {type(self).__name__}: its family does "
                                  "not run Ulysses inside STADI groups")
        heads = getattr(pipeline.transformer.config, "num_attention_heads", None)
        try:
            return HeadShards(topology.group_sizes, heads)
        except (TypeError, ValueError) as error:
            raise StadiInputError(f"--stadi_groups {shown} on {type(pipeline.transformer).__name__}: {error}") from None

    def _convert_transformer_backbone(self, transformer, *, enable_torch_compile: bool = False, cache_args=None,
                                      **kwargs):
        if any((cache_args or {}).get(key) for key in ("cache_method", "use_teacache", "use_fbcache")):
            # Not dropped silently: xDiT's runner applies the cache after compiling, and STADI steers it there.
            raise StadiInputError("step caching under --use_stadi runs through xDiT's model runner "
                                  "(stadi-xdit --model ... --cache_method teacache), not a pipeline's cache_args")
        self.injection = apply_injection(transformer, self.injection_plan, self.kv_store, self._stadi_runtime_state)
        # Under xDiT's runner its `_compile_model` compiles, later, in the mode that model picks.
        if enable_torch_compile and not self.served_by_runner:
            self.compiled = compile_blocks(transformer)
        return transformer

    def compile_transformer(self, mode: str | None = None) -> None:
        """--use_torch_compile: each transformer block's forward compiled (`runtime/compile.py`), in xDiT's `mode`."""
        if self.compiled is None:
            self.compiled = compile_blocks(self.module.transformer, mode)

    def attach_step_cache(self) -> None:
        """xDiT (or `step_cache.apply_cache_dit`) has applied `--cache_method` to the transformer (after compiling
        it, as its runner does): the loop steers that cache (`xdit/step_cache.py`). Each STADI member decides for
        its band: a rank alone, or a Ulysses group's ranks together. A CFG pair, whose two branches hold different
        predictions of the same band and would decide apart, is refused."""
        if self.topology.cfg_degree > 1:
            raise StadiInputError("--cache_method cannot be combined with --use_cfg_parallel under --use_stadi (each "
                                  "band's cache decides alone; the two branches of a band would decide apart)")
        self.step_cache = find_step_cache(self.module.transformer)
        if self.step_cache is None:
            raise StadiInputError(f"--cache_method: xDiT applied no step cache to "
                                  f"{type(self.module.transformer).__name__}")
        self.step_cache.decide_with(self.groups.sequence, self.module._execution_device)

    def compile_warmup_steps(self, num_steps: int) -> int:
        """Steps of a compile warmup call: STADI's warmup, then enough displaced steps that every rank computes
        one (a stride is at most --stadi_max_stride), so every code path is compiled before the timed calls."""
        warmup = self._warmup_steps(num_steps)
        return min(num_steps, warmup + (1 if self.stadi_config.exact else self.stadi_config.max_stride))

    @contextlib.contextmanager
    def compile_warmup(self):
        """A call that compiles: its forwards do not measure this rank's speed, so the call is neither
        remembered for the next call nor written to the profile cache. Logs the compile time and graphs."""
        graphs, start = compiled_graphs(), time.perf_counter()
        self._compiling_call = True
        try:
            yield
        finally:
            self._compiling_call = False
        logger.info("STADI torch.compile warmup: %.1f s, %d graphs compiled (mode %s, dynamic token counts)",
                    time.perf_counter() - start, compiled_graphs() - graphs, self.compiled and self.compiled.mode)

    def _convert_vae(self, vae):
        return vae if self.served_by_runner else super()._convert_vae(vae)

    def _convert_scheduler(self, scheduler):
        return to_subsequence_capable(scheduler)

    def use_naive_forward(self) -> bool:
        return False

    def is_dp_last_group(self) -> bool:
        """The one rank that returns decoded images.

        xDiT's example scripts save on it and number its images `get_data_parallel_rank() * per-group
        batch + i`, as data-parallel groups hold different prompts. A STADI group shares one batch, so
        this is STADI rank 0, whose images number 0..B-1 (rank 1's read as the second image of a batch).
        xDiT's model runner saves on its last process instead: under it, the last STADI rank.
        """
        if self.engine_config.runtime_config.use_parallel_vae:
            return get_world_group().rank == 0
        output_rank = self.topology.stadi_degree - 1 if self.served_by_runner else 0
        return (self.groups.member == output_rank and self.groups.cfg.rank == self.topology.cfg_degree - 1
                and self.groups.sequence_rank == (self.groups.sequence_size - 1 if self.served_by_runner else 0))

    def remove_stadi(self) -> None:
        """Give the transformer back exactly as it was before wrapping."""
        if self.compiled is not None:
            self.compiled.remove()
            self.compiled = None
        if self.injection is not None:
            self.injection.remove()
            self.injection = None
        for handle in self._progress_hooks:
            handle.remove()
        self._progress_hooks = []

    # --- helpers --------------------------------------------------------------------------
    @property
    def stadi_state(self) -> StadiRuntimeState:
        """This pipeline's xDiT runtime state (read only: `_start_call` installs it and sets the call's inputs)."""
        return self._stadi_runtime_state

    def _start_call(self, *, video: bool = False, **inputs: Any) -> None:
        """The call's input parameters (size, batch, steps) into this pipeline's xDiT runtime state, installed
        as xDiT's global first: xDiT's layers read the global, and xDiT's model runner installs a state of its
        own after loading the pipeline. Once per call, before `_geometry`."""
        state = self._stadi_runtime_state
        install_runtime_state(state)
        if video:
            state.set_video_input_parameters(**inputs)
        else:
            state.set_input_parameters(**inputs)

    def _profile_key(self, height: int, width: int) -> str:
        """Model, resolution and every rank's hardware; the same string on every rank of the run.

        The hardware part lists each STADI group (one per CFG branch) in rank order, so a cached
        entry is only reused on the same devices in the same rank positions.
        """
        transformer = self.module.transformer
        hardware = self.groups.gather_text(hardware_identity(), self.module._execution_device)
        return profile_key(type(transformer).__name__, transformer.config, height, width, hardware)

    def _set_store_budgets(self, device: torch.device, model: XditBandModel) -> None:
        """This call's store budgets (`_store_budget_bytes`); the store fits itself to them when it registers.
        A model that batches both CFG branches holds their K/V twice: one branch per rank would halve it."""
        store = self.kv_store
        store.memory_budgets, store.budget_source = _store_budget_bytes(self.stadi_config, store, self.groups.band,
                                                                        device)
        batched = bool(getattr(getattr(model, "cfg", None), "batched", False))
        store.budget_remedies = ("--use_cfg_parallel",) if batched else ()

    def _known_speeds(self, cached: dict | None) -> list[float] | None:
        if self.stadi_config.speeds:
            return list(self.stadi_config.speeds)
        return None if cached is None else cached["speeds"]

    def _cached_entry(self, key: str | None) -> dict | None:
        """The profile cache's entry for `key`: {"speeds": [...], "memory": {...} or None}.

        One rank reads, everyone uses its answer: ranks must agree on the warmup bands even when
        the file is not on a shared filesystem or is being replaced."""
        if self.stadi_config.speeds or not self.stadi_config.profile_cache or key is None:
            return None
        entry = None
        if self.groups.is_leader:
            entry = ProfileCache(self.stadi_config.profile_cache).load_entry(key, self.groups.members)
        return self.groups.from_leader(entry, self.module._execution_device)

    def _memory(self, size: tuple[int, int], cached: dict | None) -> CallMemory | None:
        """What this call starts from: the last calls of this size in this process, else the cache's."""
        if size in self._call_memory:
            return self._call_memory[size]
        if cached is None or cached.get("memory") is None:
            return None
        try:
            return CallMemory.from_json(cached["memory"], self.groups.members, self.groups.planning_branches,
                                        max_stride=self.stadi_config.max_stride)
        except ValueError as error:
            logger.warning("STADI: ignoring the profile cache's cost models (%s); measuring afresh", error)
            return None

    def _remember(self, key: str | None, size: tuple[int, int], result: DenoiseResult) -> None:
        """--stadi_replan calls/sync keep the call's memory for the next call of this size; the profile
        cache keeps the plan's speeds and the memory for later launches. A storage error only warns
        (inside `store`): the finished run's output is not lost. A compile warmup call measured compiling."""
        if self._compiling_call:
            return
        if result.memory is not None and self.stadi_config.replan != "off":
            self._call_memory[size] = result.memory
        if (self.stadi_config.profile_cache and key is not None and result.measured_speeds
                and self.groups.is_leader):
            memory = result.memory.to_json() if result.memory is not None else None
            ProfileCache(self.stadi_config.profile_cache).store(key, list(result.plan.speeds), memory=memory)

    def _geometry(self, height: int, width: int) -> BandGeometry:
        """Token rows of this image size: VAE scale and backbone patch as this pipeline's xDiT runtime state
        counts them (xDiT works them out from the pipeline when it is built)."""
        state = self.stadi_state
        scale, patch = state.vae_scale_factor, state.backbone_patch_size
        if height % (scale * patch) or width % (scale * patch):
            raise ValueError(f"--height/--width must be multiples of {scale * patch} px "
                             f"(VAE scale {scale} x patch {patch}), got {height}x{width}")
        rows = height // scale // patch
        # With Ulysses inside the STADI groups, every group's band splits into equal parts of whole rows.
        groups, align = self.groups.members, self.groups.align
        if rows < groups * align:
            sizes = self.groups.group_sizes
            ranks = (f"{groups} STADI ranks" if align == 1 else f"{groups} STADI groups x Ulysses {align}"
                     if len(set(sizes)) == 1 else f"{groups} STADI groups of {', '.join(map(str, sizes))} ranks")
            raise ValueError(f"--height {height} gives {rows} token rows, fewer than the {ranks}: use --height >= "
                             f"{groups * align * scale * patch}")
        return BandGeometry.of_rows(rows, patch, width // scale // patch, align)

    def _warmup_steps(self, num_steps: int) -> int:
        warmup = self.engine_config.runtime_config.warmup_steps
        if self.stadi_config.exact:
            return min(warmup, num_steps - 1) if num_steps > 1 else 0
        if warmup < 1 or warmup >= num_steps:
            raise ValueError(f"--warmup_steps must be in [1, num_inference_steps - 1] with --use_stadi, "
                             f"got {warmup} for {num_steps} steps")
        return warmup

    # True where callers expect an output object on every rank (xDiT's runner models built on plain
    # diffusers pipelines read `.images` everywhere); xDiT's own wrappers return None off the output rank.
    outputs_on_every_rank = False

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool,
                orig_size: tuple[int, int] | None = None):
        """The full latent decoded on the decoding rank(s), post-processed and returned on the output rank."""
        pipe = self.module
        if output_type == "latent":
            image = latents
        else:
            if self._decodes_here():
                heartbeat.phase("decode")
                image = self._decode(latents)
            if not self._returns_output_here():
                heartbeat.phase("idle")  # only waits for the output rank from here on
                if not self.outputs_on_every_rank:
                    return None
                return self._pipeline_output([]) if return_dict else ([],)
            image = self._postprocess(image, output_type, orig_size)
            heartbeat.phase("output")
        pipe.maybe_free_model_hooks()
        return self._pipeline_output(image) if return_dict else (image,)

    def _postprocess(self, decoded: torch.Tensor, output_type: str, orig_size: tuple[int, int] | None):
        """Decoded images as `output_type` (PixArt's resolution binning: cropped back to `orig_size`)."""
        processor = self.module.image_processor
        if orig_size is not None:
            decoded = processor.resize_and_crop_tensor(decoded, *orig_size)
        return processor.postprocess(decoded, output_type=output_type)

    def _decodes_here(self) -> bool:
        # distvae's decoder is collective: with --use_parallel_vae every rank decodes its part.
        return self.engine_config.runtime_config.use_parallel_vae or self.is_dp_last_group()

    def _returns_output_here(self) -> bool:
        """The output rank; with --use_parallel_vae under xDiT's runner every rank, since the runner saves
        on its last rank and after the collective decode every rank holds the whole image."""
        return self.is_dp_last_group() or (self.served_by_runner
                                           and self.engine_config.runtime_config.use_parallel_vae)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The full latent decoded to an image batch."""
        return self.module.vae.decode(self._latents_for_vae(latents), return_dict=False)[0]

    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The full latent as the VAE decoder takes it (PixArt: unscaled; Flux overrides: unpacked)."""
        return latents / self.module.vae.config.scaling_factor

    def _pipeline_output(self, images):
        return ImagePipelineOutput(images=images)

    def _stadi_denoise(self, latents: torch.Tensor, scheduler, model: XditBandModel, *, height: int, width: int,
                       num_steps: int) -> DenoiseResult:
        """`denoise()` with this pipeline's groups, geometry and profile cache; sets `last_result`."""
        geometry = self._geometry(height, width)
        key = self._profile_key(height, width) if self.stadi_config.profile_cache else None
        cached = self._cached_entry(key)
        self._set_store_budgets(latents.device, model)
        try:
            result = denoise(latents, scheduler, model, groups=self.groups, store=self.kv_store,
                             config=self.stadi_config, geometry=geometry, warmup_steps=self._warmup_steps(num_steps),
                             known_speeds=self._known_speeds(cached), memory=self._memory((height, width), cached),
                             positions=self.injection, step_cache=self.step_cache)
        except StoreDoesNotFit as error:  # every rank decides alike, before its store holds anything: one line
            raise StadiInputError(str(error)) from None
        self.kv_store.reset()
        self._remember(key, (height, width), result)
        self.last_result = result
        if self.is_dp_last_group():
            log_plan(result)
        planned = executed_evals(result.plan, result.replans, self.groups.member)  # warmup included
        part = f" (Ulysses rank {self.groups.sequence_rank})" if self.groups.sequence_size > 1 else ""
        logger.info("STADI rank %d%s: %d model evaluations (plan: %d)%s", self.groups.member, part, result.num_evals,
                    planned, f", {result.cached_forwards} served by the step cache" if self.step_cache is not None else "")
        return result


def _store_budget_bytes(config: StadiConfig, store: DisplacedKVStore, comm: BandComm,
                        device: torch.device) -> tuple[tuple[float | None, ...] | None, str]:
    """What each band rank's displaced K/V store may hold (`planner.memory`), and where that came from:
    `--stadi_memory_budget`, else on CUDA each rank's free memory (plus what its store already holds),
    exchanged so that every rank fits the same store; None on CPU without the flag, and in exact mode."""
    if config.exact:
        return None, ""
    if config.memory_budget is not None:
        return tuple(gib * GIB for gib in config.memory_budget), "--stadi_memory_budget"
    if device.type != "cuda":
        return None, ""
    free, _ = torch.cuda.mem_get_info(device)
    return tuple(comm.all_gather_floats(float(free + store.memory_bytes()), device)), \
        f"--use_stadi (free memory on {device})"


class DiffusersPipelineWrapper(xFuserPipelineBaseWrapper):
    """xFuser-style wrapper of a diffusers pipeline that xfuser 0.7.0 has no wrapper for.

    It gives such a family (Qwen-Image, Wan) xDiT's construction path, so the STADI twin subclasses
    it as the other twins subclass xDiT's wrappers. Without STADI it serves only the single-process
    path (the diffusers pipeline itself), as xDiT's naive forward does.
    """

    diffusers_class: type  # set by each wrapper

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, engine_config, return_org_pipeline: bool = False,
                        **kwargs):
        pipeline = cls.diffusers_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return pipeline if return_org_pipeline else cls(pipeline, engine_config)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        if not self.use_naive_forward():
            raise ValueError(f"xfuser has no parallel {self.diffusers_class.__name__}; use --use_stadi")
        return self.module(*args, **kwargs)
