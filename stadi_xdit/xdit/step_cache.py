"""xDiT's step caches under STADI: `--cache_method teacache|fbcache`, steered by the loop.

xDiT applies the cache itself (`xFuserModel._apply_step_cache`, after torch.compile): it replaces the
transformer's block lists with one `CachedTransformerBlocks` module (xfuser's in-tree TeaCache or
FBCache). This file only finds those modules and gives the loop the `StepCache` controls it needs:

* **Each rank decides for its own band.** Under STADI the sequence-parallel degree is 1, so xfuser's
  `l1_distance` compares this rank's band with its own last computed forward; no collective runs.
  Between sync points the ranks are independent anyway, and a cached forward only changes how fresh
  this rank's K/V are: the store then publishes the K/V of the last forward that computed them.
* **Where it may not.** Synchronous steps (warmup, exact mode) gather every layer's K/V from every
  rank, so all of them must run; the rank's last forward finishes its band. The loop sets the threshold
  to 0 there (nothing is ever under it), and restores it for the displaced forwards.
* **A new band or a new call forgets.** The remembered input and residual hold the old band's tokens;
  the first forward after it computes, the next may be served.
"""

from __future__ import annotations

import torch
from xfuser.model_executor.cache.utils import CachedTransformerBlocks

# The engines xDiT runs in-tree per rank. `dbcache` (cache-dit) synchronises its decision over the
# world group, which STADI's ranks reach at different steps.
STADI_CACHE_METHODS = ("teacache", "fbcache")


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

    def allow(self, allowed: bool) -> None:
        for block, threshold in zip(self.blocks, self.thresholds):
            block.rel_l1_thresh.fill_(threshold if allowed else 0.0)

    def last_forward_cached(self) -> bool:
        return any(bool(block.use_cache) for block in self.blocks)
