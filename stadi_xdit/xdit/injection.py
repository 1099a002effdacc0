"""Removable injection of STADI into a diffusers transformer, from a per-model declarative plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from xfuser.model_executor.layers.embeddings import xFuserPatchEmbedWrapper

from stadi_xdit.runtime.kv import DisplacedKVStore


@dataclass(frozen=True)
class InjectionPlan:
    """Which parts of one model family STADI replaces."""

    # Attribute of the transformer holding its PatchEmbed; wrapped by xDiT's own patch-embed
    # wrapper, which slices positional embeddings by the band's global token range.
    patch_embed_attr: str | None
    # The attention modules whose K/V are displaced, in a fixed order (the layer ids).
    displaced_attention: Callable[[nn.Module], list[nn.Module]]
    processor_factory: Callable[[DisplacedKVStore, int], object]


class Injection:
    """Handle returned by `apply_injection`; `remove()` restores the model exactly."""

    def __init__(self, transformer: nn.Module, plan: InjectionPlan, store: DisplacedKVStore):
        self.transformer = transformer
        self._saved_processors: list[tuple[nn.Module, object]] = []
        self._saved_patch_embed: nn.Module | None = None
        if plan.patch_embed_attr is not None:
            original = getattr(transformer, plan.patch_embed_attr)
            self._saved_patch_embed = original
            setattr(transformer, plan.patch_embed_attr, xFuserPatchEmbedWrapper(original))
        self._patch_embed_attr = plan.patch_embed_attr
        for layer, attention in enumerate(plan.displaced_attention(transformer)):
            self._saved_processors.append((attention, attention.processor))
            attention.set_processor(plan.processor_factory(store, layer))

    def remove(self) -> None:
        for attention, processor in self._saved_processors:
            attention.set_processor(processor)
        self._saved_processors.clear()
        if self._saved_patch_embed is not None:
            setattr(self.transformer, self._patch_embed_attr, self._saved_patch_embed)
            self._saved_patch_embed = None


def apply_injection(transformer: nn.Module, plan: InjectionPlan, store: DisplacedKVStore) -> Injection:
    """Route `transformer`'s displaced attention through `store`; undo with `.remove()`."""
    return Injection(transformer, plan, store)
