"""What `stadi-bench` can run, without torch: its arms and its presets' shapes.

Argument validation reads this module only, so a bad flag is refused in milliseconds and before
torch or diffusers print anything; `arms.py` and `presets.py` build on the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from stadi_xdit.families import BenchShape, bench_shapes


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "single" | "stadi" | "xdit"
    title: str  # for tables and plots; "{n}" becomes the world size
    mode: str | None = None  # STADI arms: --stadi_mode (default: the arm's name)
    replan: str = "off"  # STADI arms: --stadi_replan
    compiled: bool = False  # --use_torch_compile: each transformer block compiled, as STADI compiles them
    cache: str | None = None  # --cache_method: xDiT's in-tree step cache on the transformer (Flux only)
    ulysses: int = 1  # STADI arms: --ulysses_degree (each STADI member a group of this many Ulysses ranks)

    def label(self, world: int) -> str:
        return self.title.format(n=world)

    @property
    def eager(self) -> str:
        """The same arm uncompiled (its own name for an eager arm): what a compiled arm's speedup is against."""
        return self.name.removesuffix(COMPILED)

    @property
    def uncached(self) -> str:
        """The same arm without its step cache: what a cached arm's speedup is against."""
        return self.name.removesuffix(self.suffix)

    @property
    def suffix(self) -> str:
        """`+compile` for a compiled arm, `+teacache` (its method) for a cached one, else nothing: the suffix of
        the arms it is compared with."""
        return COMPILED if self.compiled else f"+{self.cache}" if self.cache else ""


COMPILED = "+compile"


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("single", "single", "single rank"),
        Arm("uniform", "stadi", "STADI uniform"),
        Arm("ulysses", "xdit", "xDiT Ulysses-{n}"),
        Arm("ring", "xdit", "xDiT Ring-{n}"),
        Arm("pipefusion", "xdit", "xDiT PipeFusion-{n}"),
        Arm("spatial", "stadi", "STADI spatial"),
        Arm("full", "stadi", "STADI full"),
        # Adaptive STADI (--stadi_replan): measured against `full` (replan off) under changing load.
        Arm("full-calls", "stadi", "STADI full, replan calls", mode="full", replan="calls"),
        Arm("full-sync", "stadi", "STADI full, replan sync", mode="full", replan="sync"),
        # torch.compile (issue 24): each compared with its eager arm, and with the other compiled arms.
        Arm("single+compile", "single", "single rank, compiled", compiled=True),
        Arm("uniform+compile", "stadi", "STADI uniform, compiled", mode="uniform", compiled=True),
        Arm("full+compile", "stadi", "STADI full, compiled", mode="full", compiled=True),
        # Step caching (issue 24): xDiT's TeaCache, each compared with its uncached arm and the other cached arms.
        Arm("single+teacache", "single", "single rank, TeaCache", cache="teacache"),
        Arm("uniform+teacache", "stadi", "STADI uniform, TeaCache", mode="uniform", cache="teacache"),
        Arm("full+teacache", "stadi", "STADI full, TeaCache", mode="full", cache="teacache"),
        Arm("full-calls+teacache", "stadi", "STADI full, replan calls, TeaCache", mode="full", replan="calls",
            cache="teacache"),
        # xDiT's in-tree FBCache (first-block cache), the same way.
        Arm("single+fbcache", "single", "single rank, FBCache", cache="fbcache"),
        Arm("uniform+fbcache", "stadi", "STADI uniform, FBCache", mode="uniform", cache="fbcache"),
        Arm("full+fbcache", "stadi", "STADI full, FBCache", mode="full", cache="fbcache"),
        # STADI over sequence-parallel groups (issue 23): each member 2 Ulysses ranks; against xDiT's Ulysses on
        # the same ranks and flat STADI.
        Arm("full-ulysses2", "stadi", "STADI full over Ulysses-2 groups", mode="full", ulysses=2),
    )
}
ARM_ORDER = tuple(ARMS)
# What runs without --arms: everything but the adaptive, compiled, cached and grouped variants (ask for those by
# name).
DEFAULT_ARMS = tuple(name for name in ARM_ORDER if ARMS[name].replan == "off" and not ARMS[name].compiled
                     and not ARMS[name].cache and ARMS[name].ulysses == 1)
XDIT_ARMS = ("ulysses", "ring", "pipefusion")


# stadi-bench --preset -> its shape, as the families declare them (FamilySpec.bench)
PRESET_SHAPES: dict[str, BenchShape] = bench_shapes()
