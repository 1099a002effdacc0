"""STADI on tiny Qwen-Image (2 dual-stream blocks, true CFG) on 2-3 gloo ranks.

112x80 px is 7 packed token rows (odd) by 5 columns; Qwen's centred RoPE makes every row's
position depend on the full image, so wrong band positions would show. The prompts have
different lengths and one has a padding mask, so the batched CFG pair is padded and masked.
One 2-rank job and one 3-rank job serve every test.
"""

from __future__ import annotations

import pytest
import torch

from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.testing.checks import STALE_MODES, check_stale_runs, counted_calls, relative_error
from stadi_xdit.xdit.build import build_stadi_pipeline

SEED = 1
HEIGHT, WIDTH = 112, 80
STEPS = 6
EXACT = {"stadi_exact": True, "stadi_mode": "spatial", "warmup_steps": 2}
TWO_RANK_RUNS = [
    {**EXACT, "stadi_speeds": "3,5"},
    {**EXACT, "stadi_speeds": "3,5", "output_type": "np"},
    *({"stadi_mode": mode, "stadi_speeds": "1,0.5", "warmup_steps": 2} for mode in STALE_MODES),
    {"stadi_mode": "full", "stadi_speeds": "1,0.5", "warmup_steps": 2},  # determinism
    {"stadi_mode": "uniform", "stadi_speeds": "1,0.5", "warmup_steps": 2, "ignore_foreign_bands": True},
]


def _call(output_type: str) -> dict:
    """Pipeline arguments: true CFG with text embeddings of 6 (one padded) and 4 tokens."""
    from stadi_xdit.families.qwen_image import QWEN_IMAGE_PRESETS
    from stadi_xdit.offline.components import random_prompt_embeds

    width = QWEN_IMAGE_PRESETS["tiny"].joint_attention_dim
    return {"prompt_embeds": random_prompt_embeds(width, seq_len=6, seed=2),
            "prompt_embeds_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
            "negative_prompt_embeds": random_prompt_embeds(width, seq_len=4, seed=3),
            "true_cfg_scale": 4.0, "height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS,
            "output_type": output_type, "generator": torch.Generator().manual_seed(SEED)}


def _reference(output_type: str):
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.families.qwen_image import build_qwen_image_pipeline

    return build_qwen_image_pipeline()(**_call(output_type)).images


def _run_stadi(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """Build one STADI Qwen-Image pipeline per entry of `runs` (StadiArgs keywords) and run it once."""
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.families.qwen_image import build_qwen_image_pipeline
    from stadi_xdit.models.qwen_image import StadiQwenImagePipeline

    results = []
    for kwargs in runs:
        kwargs = dict(kwargs)
        output_type = kwargs.pop("output_type", "latent")
        pipe = build_stadi_pipeline(StadiQwenImagePipeline, build_qwen_image_pipeline(), size=HEIGHT, steps=STEPS,
                                    model="tiny-qwen-image", **kwargs)
        transformer = pipe.module.transformer
        with counted_calls(transformer, {"attn": [b.attn for b in transformer.transformer_blocks]}) as (calls, batches):
            out = pipe(**_call(output_type))
        result = pipe.last_result
        results.append({"images": None if out is None else out.images, "plan": result.plan,
                        "num_evals": result.num_evals, "calls": calls, "batches": sorted(batches),
                        "processors": sorted({type(p).__name__ for p in transformer.attn_processors.values()})})
    return results


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return _reference("latent")


@pytest.fixture(scope="module")
def two_ranks() -> list[list[dict]]:
    return run_distributed(_run_stadi, 2, TWO_RANK_RUNS, timeout=300)


def _check_exact(results: list[list[dict]], reference: torch.Tensor, bands: list[tuple[int, int]]) -> None:
    for rank, per_run in enumerate(results):
        result = per_run[0]
        assert result["processors"] == ["StadiQwenImageAttnProcessor"]
        assert result["plan"].row_bounds() == bands
        assert result["batches"] == [2], "the CFG pair runs as one batch"
        assert result["calls"] == {"forward": STEPS, "attn": 2 * STEPS}
        error = relative_error(result["images"], reference)
        print(f"[stadi-qwen-image] exact, {len(results)} ranks, rank {rank}: rel. error vs 1 process = {error:.2e}")
        assert error <= 1e-4, f"rank {rank}"


# Exact mode: every layer gathers fresh image K/V every step, so any band split equals one process.
def test_exact_mode_equals_one_process_on_2_ranks(two_ranks, reference):
    _check_exact(two_ranks, reference, [(0, 3), (3, 7)])


def test_exact_mode_equals_one_process_on_3_ranks(reference):
    results = run_distributed(_run_stadi, 3, [{**EXACT, "stadi_speeds": "2,3,5"}], timeout=300)
    _check_exact(results, reference, [(0, 1), (1, 3), (3, 7)])


def test_cfg_parallel_exact_equals_one_process(reference):
    """`--use_cfg_parallel` on 2 ranks: one CFG branch per rank (batch 1 per forward), paired every step.

    Bands under CFG parallelism are the loop's business, tested on 4 ranks in test_stadi_cfg.py;
    here one rank per branch keeps this family's branch split cheap to check.
    """
    results = run_distributed(_run_stadi, 2, [{**EXACT, "stadi_speeds": "1", "use_cfg_parallel": True}],
                              timeout=300)
    for rank, (result,) in enumerate(results):
        assert result["batches"] == [1]
        error = relative_error(result["images"], reference)
        print(f"[stadi-qwen-image] exact, CFG-parallel on 2 ranks, rank {rank}: rel. error vs 1 process = {error:.2e}")
        assert error <= 1e-4, f"rank {rank}"


def test_exact_mode_decodes_like_one_process(two_ranks):
    reference = _reference("np")
    images = [per_run[1]["images"] for per_run in two_ranks]
    assert images[1] is None, "only the output rank (STADI rank 0) decodes"
    error = relative_error(torch.from_numpy(images[0]), torch.from_numpy(reference))
    print(f"[stadi-qwen-image] exact, decoded image: rel. error vs 1 process = {error:.2e}")
    assert error <= 1e-4


def _check_calls(result: dict) -> None:
    assert result["calls"]["attn"] == 2 * result["calls"]["forward"]


def test_stale_modes_follow_the_plan_and_repeat(two_ranks, reference):
    check_stale_runs("stadi-qwen-image", two_ranks, reference, _check_calls)
