"""STADI on tiny Wan 2.1 text-to-video (2 blocks, UMT5, CFG with a negative prompt) on 2-3 gloo ranks.

17 frames at 48x64 px are 5 latent frames (odd) of 3x4 tokens: 15 token rows of the clip, the band
unit. Speeds 1,2 give bands of 5/10 rows and 2,3,5 of 3/4/8 rows, so bands start and end inside
frames. Wan's 3D RoPE gives every token its absolute (frame, row, column), so a band run with its own
(local) positions would show. The scheduler is Wan's own UniPC multistep,
whose history and corrector state are re-banded at the transition. The checks every family passes
are the conformance suite's (tests/test_conformance.py); one 2-rank job serves Wan's own here.
"""

from __future__ import annotations

import pytest
import torch

from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.testing.checks import counted_calls, relative_error
from stadi_xdit.xdit.build import build_stadi_pipeline

SEED = 1
HEIGHT, WIDTH, FRAMES = 48, 64, 17  # 5 latent frames x (3 x 4) tokens = 15 token rows of 4 tokens
STEPS = 8
EXACT = {"stadi_exact": True, "stadi_mode": "spatial", "warmup_steps": 2}
BAD_INPUTS = [  # (pipeline call overrides, what the one line must name)
    ({"num_frames": 16}, "--num_frames must be 4k+1"),
    ({"num_frames": 1, "height": 16}, "--num_frames/--height give 1 token rows of the clip"),
    ({"height": 40}, "--height/--width must be multiples of 16"),
]
# The family's generic checks (exact on 2 and 3 ranks with Wan's UniPC, decoding, CFG-parallel, the stale
# modes) are the conformance suite's (tests/test_conformance.py, on families/wan.py's case); this job holds
# what is Wan's own: another scheduler, the one-line refusals, and `remove_stadi` restoring the RoPE module.
TWO_RANK_RUNS = [
    {**EXACT, "stadi_speeds": "1,2", "scheduler": "flow_euler"},
    {"stadi_mode": "full", "stadi_speeds": "1,0.5", "warmup_steps": 2, "scheduler": "flow_euler"},
    *({"stadi_mode": "uniform", "warmup_steps": 1, "bad": bad} for bad in range(len(BAD_INPUTS))),
    {"stadi_mode": "uniform", "warmup_steps": 1, "scheduler": "ddpm"},
]


def _call(output_type: str, **overrides) -> dict:
    return {"prompt": "a cat walks", "negative_prompt": "blurry", "guidance_scale": 5.0, "height": HEIGHT,
            "width": WIDTH, "num_frames": FRAMES, "num_inference_steps": STEPS, "max_sequence_length": 16,
            "output_type": output_type, "generator": torch.Generator().manual_seed(SEED), **overrides}


def _pipeline(scheduler: str = "unipc"):
    from stadi_xdit.families.wan import build_wan_pipeline

    if scheduler == "ddpm":
        from diffusers import DDPMScheduler

        pipe = build_wan_pipeline()
        pipe.scheduler = DDPMScheduler()
        return pipe
    return build_wan_pipeline(scheduler=scheduler)


def _reference(output_type: str, scheduler: str = "unipc"):
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)

    return _pipeline(scheduler)(**_call(output_type)).frames


