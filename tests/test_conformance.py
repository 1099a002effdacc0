"""The conformance suite: every twin of every family passes the same checks on its `ConformanceCase`.

A case (`FamilySpec.conformance`, `stadi_xdit/families/<name>.py`) is one seeded call of the tiny model
on an image or clip with an odd number of token rows. On it:

- exact mode equals one process on 2 and on 3 ranks with uneven bands, and decodes like it;
- one CFG branch per rank (`--use_cfg_parallel`) equals one process too, where the family has CFG;
- the stale modes: every rank derives the same plan and runs exactly its evaluations, ranks agree,
  full mode repeats bit for bit, and stale K/V beat no foreign K/V at all (fault injection) by far;
- every displaced attention module runs the family's STADI processor, once per forward.

One 2-rank job (7 runs) and one 3-rank job serve each case; the CFG-parallel run is a third job.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from stadi_xdit.families import conformance_cases
from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.testing.checks import STALE_MODES, check_stale_runs, counted_calls, relative_error
from stadi_xdit.xdit.build import build_stadi_pipeline

CASES = conformance_cases()
EXACT = {"stadi_exact": True, "stadi_mode": "spatial", "warmup_steps": 2}
EXACT_SPEEDS = {2: (3, 5), 3: (2, 3, 5)}
TWO_RANK_RUNS = [
    {**EXACT, "stadi_speeds": "3,5"},
    {**EXACT, "stadi_speeds": "3,5", "output_type": "np"},
    *({"stadi_mode": mode, "stadi_speeds": "1,0.5", "warmup_steps": 2} for mode in STALE_MODES),
    {"stadi_mode": "full", "stadi_speeds": "1,0.5", "warmup_steps": 2},  # determinism
    {"stadi_mode": "uniform", "stadi_speeds": "1,0.5", "warmup_steps": 2, "ignore_foreign_bands": True},
]


def _output(case, out):
    return None if out is None else getattr(out, case.output)


def _call(case, output_type: str) -> dict:
    """The case's inputs with `output_type` and its seeded generator: the same call on every rank."""
    return {**case.inputs(), "output_type": output_type, "generator": torch.Generator().manual_seed(case.seed)}


def _run(rank: int, world: int, twin_name: str, runs: list[dict]) -> list[dict]:
    """One STADI pipeline of `twin_name`'s case per entry of `runs` (StadiArgs keywords), run once each."""
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)

    case = conformance_cases()[twin_name]
    twin = case.twin_class()
    results = []
    for kwargs in runs:
        kwargs = dict(kwargs)
        output_type = kwargs.pop("output_type", "latent")
        inputs = case.inputs()
        pipe = build_stadi_pipeline(twin, case.build(), size=inputs["height"], steps=inputs["num_inference_steps"],
                                    model=f"tiny-{twin_name}", **kwargs)
        transformer = pipe.module.transformer
        displaced = twin.injection_plan.displaced_attention(transformer)
        with counted_calls(transformer, {"displaced": displaced}) as (calls, batches):
            out = pipe(**_call(case, output_type))
        result = pipe.last_result
        results.append({"images": _output(case, out), "plan": result.plan, "num_evals": result.num_evals,
                        "calls": calls, "batches": sorted(batches), "displaced": len(displaced),
                        "processors": sorted({type(module.processor).__name__ for module in displaced}),
                        "expected_processor": twin.injection_plan.processor_factory.__name__})
    return results


def _reference(twin_name: str, output_type: str):
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)

    case = CASES[twin_name]
    return _output(case, case.build()(**_call(case, output_type)))


def _check_proportional(bands: list[tuple[int, int]], rows: int, speeds: tuple[int, ...]) -> None:
    """Exact spatial bands: contiguous, covering every row, each within one row of its speed's share."""
    assert bands[0][0] == 0 and bands[-1][1] == rows and all(a[1] == b[0] for a, b in itertools.pairwise(bands))
    for (start, end), speed in zip(bands, speeds):
        assert abs((end - start) - rows * speed / sum(speeds)) < 1, (bands, speeds)


