"""torch.compile under STADI (`--use_torch_compile` with `--use_stadi`): each transformer block's forward is
compiled; the displaced K/V store, the launcher's progress hooks and the loop stay eager.

Why per block, not the whole transformer as xDiT's runner does without caching: a band model's forward
slices positions, picks its band and talks to the store, and dynamo breaks the graph at each of those;
per block the traced region is exactly the block's tensor work (tiny Flux on 2 ranks, inductor on CPU:
whole transformer 71 s first call and 36 graphs, per block 24 s and 17 graphs). Blocks of one class share
their compiled code (the second block generalizes the first one's graph), so a 57-block Flux compiles a few
graphs per block class, not one per block. Only the block's `forward` is compiled, so the module hooks (the
launcher's progress beat) run eagerly around it.

Why `dynamic=True` without duck shapes: a rank's band changes size a few times per call (warmup bands, the
plan's bands, a re-plan), and bands differ across ranks and calls. Symbolic token counts from the first
compile mean one compile per code path and no recompile when a band changes. Duck shaping would tie a band's
token count to any other dimension it happens to equal on the first compile (a 24-token band and a 24-wide
head) and recompile when they part, so it is off for these frames. `tests/test_compile.py` counts graphs
with dynamo's own counters across warmup, plan and re-plan bands.

Why no CUDA graphs: a CUDA-graph mode (`reduce-overhead`, `max-autotune`) returns its outputs in a pool
that the next replay overwrites, but the store keeps a layer's fresh K/V across steps as the next steps'
stale K/V. So those modes run as their no-CUDA-graph equivalent under STADI, with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config

from stadi_xdit.runtime import heartbeat

logger = logging.getLogger(__name__)

# xDiT's runner picks the mode per model (Flux: reduce-overhead on CUDA); under STADI each CUDA-graph mode
# runs as its equivalent without CUDA graphs.
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
MODES = ("default", "max-autotune-no-cudagraphs")


def stadi_compile_mode(mode: str | None) -> str:
    """The torch.compile mode STADI runs for xDiT's `mode` (None: torch's default)."""
    asked = mode or "default"
    mode = WITHOUT_CUDA_GRAPHS.get(asked, asked)
    if mode != asked:
        logger.info("STADI runs torch.compile mode %s as %s: CUDA graphs reuse the output buffers whose K/V the "
                    "displaced store keeps across steps", asked, mode)
    if mode not in MODES:
        raise ValueError(f"--use_torch_compile mode {mode!r} cannot run under --use_stadi; it runs {', '.join(MODES)}")
    return mode


def transformer_blocks(transformer: nn.Module) -> Iterator[nn.Module]:
    """Every block of the transformer's top-level block lists (Flux: both; Wan: `blocks`), in order."""
    for child in transformer.children():
        if isinstance(child, nn.ModuleList):
            yield from child


@dataclass
class CompiledBlocks:
    """Blocks whose forward is compiled (`remove()` gives each its own forward back)."""

    blocks: list[nn.Module]
    mode: str

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.blocks = []


def compile_blocks(transformer: nn.Module, mode: str | None = None) -> CompiledBlocks:
    """Compile each block's forward in place (lazily: the first call compiles); `mode` as xDiT's runner picks it."""
    mode = stadi_compile_mode(mode)
    blocks = list(transformer_blocks(transformer))
    if not blocks:
        raise ValueError(f"--use_torch_compile under --use_stadi compiles transformer blocks, and "
                         f"{type(transformer).__name__} has no block list")
    count_compiling_as_work()
    for block in blocks:
        block.forward = _CompiledForward(block.forward, mode)
    return CompiledBlocks(blocks, mode)


class _CompiledForward:
    """A block's forward compiled with symbolic sizes; its frames compile without duck shapes (the config is
    read when a frame compiles, inside the call)."""

    def __init__(self, forward: Callable[..., Any], mode: str):
        self.compiled = torch.compile(forward, mode=mode, dynamic=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Plain writes, not the config's `patch()`: this runs on every block's forward (5 us against 30 us).
        duck = fx_config.use_duck_shape
        fx_config.use_duck_shape = False
        try:
            return self.compiled(*args, **kwargs)
        finally:
            fx_config.use_duck_shape = duck


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


_registered = [False]


def count_compiling_as_work() -> None:
    """While dynamo and inductor compile (minutes for a large model on its first forward, in this process and
    in inductor's compile workers), the heartbeat counts their CPU time as progress: a compiling rank is
    working, not stalled. Registered once per process."""
    if _registered[0]:
        return
    from torch._dynamo.callback import callback_handler

    callback_handler.register_start_callback(lambda _args: heartbeat.count_process_work(True))
    callback_handler.register_end_callback(lambda _args: heartbeat.count_process_work(False))
    _registered[0] = True