def _run_stadi(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """Build one STADI Wan pipeline per entry of `runs` (StadiArgs keywords) and run it once."""
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.models.wan import StadiWanPipeline

    results = []
    for kwargs in runs:
        kwargs = dict(kwargs)
        output_type = kwargs.pop("output_type", "latent")
        scheduler = kwargs.pop("scheduler", "unipc")
        bad = kwargs.pop("bad", None)
        try:
            pipe = build_stadi_pipeline(StadiWanPipeline, _pipeline(scheduler), size=HEIGHT, steps=STEPS,
                                        model="tiny-wan", **kwargs)
            if bad is not None:
                pipe(**_call(output_type, **BAD_INPUTS[bad][0]))
        except ValueError as error:
            results.append({"error": str(error)})
            continue
        if bad is not None:
            results.append({"error": None})
            continue
        transformer = pipe.module.transformer
        with counted_calls(transformer, {"attn": [block.attn1 for block in transformer.blocks]}) as (calls, batches):
            out = pipe(**_call(output_type))
        result = pipe.last_result
        processors = sorted({type(p).__name__ for name, p in transformer.attn_processors.items()
                             if ".attn1." in name})
        rope_during = type(transformer.rope).__name__
        pipe.remove_stadi()  # diffusers' processors and RoPE module back
        restored = (rope_during == "BandRope" and type(transformer.rope).__name__ == "WanRotaryPosEmbed"
                    and {type(p).__name__ for p in transformer.attn_processors.values()} == {"WanAttnProcessor"})
        results.append({"images": None if out is None else out.frames, "plan": result.plan, "restored": restored,
                        "num_evals": result.num_evals, "calls": calls, "batches": sorted(batches),
                        "processors": processors,
                        "exchange": result.kv_exchange})
    return results


@pytest.fixture(scope="module")
def two_ranks() -> list[list[dict]]:
    return run_distributed(_run_stadi, 2, TWO_RANK_RUNS, timeout=300)


def _check_exact(per_rank: list[dict], reference: torch.Tensor, bands: list[tuple[int, int]], label: str) -> None:
    for rank, result in enumerate(per_rank):
        assert result["processors"] == ["StadiWanAttnProcessor"] and result["restored"]
        assert result["plan"].row_bounds() == bands
        assert result["batches"] == [2], "the CFG pair runs as one batch"
        assert result["calls"] == {"forward": STEPS, "attn": 2 * STEPS}
        error = relative_error(result["images"], reference)
        print(f"[stadi-wan] exact, {label}, rank {rank}: rel. error vs 1 process = {error:.2e}")
        assert error <= 1e-4, f"rank {rank}"


def test_exact_mode_with_flow_match_euler(two_ranks):
    _check_exact([per_run[0] for per_run in two_ranks], _reference("latent", "flow_euler"), [(0, 5), (5, 15)],
                 "2 ranks (FlowMatchEuler)")


def test_full_mode_with_flow_match_euler(two_ranks):
    reference = _reference("latent", "flow_euler")
    per_rank = [two_ranks[rank][1] for rank in range(2)]
    assert [r.stride for r in per_rank[0]["plan"].ranks] == [1, 2]
    for rank, result in enumerate(per_rank):
        assert result["num_evals"] == result["calls"]["forward"] == per_rank[0]["plan"].ranks[rank].num_evals
    error = relative_error(per_rank[0]["images"], reference)
    print(f"[stadi-wan] mode=full (FlowMatchEuler): rel. error vs 1 process = {error:.2e}")
    assert error < 0.1


def test_bad_input_is_one_line(two_ranks):
    first_bad = 2
    for offset, (_, needle) in enumerate(BAD_INPUTS):
        for per_rank in two_ranks:
            error = per_rank[first_bad + offset]["error"]
            assert error is not None and needle in error and "\n" not in error, (needle, error)
    for per_rank in two_ranks:
        error = per_rank[first_bad + len(BAD_INPUTS)]["error"]
        assert error is not None and "DDPMScheduler" in error and "\n" not in error, error


# --- in-process checks -------------------------------------------------------------------------


def test_unipc_subsequence_equals_unipc_on_the_sublist():
    """Restricting UniPC after W full-grid steps == UniPC run over the visited sub-list from the start."""
    from stadi_xdit.families.wan import wan_scheduler
    from stadi_xdit.runtime.schedule import rank_schedule_indices, restrict_to_indices

    warmup, steps, base_steps = 2, 11, (0, 2, 4, 6, 8)
    indices = rank_schedule_indices(warmup, base_steps)
    sample0 = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a smooth stand-in denoiser
        return torch.tanh(x) * (1 + t.float() / 1000) - 0.3 * x

    def run(restrict_first: bool) -> torch.Tensor:
        scheduler = wan_scheduler()
        scheduler.set_timesteps(steps)
        scheduler.set_begin_index(0)
        if restrict_first:
            restrict_to_indices(scheduler, indices)
        x = sample0.clone()
        for i in range(len(indices)):
            if i == warmup and not restrict_first:
                restrict_to_indices(scheduler, indices)
            t = scheduler.timesteps[i]
            x = scheduler.step(model(x, t), t, x, return_dict=False)[0]
        return x

    assert torch.equal(run(False), run(True))


def test_displaced_kv_bytes_and_memory_refusal(monkeypatch):
    from stadi_xdit.families.wan import wan_transformer_config
    from stadi_xdit.models.wan import kv_memory_report
    from stadi_xdit.runtime.video_bands import check_kv_memory, displaced_kv_bytes

    size = displaced_kv_bytes(wan_transformer_config("wan2.1-t2v-14b-720p"), 720, 1280, 81)
    assert size == 75600 * 40 * 2 * 5120 * 2  # 61.9 GB per rank, one CFG branch
    lines = kv_memory_report()
    print("[stadi-wan] displaced K/V per rank:\n  " + "\n  ".join(lines))
    assert any("wan2.1-t2v-1.3b" in line for line in lines)

    class Store:
        def memory_bytes(self) -> int:
            return 0

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 1024**3, 80 * 1024**3))
    with pytest.raises(ValueError) as info:
        check_kv_memory(Store(), size, torch.device("cuda", 0), "75600 tokens")
    assert "needs 57.7 GiB" in str(info.value) and "\n" not in str(info.value)
    check_kv_memory(Store(), 30 * 1024**3, torch.device("cuda", 0), "fits")
    check_kv_memory(Store(), size, torch.device("cpu"), "CPU is not checked")

# Through xDiT's runner (`xdit --model Wan2.1-T2V`), exact and with DistVAE: tests/test_runner_conformance.py.