@pytest.fixture(scope="module", params=sorted(CASES))
def twin_name(request) -> str:
    """The case's twin class name (a family has one case per twin)."""
    return request.param


@pytest.fixture(scope="module")
def reference(twin_name) -> torch.Tensor:
    return _reference(twin_name, "latent")


@pytest.fixture(scope="module")
def two_ranks(twin_name) -> list[list[dict]]:
    return run_distributed(_run, 2, twin_name, TWO_RANK_RUNS, timeout=300)


def _check_exact(twin_name: str, per_rank: list[dict], reference: torch.Tensor) -> None:
    case = CASES[twin_name]
    assert case.rows % 2 == 1, "the case must have an odd number of token rows"
    bands = per_rank[0]["plan"].row_bounds()
    _check_proportional(bands, case.rows, EXACT_SPEEDS[len(per_rank)])
    for rank, result in enumerate(per_rank):
        assert result["processors"] == [result["expected_processor"]]
        assert result["plan"].row_bounds() == bands, "every rank must derive the same bands"
        assert result["batches"] == [case.guidance_branches], "a CFG pair runs as one batch"
        steps = case.inputs()["num_inference_steps"]
        assert result["calls"] == {"forward": steps, "displaced": result["displaced"] * steps}
        error = relative_error(result["images"], reference)
        print(f"[conformance {twin_name}] exact, {len(per_rank)} ranks, rank {rank}: rel. error vs 1 process = "
              f"{error:.2e}")
        assert error <= 1e-4, f"rank {rank}"


# Exact mode: every layer gathers fresh K/V every step, so any band split equals one process.
def test_exact_mode_equals_one_process_on_2_ranks(twin_name, two_ranks, reference):
    _check_exact(twin_name, [per_run[0] for per_run in two_ranks], reference)


def test_exact_mode_equals_one_process_on_3_ranks(twin_name, reference):
    results = run_distributed(_run, 3, twin_name, [{**EXACT, "stadi_speeds": "2,3,5"}], timeout=300)
    _check_exact(twin_name, [per_run[0] for per_run in results], reference)


def test_exact_mode_decodes_like_one_process(twin_name, two_ranks):
    decoded = _reference(twin_name, "np")
    outputs = [per_run[1]["images"] for per_run in two_ranks]
    assert outputs[1] is None, "only the output rank (STADI rank 0) decodes"
    assert outputs[0].shape == decoded.shape
    error = relative_error(torch.from_numpy(outputs[0]), torch.from_numpy(decoded))
    print(f"[conformance {twin_name}] exact, decoded: rel. error vs 1 process = {error:.2e}")
    assert error <= 1e-4


def test_cfg_parallel_exact_equals_one_process(twin_name, reference):
    """`--use_cfg_parallel` on 2 ranks: one CFG branch per rank (batch 1 per forward), paired every step.

    Bands under CFG parallelism are the loop's business, tested on 4 ranks in test_stadi_cfg.py;
    one rank per branch keeps each family's branch split cheap to check.
    """
    if CASES[twin_name].guidance_branches == 1:
        pytest.skip(f"{twin_name} runs no CFG branches (guidance distilled)")
    results = run_distributed(_run, 2, twin_name, [{**EXACT, "stadi_speeds": "1", "use_cfg_parallel": True}],
                              timeout=300)
    for rank, (result,) in enumerate(results):
        assert result["batches"] == [1]
        error = relative_error(result["images"], reference)
        print(f"[conformance {twin_name}] exact, CFG-parallel on 2 ranks, rank {rank}: rel. error vs 1 process = "
              f"{error:.2e}")
        assert error <= 1e-4, f"rank {rank}"


def test_stale_modes_follow_the_plan_and_repeat(twin_name, two_ranks, reference):
    def every_displaced_module_once_per_forward(result: dict) -> None:
        assert result["calls"]["displaced"] == result["displaced"] * result["calls"]["forward"]

    check_stale_runs(f"conformance {twin_name}", two_ranks, reference, every_displaced_module_once_per_forward)
