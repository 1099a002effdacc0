"""cache-dit's DBCache (`--cache_method dbcache`) under STADI, on tiny SD3.5 across 2 gloo ranks.

Built as STADI's runner path builds it (`step_cache.apply_cache_dit` from xDiT's own `DBCacheSettings` for
SD3.5), then steered by the loop: each rank decides for its own band, no collective of cache-dit's runs, and
cache-dit's steps are the denoising grid's (a stride-2 rank's forwards are at every other step).
"""

from __future__ import annotations

import json

import pytest
import torch

from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.testing.fakes import TwoRankGroup
from stadi_xdit.xdit.build import build_stadi_pipeline

STEPS, SIZE = 12, 64
# Stale full mode with a 1:2 speed split: rank 1 runs at stride 2.
STADI = {"stadi_mode": "full", "stadi_speeds": "2,1", "warmup_steps": 2}
# Every step it may: no warmup or step mask of cache-dit's own, and the first of the two tiny blocks computed,
# so a served forward skips the second.
SERVE_ALL = {"residual_diff_threshold": 1e6, "max_warmup_steps": 0, "scm_policy": None, "Fn_compute_blocks": 1}


def _run(rank: int, world: int, runs: list[dict]) -> list[dict]:
    from xfuser.model_executor.models.runner_models.stable_diffusion import xFuserStableDiffusionModel

    from stadi_xdit.families.sd3 import build_sd3_pipeline
    from stadi_xdit.models.sd3 import StadiStableDiffusion3Pipeline
    from stadi_xdit.xdit.step_cache import apply_cache_dit

    results = []
    for run in runs:
        pipe = build_stadi_pipeline(StadiStableDiffusion3Pipeline, build_sd3_pipeline("tiny"), size=SIZE,
                                    steps=STEPS, model="tiny-sd3", ignore_foreign_bands=run.get("fault", False),
                                    **STADI)
        if "cache_config" in run:  # as STADI's runner path applies --cache_method dbcache
            settings = xFuserStableDiffusionModel.settings.step_cache_config["dbcache"]
            apply_cache_dit(pipe, pipe.module.transformer, settings, STEPS, json.dumps(run["cache_config"]))
            pipe.attach_step_cache()
            pipe.attach_step_cache()  # found again, the same steering (a second wrapper would never serve)
        out = pipe(prompt="a red cat", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   output_type="latent", guidance_scale=4.0, max_sequence_length=8,
                   generator=torch.Generator().manual_seed(1))
        result, cache = pipe.last_result, pipe.step_cache
        records = result.timeline.steps
        results.append({"latents": out.images, "cached": result.cached_forwards,
                        "strides": [r.stride for r in result.plan.ranks],
                        # cache-dit's own record: the grid steps it served
                        "served_steps": sorted({step for context in cache._contexts()
                                                for step in context.get_cached_steps()}) if cache else [],
                        "displaced_steps": [STADI["warmup_steps"] + r.base_step for r in records if r.phase == "stadi"],
                        "cached_phases": sorted({r.phase for r in records if r.cached}),
                        "last_cached": records[-1].cached, "displaced": sum(r.phase == "stadi" for r in records)})
    return results


@pytest.fixture(scope="module")
def runs() -> list[list[dict]]:
    plan = [{}, {"cache_config": {**SERVE_ALL, "residual_diff_threshold": 0}}, {"cache_config": SERVE_ALL},
            {"cache_config": SERVE_ALL, "fault": True}, {"cache_config": {**SERVE_ALL, "scm_policy": "fast"}},
            {"cache_config": {**SERVE_ALL, "residual_diff_threshold": 0.5}}]
    return run_distributed(_run, 2, plan, timeout=300)


def test_a_threshold_of_zero_is_exactly_the_uncached_run(runs):
    for rank, (uncached, zero, *_) in enumerate(runs):
        assert uncached["strides"] == [1, 2], uncached["strides"]
        assert zero["cached"] == 0 and torch.equal(zero["latents"], uncached["latents"]), rank


