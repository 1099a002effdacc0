"""STADI on tiny Flux.1 (1 double-stream + 2 single-stream blocks) across 2-3 gloo ranks."""

from __future__ import annotations

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


# Exact and stale modes on tiny Flux are the conformance suite's (tests/test_conformance.py, families/flux.py's
# case); here what is Flux's own: the guidance embedding, xDiT's packed-latent VAE scale, the profile cache.
def test_exact_mode_with_guidance_embedding_equals_one_process():
    """Flux.1-dev style: a guidance embedding instead of CFG branches."""
    steps, size = 3, 128
    reference = _reference(size, steps, guidance=True)
    runs = [{"stadi_exact": True, "stadi_mode": "spatial", "stadi_speeds": "1,3", "warmup_steps": 1}]
    results = run_distributed(_run_stadi, 2, size, steps, runs, True, timeout=300)
    for rank, (result,) in enumerate(results):
        assert result["vae_scale"] == 16  # xDiT's view of packed latents: VAE 8 x 2x2 packing
        assert result["attention_calls"] == {"double": steps, "single": 2 * steps}
        assert relative_error(result["latents"], reference) <= 1e-4, f"rank {rank}"


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
    return {"warmup_plan": result.warmup_plan, "warmup_start": result.warmup_start, "plan": result.plan, "key": key,
            "evidence": result.costs.evidence,
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
    assert first["warmup_start"].mode == "uniform"  # nothing cached yet: the warmup begins on equal bands
    assert first["cached"] == list(first["plan"].speeds)
    # The second launch starts from the cached speeds: elastic warmup bands, the slowed rank 1 gets fewer rows.
    assert second["warmup_start"].mode == second["warmup_plan"].mode == "spatial"
    # The entry keeps the cost-model memory of the run's displaced forwards, and the next launch plans on it.
    assert first["memory"]["memory"]["plan_rows"] == [r.num_rows for r in first["plan"].ranks]
    assert first["evidence"] == ["warmup", "warmup"] and second["evidence"] == ["memory", "memory"]
    (fast, slow) = second["warmup_plan"].row_bounds()
    assert slow[1] - slow[0] < fast[1] - fast[0]
    # ... and its own warmup measurement replaces the entry.
    assert second["cached"] == list(second["plan"].speeds)
    entries = json.loads(cache.read_text())["entries"]  # valid JSON, one entry for this model/size/hardware
    assert list(entries) == [first["key"]]
    assert not list(tmp_path.glob("*.tmp")), "no temp file left behind"
