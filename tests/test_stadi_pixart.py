"""STADI on tiny PixArt-α/Σ across 2-3 gloo ranks, compared with one plain diffusers process."""

from __future__ import annotations

import pytest
import torch

from stadi_xdit.bench.metrics import psnr
from stadi_xdit.testing.checks import relative_error


# Exact mode: every layer gathers fresh K/V every step, so any band split equals one process. PixArt-α
# passes the conformance suite (tests/test_conformance.py); PixArt-Σ, the family's second twin, here.
@pytest.mark.parametrize("variant", ["sigma"])
@pytest.mark.parametrize("world,speeds,size,bands", [
    (2, "3,5", 128, [(0, 3), (3, 8)]),          # 3/5 of 8 token rows
    (3, "2,3,5", 160, [(0, 2), (2, 5), (5, 10)]),  # 2/3/5 of 10 token rows
])
def test_exact_mode_equals_one_process(tiny_pixart, variant, world, speeds, size, bands):
    steps = 5
    reference = tiny_pixart.reference(size, steps, variant)
    runs = [{"stadi_exact": True, "stadi_mode": "spatial", "stadi_speeds": speeds, "warmup_steps": 2}]
    results = tiny_pixart.run(world, variant, size, steps, runs)
    for rank, (result,) in enumerate(results):
        assert result["plan"].row_bounds() == bands
        assert relative_error(result["latents"], reference) <= 1e-4, f"rank {rank}"


# Measured on this model (8 steps, 2 warmup, speeds 1:0.5), PSNR against one process:
# uniform 93.4 dB, spatial 94.4 dB (one-step-stale K/V), full 52.2 dB (the slow rank also takes
# half the steps). Random tiny weights make attention a small term, so even ignoring the other
# bands entirely only drops uniform to 81.1 dB: an absolute floor alone could not catch a broken
# exchange. Hence two checks: the floor (40 dB, under `full`'s 52 dB with margin for platform
# float noise) and, in the same run, stale modes must beat that fault-injected run by >= 6 dB.
PSNR_FLOOR_DB = 40.0
EXCHANGE_MARGIN_DB = 6.0
MODES = ("uniform", "spatial", "full")


def test_stale_modes_follow_the_plan(tiny_pixart, report):
    steps, size = 8, 128
    reference = tiny_pixart.reference(size, steps)
    runs = [{"stadi_mode": mode, "stadi_speeds": "1,0.5", "warmup_steps": 2} for mode in MODES]
    runs.append({"stadi_mode": "uniform", "stadi_speeds": "1,0.5", "warmup_steps": 2, "ignore_foreign_bands": True})
    results = tiny_pixart.run(2, "alpha", size, steps, runs)
    without_exchange = psnr(reference, results[0][len(MODES)]["latents"])
    report(f"[stadi] foreign K/V ignored (fault injection): PSNR vs 1 process = {without_exchange:.1f} dB")
    for index, mode in enumerate(MODES):
        per_rank = [results[rank][index] for rank in range(2)]
        plan = per_rank[0]["plan"]
        assert plan.mode == mode
        for rank, result in enumerate(per_rank):
            assert result["forwards"] == plan.ranks[rank].num_evals, (mode, rank)
            assert torch.isfinite(result["latents"]).all()
            assert torch.equal(result["latents"], per_rank[0]["latents"]), "ranks disagree on the final latent"
        quality = psnr(reference, per_rank[0]["latents"])
        report(f"[stadi] mode={mode} evals={[r['forwards'] for r in per_rank]} PSNR vs 1 process = {quality:.1f} dB")
        assert quality >= PSNR_FLOOR_DB, (mode, quality)
        if mode != "full":  # full also skips steps, a different error source
            assert quality >= without_exchange + EXCHANGE_MARGIN_DB, (mode, quality, without_exchange)
    full_plan = results[0][2]["plan"]
    assert [r.stride for r in full_plan.ranks] == [1, 2]
    assert full_plan.ranks[1].num_evals < full_plan.ranks[0].num_evals


def test_profiling_discovers_the_slowed_rank(tiny_pixart):
    # The planner is never told the 1:3 factors; it must find them from warmup timings.
    runs = [{"stadi_mode": "full", "stadi_emulate_slowdown": "1,3", "warmup_steps": 3}]
    results = tiny_pixart.run(2, "alpha", 128, 6, runs)
    plan = results[0][0]["plan"]
    # What it finds them from: rank 1, and only rank 1, slept after every one of its forwards (warmup included).
    # That rank 1 then measures slower and gets less work is a timing claim: stadi-bench's (tests/test_bench.py
    # checks the same named rank there).
    (fast,), (slow,) = results
    assert fast["slowed"] == [] and slow["slowed"] == slow["steps"]
    assert [phase for phase, _ in slow["steps"][:3]] == ["warmup"] * 3
    for rank, (result,) in enumerate(results):
        measured = result["measured_speeds"]
        assert measured is not None and len(measured) == 2 and all(v > 0 for v in measured), rank
        assert result["measured_speeds"] == fast["measured_speeds"], "every rank must plan on the same speeds"
        assert result["forwards"] == len(result["steps"]) == plan.ranks[rank].num_evals, rank
    assert sum(r.num_rows for r in plan.ranks) == 8  # 128 px: 8 token rows
    assert results[1][0]["plan"] == plan, "every rank must derive the same plan"


def test_same_seed_and_plan_are_bit_identical(tiny_pixart):
    runs = [{"stadi_mode": "full", "stadi_speeds": "1,0.5", "warmup_steps": 2}] * 2
    results = tiny_pixart.run(2, "alpha", 128, 6, runs)
    for rank in range(2):
        assert torch.equal(results[rank][0]["latents"], results[rank][1]["latents"])
