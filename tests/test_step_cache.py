"""xDiT's step cache (`--cache_method teacache`) under STADI, on tiny Flux.1 across 2 gloo ranks.

Each rank's cache decides for its own band; synchronous steps and the rank's last forward always compute,
and a publishing step the cache cut short still publishes every layer (`runtime/kv.py`).
"""

from __future__ import annotations

import json

import pytest
import torch

from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.testing.fakes import TwoRankGroup
from stadi_xdit.xdit.build import build_stadi_pipeline

PROMPT = "a red cat"
STEPS, SIZE = 12, 128
# Stale full mode with a 1:2 speed split: rank 1 runs at stride 2, so the ranks publish at different steps.
STADI = {"stadi_mode": "full", "stadi_speeds": "2,1", "warmup_steps": 2}


def _run(rank: int, world: int, runs: list[dict]) -> list[dict]:
    from xfuser.model_executor.cache.adapters import apply_cache  # the harness loaded the compat layer first

    from stadi_xdit.families.flux import FLUX_PRESETS, build_flux_pipeline
    from stadi_xdit.models.flux import StadiFluxPipeline

    results = []
    for run in runs:
        stadi = {**STADI, "stadi_replan": run.get("replan", "calls"), "stadi_speeds": None} if run.get("calls") else STADI
        pipe = build_stadi_pipeline(StadiFluxPipeline, build_flux_pipeline(FLUX_PRESETS["tiny"]), size=SIZE,
                                    steps=STEPS, model="tiny-flux", ignore_foreign_bands=run.get("fault", False),
                                    **stadi)
        if run.get("cache_args"):  # a script's cache_args, which xDiT's own pipelines read: refused, not dropped
            from stadi_xdit.cli_errors import StadiInputError

            try:
                pipe._convert_transformer_backbone(pipe.module.transformer, cache_args=run["cache_args"])
            except StadiInputError as error:
                results.append({"refused": str(error)})
            continue
        if "threshold" in run:  # as xDiT's runner applies --cache_method, then STADI steers it
            apply_cache("teacache", num_steps=STEPS, pipe=None, transformer=pipe.module.transformer,
                        cache_config=json.dumps({"residual_diff_threshold": run["threshold"]}))
            pipe.attach_step_cache()
        memories = []
        for _ in range(run.get("calls", 1)):
            out = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
                       max_sequence_length=16, guidance_scale=3.5, generator=torch.Generator().manual_seed(1))
            memories.append(pipe.last_result.memory)
        result = pipe.last_result
        records = result.timeline.steps
        results.append({"latents": out.images, "cached": result.cached_forwards,
                        "strides": [r.stride for r in result.plan.ranks],
                        "cached_phases": sorted({r.phase for r in records if r.cached}),
                        "last_cached": records[-1].cached, "displaced": sum(r.phase == "stadi" for r in records),
                        "skipped_publishes": result.kv_exchange.get("skipped_layer_publishes"),
                        "served_records": [m.served if m is not None else None for m in memories]})
    return results


@pytest.fixture(scope="module")
def runs() -> list[list[dict]]:
    plan = [{}, {"threshold": 0.0}, {"threshold": 1e6}, {"threshold": 1e6, "fault": True},
            {"cache_args": {"use_teacache": True}}, {"threshold": 1e6, "calls": 2},
            {"threshold": 1e6, "calls": 2, "replan": "sync"}]
    return run_distributed(_run, 2, plan, timeout=300)


def test_a_threshold_of_zero_is_exactly_the_uncached_run(runs):
    for rank, (uncached, zero, *_) in enumerate(runs):
        assert uncached["strides"] == [1, 2], uncached["strides"]
        assert zero["cached"] == 0 and torch.equal(zero["latents"], uncached["latents"]), rank


