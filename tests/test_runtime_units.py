"""Single-process checks of the runtime's parts: layouts, schedules, displaced K/V, injection."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

import stadi_xdit.xdit  # noqa: F401  (compat layer first)
from stadi_xdit.planner import plan
from stadi_xdit.runtime.comm import BandComm
from stadi_xdit.runtime.kv import DisplacedKVStore
from stadi_xdit.runtime.layout import BandLayout, BandView, slice_band
from stadi_xdit.runtime.schedule import (
    check_scheduler_supported,
    rank_schedule_indices,
    restrict_to_indices,
    to_subsequence_capable,
)


def test_layout_follows_plan_rows():
    p = plan([1.0, 0.4], rows=90, align=1, num_steps=10, warmup_steps=2, mode="spatial")
    layout = BandLayout.from_plan(p, patch_rows=2, tokens_per_row=5)
    assert layout.token_rows == ((0, 65), (65, 90))  # max(65/1, 25/0.4) = 65 is optimal
    assert layout.latent_rows(1) == (130, 180)
    assert layout.token_range(1) == (325, 450)
    assert sum(layout.token_counts()) == 90 * 5
    latents = torch.arange(180.0).view(1, 1, 180, 1)
    assert slice_band(latents, layout.latent_row_counts(), 1, dim=2).flatten()[0].item() == 130


def _denoise(scheduler, steps: int, indices_after: list[int] | None = None, warmup: int = 2) -> torch.Tensor:
    """Run a fake model through `scheduler`; optionally restrict it after `warmup` steps."""
    scheduler.set_timesteps(steps)
    sample = torch.ones(1, 2, 4, 4)
    position = 0
    while position < len(scheduler.timesteps):
        if indices_after is not None and position == warmup:
            restrict_to_indices(scheduler, indices_after)
        t = scheduler.timesteps[position]
        model_output = 0.1 * sample + 0.01 * float(t) / 1000
        sample = scheduler.step(model_output, t, sample, return_dict=False)[0]
        position += 1
    return sample


@pytest.mark.parametrize("make", [
    lambda: DPMSolverMultistepScheduler(),
    lambda: EulerDiscreteScheduler(),
    lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    lambda: to_subsequence_capable(DDIMScheduler()),
])
def test_stride_one_subsequence_is_the_full_schedule(make):
    steps = 8
    full = _denoise(make(), steps)
    restricted = _denoise(make(), steps, rank_schedule_indices(2, list(range(6))))
    assert torch.equal(full, restricted)


@pytest.mark.parametrize("make", [lambda: DPMSolverMultistepScheduler(), lambda: EulerDiscreteScheduler(),
                                  lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
                                  lambda: to_subsequence_capable(DDIMScheduler())])
def test_stride_two_visits_every_other_timestep_and_ends_at_the_end(make):
    scheduler = make()
    scheduler.set_timesteps(8)
    full_timesteps = scheduler.timesteps.clone()
    restrict_to_indices(scheduler, rank_schedule_indices(2, [0, 2, 4]))
    assert scheduler.timesteps.tolist() == full_timesteps[[0, 1, 2, 4, 6]].tolist()
    if not isinstance(scheduler, DDIMScheduler):
        assert scheduler.sigmas[-1].item() == pytest.approx(0.0)  # still ends at the final noise level


def test_subsequence_ddim_matches_stock_ddim_for_its_own_grid():
    stock = DDIMScheduler()
    ours = to_subsequence_capable(DDIMScheduler())
    assert _denoise(stock, 10).allclose(_denoise(ours, 10), atol=1e-6)


def test_unsupported_scheduler_is_a_one_line_error():
    with pytest.raises(ValueError, match="does not support scheduler PNDMScheduler") as info:
        check_scheduler_supported(PNDMScheduler())
    assert "\n" not in str(info.value)


def test_sde_dpm_solver_is_refused():
    with pytest.raises(ValueError, match="deterministic"):
        check_scheduler_supported(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))


def test_displaced_store_single_rank_keeps_own_rows_fresh():
    store = DisplacedKVStore(BandComm(None, 0, 1))
    store.set_band(BandView.of_token_counts([6], 0))
    key, value = torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4)
    full_key, full_value = store.full_kv(0, key, value)
    assert torch.equal(full_key, key) and torch.equal(full_value, value)
    store.set_phase(synchronous=False, publish=True)
    new_key = torch.randn(2, 1, 6, 4)
    full_key, _ = store.full_kv(0, new_key, value)
    assert torch.equal(full_key, new_key)
    store.reset()


def test_displaced_store_needs_a_synchronous_step_first():
    store = DisplacedKVStore(BandComm(None, 0, 1))
    store.set_band(BandView.of_token_counts([4], 0))
    store.set_phase(synchronous=False)
    with pytest.raises(RuntimeError, match="synchronous"):
        store.full_kv(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))


def test_band_comm_alone_launches_and_waits_for_nothing():
    from stadi_xdit.runtime.comm import PendingWorks

    comm = BandComm(None, 0, 1)
    buffer = torch.arange(4.0)
    assert comm.broadcast_async(buffer, 0) == [] and comm.all_gather_into_async(buffer, buffer) == []
    comm.wait_works(PendingWorks([]), cuda=False)
    assert comm.collectives == 0 and comm.wait_seconds == 0.0
    assert comm.all_gather_float_lists([1.0, 2.5], torch.device("cpu")) == [[1.0, 2.5]]
    assert torch.equal(comm.all_gather(buffer, [4], 0), buffer)


def test_displaced_store_hands_attention_contiguous_kv_on_cpu():
    # Token-major buffers keep a band's rows contiguous for the exchange; on CPU attention over
    # such strided K/V is slower than a copy into a reused contiguous buffer, so it gets the copy.
    store = DisplacedKVStore(BandComm(None, 0, 1))
    store.set_band(BandView.of_token_counts([4], 0))
    store.set_phase(synchronous=True, publish=True)
    full_key, _ = store.full_kv(0, torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3))
    assert full_key.is_contiguous()
    store.set_phase(synchronous=False, publish=False)
    fresh = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3)
    full_key, full_value = store.full_kv(0, *fresh)
    assert full_key.is_contiguous() and full_value.is_contiguous()
    assert torch.equal(full_key, fresh[0]) and torch.equal(full_value, fresh[1])
    store.reset()


def test_injection_is_removable():
    from stadi_xdit.families.pixart import tiny_pixart_pipeline
    from stadi_xdit.models.pixart import PIXART_INJECTION
    from stadi_xdit.xdit.injection import apply_injection

    transformer = tiny_pixart_pipeline().transformer
    before = [block.attn1.processor for block in transformer.transformer_blocks]
    patch_embed = transformer.pos_embed
    injection = apply_injection(transformer, PIXART_INJECTION, DisplacedKVStore(BandComm(None, 0, 1)))
    assert transformer.pos_embed is not patch_embed
    assert all(type(b.attn1.processor).__name__ == "StadiSelfAttnProcessor" for b in transformer.transformer_blocks)
    injection.remove()
    assert transformer.pos_embed is patch_embed
    assert [block.attn1.processor for block in transformer.transformer_blocks] == before


def test_a_band_view_holds_the_range_and_slices_global_positions():
    layout = BandLayout(((0, 3), (3, 4)), patch_rows=2, tokens_per_row=5)
    first, second = BandView(layout, 0), BandView(layout, 1)
    assert first.token_range == (0, 15) and second.token_range == (15, 20) and second.num_tokens == 5
    assert first.token_counts == second.token_counts == (15, 5)
    ids = torch.arange(20 * 3).reshape(20, 3)
    assert torch.equal(second.positions(ids), ids[15:20])
    table = torch.arange(20).reshape(1, 20, 1).float()
    assert torch.equal(first.positions(table, dim=1), table[:, :15])
    with pytest.raises(RuntimeError, match="full image's positions"):
        first.positions(ids[:15])  # a table of the band, not of the image
    with pytest.raises(ValueError, match="rank 2 has no band"):
        BandView(layout, 2)
    assert BandView.of_token_counts([4, 2], 1).token_range == (4, 6)


def test_the_store_reads_its_range_from_the_band_it_is_given():
    store = DisplacedKVStore(BandComm(None, 0, 1))
    assert store.own_range == (0, 0) and store.token_counts == ()
    band = BandView(BandLayout(((0, 2),), patch_rows=1, tokens_per_row=3), 0)
    store.set_band(band)
    assert store.band is band and store.own_range == band.token_range == (0, 6) and store.token_counts == (6,)


def test_a_rope_swap_follows_the_band_and_is_removed_with_the_injection():
    from torch import nn

    from stadi_xdit.xdit.injection import InjectionPlan, RopeSwap, apply_injection

    class Rope(nn.Module):
        band = None

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = nn.Identity()

    model = Model()
    original = model.rope
    plan = InjectionPlan(positions=RopeSwap("rope", lambda transformer, rope: Rope()),
                         displaced_attention=lambda transformer: [], processor_factory=None)
    injection = apply_injection(model, plan, DisplacedKVStore(BandComm(None, 0, 1)))
    assert isinstance(model.rope, Rope)
    band = BandView.of_token_counts([3], 0)
    injection.set_band(band)
    assert model.rope.band is band
    injection.remove()
    assert model.rope is original
