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

    def label(self, world: int) -> str:
        return self.title.format(n=world)


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
    )
}
ARM_ORDER = tuple(ARMS)
# What runs without --arms: everything but the adaptive variants (ask for those by name).
DEFAULT_ARMS = tuple(name for name in ARM_ORDER if ARMS[name].replan == "off")
XDIT_ARMS = ("ulysses", "ring", "pipefusion")


# stadi-bench --preset -> its shape, as the families declare them (FamilySpec.bench)
PRESET_SHAPES: dict[str, BenchShape] = bench_shapes()