def test_each_rank_serves_its_displaced_forwards_alone_and_reports_them(runs):
    """Rank 1 (stride 2) takes half the forwards of rank 0: had cache-dit all-reduced its decision over the
    world, as it does whenever the world has more than one rank, the ranks would not have finished."""
    for rank, (uncached, _, cached, *_) in enumerate(runs):
        # Every displaced forward is served but the first after the plan's new band and the rank's last.
        assert cached["cached"] == cached["displaced"] - 2 > 0, (rank, cached)
        assert cached["cached_phases"] == ["stadi"] and not cached["last_cached"], cached
        assert len(cached["served_steps"]) == cached["cached"]
        assert torch.isfinite(cached["latents"]).all() and not torch.equal(cached["latents"], uncached["latents"])


def test_each_rank_compares_its_own_band_with_no_collective(runs):
    """A threshold under 1 makes cache-dit compute the difference of the first block's residuals. Over a world
    of more than one rank it would average that difference over the world (an all-reduce per decision); rank 1,
    at stride 2, decides half as often as rank 0, so those all-reduces would never pair up."""
    for rank, run in enumerate(runs):
        measured = run[5]
        assert 0 <= measured["cached"] <= measured["displaced"] - 2 and torch.isfinite(measured["latents"]).all()


def test_the_broken_exchange_fault_still_bites_with_the_cache(runs):
    for rank, (_, _, cached, faulty, *_) in enumerate(runs):
        assert not torch.equal(faulty["latents"], cached["latents"]), f"rank {rank}: the exchange did not matter"


def test_cache_dits_step_mask_indexes_the_denoising_grid(runs):
    """scm_policy "fast" computes steps 0, 1, 2, 4, 7, 10 and 11 of 12 in full. Told each forward's grid step,
    cache-dit serves exactly the others that the rank takes (but its band's first and its last); counting
    forwards instead, a stride-2 rank would be served at other steps."""
    import cache_dit

    mask = cache_dit.steps_mask(mask_policy="fast", total_steps=STEPS)
    free = [step for step, compute in enumerate(mask) if not compute]
    assert free == [3, 5, 6, 8, 9]
    for rank, run in enumerate(runs):
        masked = run[4]
        assert masked["strides"] == [1, 2]
        expected = [step for step in masked["displaced_steps"][1:-1] if step in free]
        assert masked["served_steps"] == expected and masked["cached"] == len(expected) > 0, (rank, masked)
    assert runs[0][4]["served_steps"] == free  # stride 1: every displaced step from 2 to 11


class _Manager:
    """cache-dit's context manager, as far as the steering touches it: its decision and its comparison."""

    def __init__(self, verdict: bool):
        self.verdict, self.decisions = verdict, 0

    def can_cache(self, *args, **kwargs) -> bool:
        self.decisions += 1
        return self.verdict

    def similarity(self, *args, **kwargs) -> dict:
        return kwargs


@pytest.mark.parametrize(("mine", "peer", "served"), [(True, 1.0, True), (True, 0.0, False), (False, 1.0, False)])
def test_a_ulysses_group_serves_a_forward_only_where_all_its_ranks_would(mine, peer, served):
    """Over Ulysses groups the ranks of a group meet in every attention's all-to-all: a rank that served a forward
    its peer computes would leave the peer waiting. Each decides on its own part, then the group agrees."""
    from stadi_xdit.xdit.step_cache import CacheDitStepCache

    manager, group = _Manager(mine), TwoRankGroup(peer)
    cache = CacheDitStepCache(manager, ["context"])
    cache.decide_with(group, torch.device("cpu"))
    cache.may_serve = True
    assert manager.can_cache("residual") is served and group.sent == [float(mine)]
    cache.may_serve = False  # a synchronous step or the rank's last forward: alike on every rank, no collective
    assert manager.can_cache("residual") is False and manager.decisions == 1 and len(group.sent) == 1
    assert manager.similarity("t1", "t2", parallelized=True) == {"parallelized": False}  # its part, not the world's


def test_a_flat_rank_decides_alone():
    from stadi_xdit.xdit.step_cache import CacheDitStepCache

    manager = _Manager(True)
    cache = CacheDitStepCache(manager, ["context"])
    cache.decide_with(None, torch.device("cpu"))
    cache.may_serve = True
    assert manager.can_cache("residual") is True and cache.group is None
