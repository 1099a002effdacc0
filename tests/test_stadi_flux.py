"""STADI on tiny Flux.1 (1 double-stream + 2 single-stream blocks) across 2-3 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.testing.checks import relative_error
from stadi_xdit.xdit.build import build_stadi_pipeline

PROMPT = "a red cat"
SEED = 1
MAX_SEQ = 16  # text tokens; replicated on every rank, kept short for CPU


def _reference(size: int, steps: int, guidance: bool = False) -> torch.Tensor:
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.families.flux import FLUX_PRESETS, build_flux_pipeline

    preset = FLUX_PRESETS["tiny"]
    if guidance:
        from dataclasses import replace

        preset = replace(preset, guidance_embeds=True)
    pipe = build_flux_pipeline(preset)
    return pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="latent",
                max_sequence_length=MAX_SEQ, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(SEED)).images


def _run_stadi(rank: int, world: int, size: int, steps: int, runs: list[dict], guidance: bool = False) -> list[dict]:
    """Build one STADI Flux pipeline per entry of `runs` (StadiArgs keywords) and run it once."""
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.families.flux import FLUX_PRESETS, build_flux_pipeline
    from stadi_xdit.models.flux import StadiFluxPipeline

    preset = FLUX_PRESETS["tiny"]
    if guidance:
        from dataclasses import replace

        preset = replace(preset, guidance_embeds=True)
    results = []
    for kwargs in runs:
        pipe = build_stadi_pipeline(StadiFluxPipeline, build_flux_pipeline(preset), size=size, steps=steps,
                                    model="tiny-flux", **kwargs)
        forwards = []
        transformer = pipe.module.transformer
        handle = transformer.register_forward_pre_hook(lambda *_, seen=forwards: seen.append(1))
        attention_calls = {"double": 0, "single": 0}

        def count(kind, calls=attention_calls):
            return lambda *_: calls.__setitem__(kind, calls[kind] + 1)

        hooks = [block.attn.register_forward_pre_hook(count("double")) for block in transformer.transformer_blocks]
        hooks += [block.attn.register_forward_pre_hook(count("single"))
                  for block in transformer.single_transformer_blocks]
        out = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="latent",
                   max_sequence_length=MAX_SEQ, guidance_scale=3.5, generator=torch.Generator().manual_seed(SEED))
        for hook in [handle, *hooks]:
            hook.remove()
        result = pipe.last_result
        results.append({"latents": out.images, "plan": result.plan, "warmup_plan": result.warmup_plan,
                        "forwards": len(forwards), "num_evals": result.num_evals,
                        "attention_calls": attention_calls,
                        "processors": sorted({type(b.attn.processor).__name__ for b in
                                              [*transformer.transformer_blocks,
                                               *transformer.single_transformer_blocks]}),
                        "vae_scale": pipe.stadi_state.vae_scale_factor})
    return results


# Exact mode: every layer gathers fresh image K/V every step, so any band split equals one process.
@pytest.mark.parametrize("world,speeds,size,bands", [
    (2, "3,5", 128, [(0, 3), (3, 8)]),             # 3/5 of 8 token rows (16 px each)
    (3, "2,3,5", 160, [(0, 2), (2, 5), (5, 10)]),  # 2/3/5 of 10 token rows
])
def test_exact_mode_equals_one_process(world, speeds, size, bands):
    steps = 4
    reference = _reference(size, steps)
    runs = [{"stadi_exact": True, "stadi_mode": "spatial", "stadi_speeds": speeds, "warmup_steps": 2}]
    results = run_distributed(_run_stadi, world, size, steps, runs, timeout=300)
    for rank, (result,) in enumerate(results):
        assert result["vae_scale"] == 16
        assert result["processors"] == ["StadiFluxAttnProcessor"]
        assert result["plan"].row_bounds() == bands
        # 1 double-stream and 2 single-stream attentions per forward, all through STADI.
        assert result["attention_calls"] == {"double": steps, "single": 2 * steps}
        assert relative_error(result["latents"], reference) <= 1e-4, f"rank {rank}"


def test_exact_mode_with_guidance_embedding_equals_one_process():
    """Flux.1-dev style: a guidance embedding instead of CFG branches."""
    steps, size = 3, 128
    reference = _reference(size, steps, guidance=True)
    runs = [{"stadi_exact": True, "stadi_mode": "spatial", "stadi_speeds": "1,3", "warmup_steps": 1}]
    results = run_distributed(_run_stadi, 2, size, steps, runs, True, timeout=300)
    for rank, (result,) in enumerate(results):
        assert relative_error(result["latents"], reference) <= 1e-4, f"rank {rank}"


def test_stale_modes_follow_the_plan_and_repeat():
    steps, size = 6, 128
    reference = _reference(size, steps)
    modes = ("uniform", "spatial", "full")
    runs = [{"stadi_mode": mode, "stadi_speeds": "1,0.5", "warmup_steps": 2} for mode in modes]
    runs.append({"stadi_mode": "full", "stadi_speeds": "1,0.5", "warmup_steps": 2})  # determinism
    runs.append({"stadi_mode": "uniform", "stadi_speeds": "1,0.5", "warmup_steps": 2, "ignore_foreign_bands": True})
    results = run_distributed(_run_stadi, 2, size, steps, runs, timeout=300)
    without_exchange = relative_error(results[0][4]["latents"], reference)
    print(f"[stadi-flux] foreign K/V ignored (fault injection): rel. error = {without_exchange:.2e}")
    for index, mode in enumerate(modes):
        per_rank = [results[rank][index] for rank in range(2)]
        plan = per_rank[0]["plan"]
        assert plan.mode == mode
        for rank, result in enumerate(per_rank):
            assert result["plan"] == plan, "every rank must derive the same plan"
            assert result["num_evals"] == plan.ranks[rank].num_evals, (mode, rank)
            assert result["forwards"] == plan.ranks[rank].num_evals, (mode, rank)
            assert result["attention_calls"]["single"] == 2 * result["forwards"]
            assert torch.isfinite(result["latents"]).all()
            assert torch.equal(result["latents"], per_rank[0]["latents"]), "ranks disagree on the final latent"
        error = relative_error(per_rank[0]["latents"], reference)
        print(f"[stadi-flux] mode={mode} evals={[r['forwards'] for r in per_rank]} rel. error vs 1 process "
              f"= {error:.2e}")
        if mode != "full":  # full also skips steps, a different error source
            # The displaced exchange must matter: stale K/V are far closer than no foreign K/V.
            assert error * 4 < without_exchange, (mode, error, without_exchange)
        assert error < 0.1, (mode, error)
    full_plan = results[0][2]["plan"]
    assert [r.stride for r in full_plan.ranks] == [1, 2]
    for rank in range(2):
        assert torch.equal(results[rank][2]["latents"], results[rank][3]["latents"]), "runs must repeat bit for bit"


def _run_with_profile_cache(rank: int, world: int, cache: str) -> dict:
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.families.flux import tiny_flux_pipeline
    from stadi_xdit.models.flux import StadiFluxPipeline
    from stadi_xdit.runtime.profile_cache import ProfileCache

    pipe = build_stadi_pipeline(StadiFluxPipeline, tiny_flux_pipeline(), size=128, steps=5, model="tiny-flux",
                                warmup_steps=3, stadi_mode="spatial", stadi_emulate_slowdown="1,8", stadi_timing="work",
                                stadi_profile_cache=cache)
    pipe(prompt=PROMPT, height=128, width=128, num_inference_steps=5, output_type="latent",
         max_sequence_length=MAX_SEQ, generator=torch.Generator().manual_seed(SEED))
    result = pipe.last_result
    key = pipe._profile_key(128, 128)
    torch.distributed.barrier()  # the leader has written the cache
    return {"warmup_plan": result.warmup_plan, "plan": result.plan, "key": key, "evidence": result.costs.evidence,
            "cached": ProfileCache(cache).load(key, world), "memory": ProfileCache(cache).load_entry(key, world)}


def test_profile_cache_makes_the_next_launch_warm_up_elastic(tmp_path, monkeypatch):
    import json
    import socket

    cache = tmp_path / "speeds.json"
    launches = []
    for hash_seed in ("1", "2"):  # set ordering differs between launches; the key must not
        monkeypatch.setenv("PYTHONHASHSEED", hash_seed)
        launches.append(run_distributed(_run_with_profile_cache, 2, str(cache), timeout=300, fresh_interpreter=True))
    (first, first_rank_1), (second, _) = launches
    assert first_rank_1["key"] == first["key"], "every rank must build the same cache key"
    assert second["key"] == first["key"], "the key must not depend on PYTHONHASHSEED"
    assert first["key"].count(socket.gethostname()) == 2, "the key names every rank's hardware"
    assert first["warmup_plan"].mode == "uniform"  # nothing cached yet: equal warmup bands
    assert first["cached"] == list(first["plan"].speeds)
    # The second launch starts from the cached speeds: elastic warmup bands, the slowed rank 1 gets fewer rows.
    assert second["warmup_plan"].mode == "spatial"
    # The entry keeps the cost-model memory of the run's displaced forwards, and the next launch plans on it.
    assert first["memory"]["memory"]["plan_rows"] == [r.num_rows for r in first["plan"].ranks]
    assert first["evidence"] == ["warmup", "warmup"] and second["evidence"] == ["memory", "memory"]
    (fast, slow) = second["warmup_plan"].row_bounds()
    assert slow[1] - slow[0] < fast[1] - fast[0]
    # ... and its own warmup measurement replaces the entry.
    assert second["cached"] == list(second["plan"].speeds)
    entries = json.loads(cache.read_text())  # valid JSON, one entry for this model/size/hardware
    assert list(entries) == [first["key"]]
    assert not list(tmp_path.glob("*.tmp")), "no temp file left behind"
