"""`StadiRuntimeState`: xDiT's DiT runtime state with patch metadata taken from a STADI plan.

xDiT's own layers (e.g. `xFuserPatchEmbedWrapper`) read the seven `pp_patches_*` lists and
`pipeline_patch_idx`; STADI fills them with one uneven patch per rank, and this rank's patch
always current, so those layers see the band's global offsets.
"""

from __future__ import annotations

from xfuser.core.distributed import get_data_parallel_world_size
from xfuser.core.distributed import runtime_state as xdit_runtime_state
from xfuser.core.distributed.runtime_state import DiTRuntimeState

from stadi_xdit.planner import plan_warmup
from stadi_xdit.runtime.layout import BandLayout


def _cumulative(values: list[int]) -> list[int]:
    out = [0]
    for value in values:
        out.append(out[-1] + value)
    return out


class StadiRuntimeState(DiTRuntimeState):
    def __init__(self, pipeline, config):
        self.band_layout: BandLayout | None = None
        super().__init__(pipeline, config)  # creates xDiT's process groups if needed
        # STADI sits on xDiT's data-parallel slot: its group is the dp group.
        self.stadi_world_size = get_data_parallel_world_size()

    def apply_layout(self, layout: BandLayout, rank: int) -> None:
        """Make `layout` current, this process holding band `rank` (the patch xDiT's layers read)."""
        self.band_layout = layout
        self._calc_patches_metadata()
        self.patch_mode = True
        self.pipeline_patch_idx = rank

    def _default_layout(self) -> BandLayout:
        """Equal bands until a plan arrives; same splitter as the `uniform` plan."""
        patch = self.backbone_patch_size
        rows = self.input_config.height // self.vae_scale_factor // patch
        tokens_per_row = self.input_config.width // self.vae_scale_factor // patch
        equal = plan_warmup(self.stadi_world_size, rows=rows, align=1, num_steps=2, warmup_steps=1)
        return BandLayout.from_plan(equal, patch, tokens_per_row)

    def _calc_patches_metadata(self) -> None:
        layout = self.band_layout
        if layout is None or layout.tokens_per_row != self.input_config.width // self.vae_scale_factor // layout.patch_rows:
            layout = self.band_layout = self._default_layout()
        heights = layout.latent_row_counts()
        starts = _cumulative(heights)
        token_counts = layout.token_counts()
        self.num_pipeline_patch = layout.world_size
        self.pp_patches_height = heights
        self.pp_patches_start_idx_local = starts
        self.pp_patches_start_end_idx_global = [[starts[r], starts[r + 1]] for r in range(layout.world_size)]
        self.pp_patches_token_start_end_idx_global = [list(layout.token_range(r)) for r in range(layout.world_size)]
        self.pp_patches_token_num = token_counts
        self.pp_patches_token_start_idx_local = _cumulative(token_counts)

    def _reset_recv_buffer(self) -> None:
        # STADI never uses PipeFusion's P2P buffers.
        pass


def install_runtime_state(state: StadiRuntimeState) -> None:
    """Every xDiT module calls get_runtime_state() at call time, so swapping the global reaches all."""
    xdit_runtime_state._RUNTIME = state
