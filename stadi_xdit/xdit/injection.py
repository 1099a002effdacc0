"""Removable injection of STADI into a diffusers transformer, from a per-model declarative plan.

A family declares three things (`InjectionPlan`): the attention modules whose K/V are displaced, the
processor that runs them, and how its positions reach a band (`positions`), one of:

- `PatchEmbedPositions`: xDiT's patch-embed wrapper slices the position table by the band's global tokens,
  which it reads from xDiT's runtime state (PixArt, SD3);
- `SlicedPositions`: ids or RoPE tables of the whole image, sliced by family code with `BandView.positions`
  (Flux's `img_ids` in its band model, Qwen-Image's RoPE table in its processor);
- `RopeSwap`: the transformer's RoPE module stands in for one that returns the band's rows of the whole
  clip's table (Wan's `BandRope`).

`apply_injection` attaches all of it and returns the handle whose `set_band` the loop calls with each new
`BandView`, and whose `remove` gives the transformer back exactly as it was.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from xfuser.model_executor.layers.embeddings import xFuserPatchEmbedWrapper

from stadi_xdit.runtime.kv import DisplacedKVStore
from stadi_xdit.runtime.layout import BandView
from stadi_xdit.xdit.runtime_state import StadiRuntimeState, install_runtime_state


class AttachedPositions:
    """A family's positions on one transformer: told each band, removed with the injection."""

    def set_band(self, band: BandView) -> None:
        """`band` is current."""

    def remove(self) -> None:
        """Give the transformer back its own modules."""


@dataclass(frozen=True)
class PatchEmbedPositions:
    """`transformer.<attr>` (a PatchEmbed) is wrapped by xDiT's patch-embed wrapper, which slices the
    (cropped) sincos table by the band's global tokens, read from xDiT's runtime state: each band's layout
    is written there, once per layout."""

    attr: str

    def attach(self, transformer: nn.Module, state: StadiRuntimeState | None) -> AttachedPositions:
        return _WrappedPatchEmbed(transformer, self.attr, state)


@dataclass(frozen=True)
class SlicedPositions:
    """Positions enter as ids or RoPE tables of the whole image; `sliced_by` names the family code that slices
    them with `BandView.positions`. Nothing is attached."""

    sliced_by: str

    def attach(self, transformer: nn.Module, state: StadiRuntimeState | None) -> AttachedPositions:
        return AttachedPositions()


@dataclass(frozen=True)
class RopeSwap:
    """`transformer.<attr>` is replaced by `band_rope(original)`, a module that returns the band's rows of the
    whole clip's table; it must have a `band` attribute (the current `BandView`)."""

    attr: str
    band_rope: Callable[[nn.Module, nn.Module], nn.Module]  # (transformer, its RoPE module) -> stand-in

    def attach(self, transformer: nn.Module, state: StadiRuntimeState | None) -> AttachedPositions:
        return _SwappedRope(transformer, self)


BandPositions = PatchEmbedPositions | SlicedPositions | RopeSwap


class _WrappedPatchEmbed(AttachedPositions):
    def __init__(self, transformer: nn.Module, attr: str, state: StadiRuntimeState | None):
        self.transformer, self.attr, self.state = transformer, attr, state
        self.original = getattr(transformer, attr)
        setattr(transformer, attr, xFuserPatchEmbedWrapper(self.original))

    def set_band(self, band: BandView) -> None:
        if self.state is None:
            raise RuntimeError(f"{self.attr}: xDiT's patch-embed wrapper needs the pipeline's runtime state")
        # xDiT's runner re-initialises the global runtime state after loading: the wrapper must read ours.
        install_runtime_state(self.state)
        self.state.apply_layout(band.layout, band.rank)

    def remove(self) -> None:
        setattr(self.transformer, self.attr, self.original)


class _SwappedRope(AttachedPositions):
    def __init__(self, transformer: nn.Module, swap: RopeSwap):
        self.transformer, self.attr = transformer, swap.attr
        self.original = getattr(transformer, swap.attr)
        self.module = swap.band_rope(transformer, self.original)
        setattr(transformer, swap.attr, self.module)

    def set_band(self, band: BandView) -> None:
        self.module.band = band

    def remove(self) -> None:
        if getattr(self.transformer, self.attr) is self.module:
            setattr(self.transformer, self.attr, self.original)


@dataclass(frozen=True)
class InjectionPlan:
    """Which parts of one model family STADI replaces, and how its positions reach a band."""

    positions: BandPositions
    # The attention modules whose K/V are displaced, in a fixed order (the layer ids).
    displaced_attention: Callable[[nn.Module], list[nn.Module]]
    processor_factory: Callable[[DisplacedKVStore, int], object]


class Injection:
    """Handle returned by `apply_injection`; `set_band` follows the loop's layouts, `remove()` restores the
    model exactly."""

    def __init__(self, transformer: nn.Module, plan: InjectionPlan, store: DisplacedKVStore,
                 state: StadiRuntimeState | None):
        self.transformer = transformer
        self._own_forward = False
        if store.sequence is not None and store.sequence.world_size > 1:
            # STADI splits a group's band over its Ulysses ranks itself: xDiT's runner loads Flux, Qwen-Image and
            # Wan as sequence-parallel subclasses whose forward would split each rank's part again.
            forward = _diffusers_forward(transformer)
            if forward is not None:
                transformer.forward = types.MethodType(forward, transformer)
                self._own_forward = True
        self._saved_processors: list[tuple[nn.Module, object]] = []
        self.positions = plan.positions.attach(transformer, state)
        attentions = plan.displaced_attention(transformer)
        self._processors = []
        for layer, attention in enumerate(attentions):
            self._saved_processors.append((attention, attention.processor))
            self._processors.append(plan.processor_factory(store, layer))
            attention.set_processor(self._processors[-1])
        store.expected_layers = len(attentions)  # the store's size before its first forward (plans that fit)

    def set_band(self, band: BandView) -> None:
        """`band` (what this rank computes) is current: for the positions, and for processors that slice their own
        (`SlicedPositions`)."""
        self.positions.set_band(band)
        for processor in self._processors:
            processor.set_band(band)

    def remove(self) -> None:
        for attention, processor in self._saved_processors:
            attention.set_processor(processor)
        self._saved_processors.clear()
        self._processors.clear()
        if self._own_forward:
            del self.transformer.forward  # the class's forward again
            self._own_forward = False
        if self.positions is not None:
            self.positions.remove()
            self.positions = None


def _diffusers_forward(transformer: nn.Module) -> Callable | None:
    """The forward of the diffusers model class that `transformer`'s class derives from, where that class (an xDiT
    sequence-parallel subclass) overrides it; None where the transformer already runs diffusers' own forward."""
    for cls in type(transformer).__mro__:
        if cls.__module__.startswith("diffusers.") and "forward" in cls.__dict__:
            return None if cls.forward is type(transformer).forward else cls.forward
    return None


def apply_injection(transformer: nn.Module, plan: InjectionPlan, store: DisplacedKVStore,
                    state: StadiRuntimeState | None = None) -> Injection:
    """Route `transformer`'s displaced attention through `store` and its positions through `plan.positions`
    (`state`: the pipeline's xDiT runtime state, which xDiT's patch-embed wrapper reads); undo with `.remove()`."""
    return Injection(transformer, plan, store, state)
