"""xDiT's step caches under STADI: `--cache_method teacache|fbcache|dbcache`, steered by the loop.

In-tree (teacache, fbcache): xDiT applies the cache itself (`xFuserModel._apply_step_cache`, after
torch.compile): it replaces the transformer's block lists with one `CachedTransformerBlocks` module. This
file only finds those modules (`XditStepCache`).

cache-dit (dbcache, and fbcache where the model's settings name cache-dit's engine): xDiT's
`apply_cache_dit_cache` also makes every rank agree on each decision over the world group, and refuses a
data-parallel degree above 1 (STADI's slot) for that reason. So `apply_cache_dit` builds the same adapter
and config from the model's `DBCacheSettings` with xDiT's own builders and enables cache-dit without the
agreement; `CacheDitStepCache` then steers cache-dit's contexts.

Both give the loop the `StepCache` controls it needs:

* **Each STADI member decides for its own band.** Flat, the sequence-parallel degree is 1, so xfuser's
  `l1_distance` compares this rank's band with its own last computed forward; no collective runs.
  Between sync points the members are independent anyway, and a cached forward only changes how fresh
  their K/V are: the store then publishes the K/V of the last forward that computed them.
* **A Ulysses group decides as one** (`--ulysses_degree`, `--stadi_groups`): its ranks hold parts of one
  band and meet in every attention's all-to-all, so a rank that served a forward while its peers computed
  it would leave them waiting. xfuser's in-tree caches already average the difference over xDiT's
  sequence-parallel group, as xDiT's own Ulysses does; over groups of unequal sizes, which STADI builds
  itself, they average over STADI's group instead (`decide_with`). cache-dit decides on each rank from its
  own part; the group then serves a forward only where every one of its ranks would (`decide_with`): one
  all-gather of a flag per decision.
* **Where it may not.** Synchronous steps (warmup, exact mode) gather every layer's K/V from every
  rank, so all of them must run; the rank's last forward finishes its band. The loop sets the threshold
  to 0 there (nothing is ever under it), and restores it for the displaced forwards.
* **A new band or a new call forgets.** The remembered input and residual hold the old band's tokens;
  the first forward after it computes, the next may be served.
* **cache-dit counts steps; the loop tells it which.** Its warmup steps and step masks (xDiT's presets
  compute the first steps and a `scm_policy`'s steps in full) index the denoising grid, so each forward
  is told its scheduler index: a stride-2 rank's forwards are at every other step. Its TaylorSeer
  calibrator extrapolates over the rank's own forwards, which are evenly spaced within a band.
  Every STADI family runs both CFG branches in one forward, so cache-dit's separate-CFG counting is off.
"""

from __future__ import annotations

from typing import Any

import torch
from xfuser.model_executor.cache.utils import CachedTransformerBlocks

from stadi_xdit.cli_errors import StadiInputError
from stadi_xdit.runtime.comm import BandComm

STADI_CACHE_METHODS = ("teacache", "fbcache", "dbcache")


class XditStepCache:
    """The `CachedTransformerBlocks` of one transformer, as the loop's `StepCache`."""

    def __init__(self, blocks: list[CachedTransformerBlocks]):
        if not blocks:
            raise ValueError("no step-cached blocks to steer")
        self.blocks = blocks
        self.thresholds = [float(block.rel_l1_thresh) for block in blocks]  # as xDiT configured them

    @classmethod
    def find(cls, transformer: torch.nn.Module) -> XditStepCache | None:
        """The cache xDiT applied to `transformer`, or None where it applied none."""
        blocks = [module for module in transformer.modules() if isinstance(module, CachedTransformerBlocks)]
        return cls(blocks) if blocks else None

    def reset(self) -> None:
        for block in self.blocks:
            context = block.cache_context
            context.modulated_inputs = None
            context.hidden_states_residual = None
            context.encoder_hidden_states_residual = None
            block.use_cache = torch.zeros_like(block.use_cache)
            block.accumulated_rel_l1_distance = torch.zeros_like(block.accumulated_rel_l1_distance)
            # TeaCache's step count. Its step-0 rule computes a call's first forward, whose previous input is
            # the last call's; here there is none, so the next forward computes anyway. Count 0 would
            # compute the one after it too, for nothing.
            block.cnt = torch.ones_like(block.cnt)

    def begin_forward(self, step: int, may_serve: bool) -> None:
        # xDiT's caches count forwards, not steps: nothing they decide depends on the grid's index.
        for block, threshold in zip(self.blocks, self.thresholds):
            block.rel_l1_thresh.fill_(threshold if may_serve else 0.0)

    def last_forward_cached(self) -> bool:
        return any(bool(block.use_cache) for block in self.blocks)

    def decide_with(self, group: BandComm | None, device: torch.device) -> None:
        """Let the ranks of `group` (a Ulysses group; None: none) decide as one. xfuser's `l1_distance` averages
        over xDiT's sequence-parallel group, which is that group where xDiT built it (`--ulysses_degree`). Groups
        of unequal sizes are STADI's own (xDiT's is flat): there the blocks average over `group` instead."""
        from xfuser.core.distributed import get_sequence_parallel_world_size

        if group is None or group.world_size == 1 or get_sequence_parallel_world_size() == group.world_size:
            return

        def all_reduce(value: torch.Tensor, op=torch.distributed.ReduceOp.AVG) -> torch.Tensor:
            if op != torch.distributed.ReduceOp.AVG:  # l1_distance averages; nothing else reduces here
                raise ValueError(f"a STADI group's step cache averages, got {op}")
            values = group.all_gather_floats(float(value), device)
            return torch.full_like(value, sum(values) / len(values))

        for block in self.blocks:
            block.all_reduce = all_reduce  # on this instance: its l1_distance calls it for the difference and norm