def test_cached_forwards_are_displaced_ones_but_the_last_and_reported(runs):
    for rank, (uncached, _, cached, *_) in enumerate(runs):
        # Every displaced forward is served (the threshold takes all) but the last and, after the plan's new
        # band, the first: there is nothing to reuse.
        assert cached["cached"] == cached["displaced"] - 2, (rank, cached)
        assert cached["cached_phases"] == ["stadi"] and not cached["last_cached"], cached
        assert torch.isfinite(cached["latents"]).all() and not torch.equal(cached["latents"], uncached["latents"])
    # Rank 0 (stride 1) is served at rank 1's sync points too: its skipped layers still go out there.
    assert runs[0][2]["skipped_publishes"] > 0


def test_the_broken_exchange_fault_still_bites_with_the_cache(runs):
    for rank, (_, _, cached, faulty, *_) in enumerate(runs):
        assert not torch.equal(faulty["latents"], cached["latents"]), f"rank {rank}: the exchange did not matter"


def test_cache_args_outside_the_runner_are_refused_in_one_line(runs):
    for *_, refused, _, _ in runs:
        assert refused == {"refused": "step caching under --use_stadi runs through xDiT's model runner "
                                      "(stadi-xdit --model ... --cache_method teacache), not a pipeline's cache_args"}


def test_calls_mode_remembers_what_each_ranks_cache_served(runs):
    """--stadi_replan calls: each call's memory keeps every rank's served share and a served forward's time, the
    same on every rank; the next call plans on forwards that cost that much less (planner.calls.with_step_cache)."""
    records = [run[-2]["served_records"] for run in runs]
    assert records[0] == records[1], "every rank must remember the same record"
    for rank, memory_served in enumerate(records[0]):
        assert len(memory_served) == 2 and all(0 < share < 1 and seconds > 0 for share, seconds in memory_served)
    last = runs[0][-2]
    assert records[0][-1][0][0] == pytest.approx(last["cached"] / last["displaced"])  # rank 0's share, last call


def test_sync_replanning_runs_with_the_cache_and_its_record(runs):
    """--stadi_replan sync: the sync points' re-planner weighs the same record; every call completes on both ranks."""
    for rank, run in enumerate(runs):
        sync = run[-1]
        assert sync["cached"] > 0 and torch.isfinite(sync["latents"]).all(), rank
        assert all(record is not None and len(record) == 2 for record in sync["served_records"])


def test_over_stadis_own_groups_the_in_tree_cache_averages_over_the_group(monkeypatch):
    """Groups of unequal sizes are STADI's own (xDiT's sequence-parallel group is flat, of one rank): xfuser's
    `l1_distance` would compare this rank's part alone, and a group's ranks could decide apart. `decide_with`
    makes it average the difference and the norm over the group, as it does over xDiT's own groups."""
    from types import SimpleNamespace

    from xfuser.core import distributed
    from xfuser.model_executor.cache.utils import CachedTransformerBlocks

    from stadi_xdit.xdit.step_cache import XditStepCache

    monkeypatch.setattr(distributed, "get_sequence_parallel_world_size", lambda: 1)
    block = SimpleNamespace(rel_l1_thresh=torch.tensor(0.1), all_reduce=lambda value, op=None: value)
    cache = XditStepCache([block])
    cache.decide_with(TwoRankGroup(peer=0.5), torch.device("cpu"))
    # This part: difference 1, norm 2 -> alone 0.5; the peer reports 0.5 for both -> (1 + 0.5) / (2 + 0.5) = 0.6.
    distance = CachedTransformerBlocks.l1_distance(block, torch.full((4,), 2.0), torch.full((4,), 1.0))
    assert distance.item() == pytest.approx(0.6)
    # Over xDiT's own groups (its sequence-parallel group is the group) and for a group of one: unchanged.
    for sequence_world, group in ((2, TwoRankGroup(peer=0.5)), (1, None)):
        monkeypatch.setattr(distributed, "get_sequence_parallel_world_size", lambda size=sequence_world: size)
        alone = SimpleNamespace(rel_l1_thresh=torch.tensor(0.1), all_reduce=lambda value, op=None: value)
        XditStepCache([alone]).decide_with(group, torch.device("cpu"))
        assert CachedTransformerBlocks.l1_distance(alone, torch.full((4,), 2.0), torch.full((4,), 1.0)).item() == 0.5
