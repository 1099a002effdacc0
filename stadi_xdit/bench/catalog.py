"""What `stadi-bench` can run, without torch: its arms and its presets' shapes.

Argument validation reads this module only, so a bad flag is refused in milliseconds and before
torch or diffusers print anything; `arms.py` and `presets.py` build on the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from stadi_xdit.geometry import TOKEN_ROW_PX, latent_frames

PATCH_SIZE = 2  # PixArt patchify / Flux 2x2 packing, in latent rows
VAE_SCALE = 8  # VAE_SCALE x PATCH_SIZE = TOKEN_ROW_PX (Wan: VAE 8 x spatial patch 2 as well)


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


@dataclass(frozen=True)
class PresetShape:
    family: str  # "pixart" | "flux" | "wan"
    variant: str  # PixArt: "alpha" | "sigma"; Flux: "dev"; Wan: "t2v"
    height: int  # default height in px
    text_tokens: int  # length of the stand-in prompt embeddings
    model: str | None = None  # the family's model preset (stadi_xdit.families.<family>; default: this preset's name)
    width: int | None = None  # default width in px (None: square); --height keeps the aspect ratio
    num_frames: int | None = None  # video: default frames of the clip (4k+1); None: an image preset
    decode: bool = False  # small enough to decode every arm's output for image/video PSNR

    @property
    def video(self) -> bool:
        return self.num_frames is not None

    @property
    def band_unit(self) -> str:
        """What a STADI band is made of, and the planner's row: token rows of an image, or of a clip (its
        frames' rows one after the other)."""
        return "token row"

    @property
    def calibrates(self) -> bool:
        """Whether ``--simulate`` can measure a forward of this preset on the CPU (PixArt only)."""
        return self.family == "pixart"

    def width_for(self, height: int) -> int:
        """Width in px at ``height``: the preset's aspect ratio, on whole token columns (>= 1)."""
        if self.width is None:
            return height
        return max(1, round(height * self.width / self.height / TOKEN_ROW_PX)) * TOKEN_ROW_PX

    def band_units(self, height: int, num_frames: int | None = None) -> int:
        """The planner's rows: token rows of the image, or of the whole clip (latent frames of ``num_frames``,
        or the preset's, x token rows per frame); the band granularity and the limit on STADI ranks."""
        if self.video:
            return latent_frames(num_frames or self.num_frames) * (height // TOKEN_ROW_PX)
        return height // TOKEN_ROW_PX


PRESET_SHAPES: dict[str, PresetShape] = {
    "tiny": PresetShape("pixart", "alpha", 128, 8, decode=True),
    "small": PresetShape("pixart", "alpha", 512, 8, decode=True),
    "pixart-alpha-1024": PresetShape("pixart", "alpha", 1024, 120),
    "pixart-sigma-1024": PresetShape("pixart", "sigma", 1024, 300),
    "flux-dev-1024": PresetShape("flux", "dev", 1024, 512),
    # Wan 2.1 text-to-video: bands are token rows of the clip (stadi_xdit.models.wan). 17 frames = 5 latent frames.
    "wan-tiny": PresetShape("wan", "t2v", 48, 8, model="tiny", width=64, num_frames=17, decode=True),
    "wan-small": PresetShape("wan", "t2v", 192, 16, model="small", width=256, num_frames=41, decode=True),
    "wan2.1-t2v-1.3b": PresetShape("wan", "t2v", 480, 512, width=832, num_frames=81),
    "wan2.1-t2v-14b": PresetShape("wan", "t2v", 480, 512, width=832, num_frames=81),
    "wan2.1-t2v-14b-720p": PresetShape("wan", "t2v", 720, 512, width=1280, num_frames=81),
}