def cache_dit_settings(step_cache_config: dict | None, method: str | None) -> Any:
    """The model's `DBCacheSettings` for `method` where cache-dit's engine runs it (dbcache, and fbcache where
    the model's runner entry says so); None where xDiT's in-tree engine does, or the model lists no method."""
    from xfuser.model_executor.cache.presets import DBCacheSettings

    settings = (step_cache_config or {}).get(method)
    return settings if isinstance(settings, DBCacheSettings) else None


def apply_cache_dit(pipe: Any, transformer: torch.nn.Module, settings: Any, num_steps: int,
                    cache_config: str | None) -> None:
    """cache-dit's DBCache on `transformer` as xDiT's `apply_cache_dit_cache` builds it from the model's
    `DBCacheSettings` (its adapter, its preset, `--cache_config` over both), without xDiT's agreement of
    every rank on each decision: under STADI each rank decides for its own band."""
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, enable_cache
    from xfuser.model_executor.cache.adapters import cache_dit as xdit_cache_dit

    if isinstance(settings.adapter, list):
        raise StadiInputError("--cache_method with --use_stadi: a model of several transformers (cache-dit "
                              "adapters for each) is not served")
    adapter = xdit_cache_dit._build_adapter(transformer, pipe, settings.adapter, BlockAdapter, ForwardPattern)
    config, calibrator = xdit_cache_dit._build_config(num_steps=num_steps, preset_kwargs=settings.preset,
                                                      cache_config_json=cache_config, enable_separate_cfg=False,
                                                      DBCacheConfig=DBCacheConfig)
    transformer._is_parallelized = False  # no sequence parallelism inside a STADI rank
    enable_cache(adapter, cache_config=config, **({"calibrator_config": calibrator} if calibrator else {}))


class CacheDitStepCache:
    """cache-dit's contexts of one transformer (`enable_cache` put them there), as the loop's `StepCache`.

    Its contexts are made anew at each call (cache-dit wraps the pipeline's `__call__`), so they are
    looked up by name at each forward. The manager's decision is wrapped on this instance only: it
    decides only where the loop allows, and compares this rank's band alone (cache-dit would average the
    difference over the world group whenever the world has more than one rank)."""

    def __init__(self, manager: Any, names: list[str]):
        if not names:
            raise ValueError("no cache-dit contexts to steer")
        self.manager, self.names = manager, list(names)
        self.may_serve = False
        self.group: BandComm | None = None  # the Ulysses group that decides as one (None: this rank alone)
        self.device = torch.device("cpu")
        decide, compare = manager.can_cache, manager.similarity

        def can_cache(*args, **kwargs) -> bool:
            if not self.may_serve:  # alike on every rank of a group: no decision, no collective
                return False
            serve = bool(decide(*args, **kwargs))
            if self.group is not None:
                serve = min(self.group.all_gather_floats(float(serve), self.device)) > 0
            return serve

        def similarity(*args, **kwargs) -> bool:
            return compare(*args, **{**kwargs, "parallelized": False})

        manager.can_cache, manager.similarity = can_cache, similarity

    def decide_with(self, group: BandComm | None, device: torch.device) -> None:
        """Let the ranks of `group` (a Ulysses group; None: none) serve a forward only where all of them would."""
        self.group = group if group is not None and group.world_size > 1 else None
        self.device = device

    @classmethod
    def find(cls, transformer: torch.nn.Module) -> CacheDitStepCache | None:
        """The cache-dit cache enabled on `transformer`, or None where there is none; found twice, the same
        steering (a second wrapper around the manager's decision would never let it serve)."""
        manager = getattr(transformer, "_context_manager", None)
        if manager is None:
            return None
        if getattr(manager, "_stadi_step_cache", None) is None:
            manager._stadi_step_cache = cls(manager, getattr(transformer, "_context_names", []))
        return manager._stadi_step_cache

    def _contexts(self) -> list[Any]:
        return [self.manager.get_context(name) for name in self.names]

    def reset(self) -> None:
        for context in self._contexts():
            context.clear_buffers()
            calibrators = (*context.get_calibrators(), *context.get_cfg_calibrators()) if context.has_calibrators() else ()
            for calibrator in calibrators:
                if calibrator is not None:
                    calibrator.reset_cache()

    def begin_forward(self, step: int, may_serve: bool) -> None:
        self.may_serve = may_serve
        for context in self._contexts():
            # cache-dit's `mark_step_begin` counts one forward on: this forward is then at `step`.
            context.executed_steps = context.transformer_executed_steps = step

    def last_forward_cached(self) -> bool:
        return any(context.get_cached_steps()[-1:] == [context.get_current_step()] for context in self._contexts())


def cache_dit_served(transformer: torch.nn.Module) -> int:
    """The forwards of the last call that cache-dit's cache on `transformer` served (its contexts keep them
    until the next call begins)."""
    manager = transformer._context_manager
    return sum(len(manager.get_context(name).get_cached_steps()) for name in transformer._context_names)


def find_step_cache(transformer: torch.nn.Module) -> XditStepCache | CacheDitStepCache | None:
    """The step cache on `transformer` (xDiT's in-tree one or cache-dit's), or None."""
    return XditStepCache.find(transformer) or CacheDitStepCache.find(transformer)
