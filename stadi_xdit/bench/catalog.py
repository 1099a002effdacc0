"""What `stadi-bench` can run, without torch: its arms and its presets' shapes.

Argument validation reads this module only, so a bad flag is refused in milliseconds and before
torch or diffusers print anything; `arms.py` and `presets.py` build on the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass

PATCH_SIZE = 2  # PixArt patchify / Flux 2x2 packing, in latent rows
VAE_SCALE = 8
ROW_PX = VAE_SCALE * PATCH_SIZE  # image px per token row


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "single" | "stadi" | "xdit"
    title: str  # for tables and plots; "{n}" becomes the world size

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
    )
}
ARM_ORDER = tuple(ARMS)
XDIT_ARMS = ("ulysses", "ring", "pipefusion")


@dataclass(frozen=True)
class PresetShape:
    family: str  # "pixart" | "flux"; the model preset of that name in stadi_xdit.testing.tiny
    variant: str  # PixArt: "alpha" | "sigma"; Flux: "dev"
    height: int  # default resolution (square)
    text_tokens: int  # length of the stand-in prompt embeddings


PRESET_SHAPES: dict[str, PresetShape] = {
    "tiny": PresetShape("pixart", "alpha", 128, 8),
    "small": PresetShape("pixart", "alpha", 512, 8),
    "pixart-alpha-1024": PresetShape("pixart", "alpha", 1024, 120),
    "pixart-sigma-1024": PresetShape("pixart", "sigma", 1024, 300),
    "flux-dev-1024": PresetShape("flux", "dev", 1024, 512),
}
