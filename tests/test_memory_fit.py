"""Plans that fit (issue 27, first stage): the store's dtype chosen against each rank's memory budget.

The planner (`planner.memory.fit_kv_store`, pure Python) under hypothesis; then the store on 2 gloo ranks
with `--stadi_memory_budget`: a budget between the bfloat16 and the float32 store narrows it to bfloat16, one
below the bfloat16 store is refused in one line before the store holds anything.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.planner.memory import DTYPE_BYTES, GIB, StoreDoesNotFit, fit_kv_store

PROPERTIES = settings(max_examples=200, deadline=None)
values_st = st.integers(min_value=0, max_value=2**40)
budgets_st = st.lists(st.one_of(st.none(), st.floats(min_value=1.0, max_value=2.0**43)), min_size=1, max_size=8)


@PROPERTIES
@given(values=values_st, budgets=budgets_st, computed=st.sampled_from(sorted(DTYPE_BYTES)))
def test_a_fitted_store_never_exceeds_a_known_budget_and_is_refused_only_when_nothing_fits(values, budgets, computed):
    known = [b for b in budgets if b is not None]
    smallest = values * min(DTYPE_BYTES[computed], 2)  # bfloat16 is the narrowest lever built
    try:
        fit = fit_kv_store(values, computed, budgets)
    except StoreDoesNotFit:
        assert known and smallest > min(known)
        return
    assert not known or fit.bytes_per_rank <= min(known)
    assert fit.bytes_per_rank == values * DTYPE_BYTES[fit.kv_dtype]


@PROPERTIES
@given(values=values_st, budgets=budgets_st, computed=st.sampled_from(sorted(DTYPE_BYTES)))
def test_levers_are_taken_in_order_and_none_when_everything_fits(values, budgets, computed):
    known = [b for b in budgets if b is not None]
    as_computed = values * DTYPE_BYTES[computed]
    if not known or as_computed <= min(known):  # fits as computed: the unconstrained store
        fit = fit_kv_store(values, computed, budgets)
        assert (fit.kv_dtype, fit.narrowed) == (computed, False)
    elif computed == "float32" and values * 2 <= min(known):  # the first lever: bfloat16
        fit = fit_kv_store(values, computed, budgets)
        assert (fit.kv_dtype, fit.narrowed) == ("bfloat16", True)


@PROPERTIES
@given(values=st.integers(min_value=1, max_value=2**34), requested=st.sampled_from(["float32", "bfloat16", "float16"]),
       budget=st.floats(min_value=1.0, max_value=2.0**40))
def test_a_named_dtype_is_kept_and_only_checked(values, requested, budget):
    need = values * DTYPE_BYTES[requested]
    if need <= budget:
        fit = fit_kv_store(values, "float32", [budget], requested=requested)
        assert (fit.kv_dtype, fit.narrowed) == (requested, False)
    else:
        with pytest.raises(StoreDoesNotFit):
            fit_kv_store(values, "float32", [budget], requested=requested)


def test_the_refusal_names_the_tightest_rank_its_budget_the_smallest_store_and_the_flags():
    values = 3 * GIB // 4  # 3 GiB in float32, 1.5 GiB in bfloat16
    with pytest.raises(StoreDoesNotFit) as info:
        fit_kv_store(values, "float32", [80 * GIB, 1 * GIB, None, 24 * GIB], requested="float32",
                     remedies=("--use_cfg_parallel",))
    assert str(info.value) == (
        "--stadi_memory_budget: the displaced K/V store needs 3.00 GiB per rank in float32, more than rank 1's "
        "1.00 GiB; the smallest store (bfloat16) needs 1.50 GiB; use --stadi_kv_dtype bfloat16, --use_cfg_parallel, "
        "a smaller --height/--width, --stadi_exact")


# --- the store on 2 ranks ---------------------------------------------------------------------------------

STEPS = 6


def _run(rank: int, world: int, runs: list[dict]) -> list[dict]:
    from stadi_xdit.families.pixart import build_pixart_pipeline, pixart_conformance_inputs
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline
    from stadi_xdit.xdit.build import build_stadi_pipeline

    results = []
    for run in runs:
        inputs = {**pixart_conformance_inputs(), "num_inference_steps": STEPS}
        pipe = build_stadi_pipeline(StadiPixArtAlphaPipeline, build_pixart_pipeline("tiny"), size=inputs["height"],
                                    steps=STEPS, model="tiny", stadi_mode="full", stadi_speeds="1,0.5",
                                    warmup_steps=run.get("warmup", 2), **run.get("stadi", {}))
        try:
            out = pipe(**inputs, output_type="latent", generator=torch.Generator().manual_seed(0))
        except ValueError as error:
            results.append({"refused": str(error), "store_bytes": pipe.kv_store.memory_bytes()})
            continue
        exchange = pipe.last_result.kv_exchange
        results.append({"latents": out.images, "kv_dtype": exchange["kv_dtype"], "buffer_bytes": exchange["buffer_bytes"],
                        "fit": exchange.get("memory_fit")})
    return results


@pytest.fixture(scope="module")
def runs() -> list[list[dict]]:
    # The tiny PixArt's store at 112x80, CFG batched: 35 tokens x 2 layers x 2 x 2 x 16 values; 17,920 B in
    # float32 (measured by the first run), so a budget of 12 KiB lies between the bfloat16 and float32 stores.
    kib = 1 / 2**20  # GiB
    plan = [{}, {"stadi": {"stadi_memory_budget": f"{12 * kib},{100 * kib}"}},
            {"stadi": {"stadi_memory_budget": f"{12 * kib},{100 * kib}"}, "warmup": 1},
            {"stadi": {"stadi_memory_budget": f"{100 * kib},{4 * kib}"}},
            {"stadi": {"stadi_memory_budget": f"{12 * kib},{12 * kib}", "stadi_kv_dtype": "bfloat16"}},
            {"stadi": {"stadi_memory_budget": f"{100 * kib},{100 * kib}"}}]
    return run_distributed(_run, 2, plan, timeout=300)


def test_a_budget_between_the_bfloat16_and_float32_stores_narrows_it(runs):
    for rank, (free, narrowed, narrowed_seeded, _, named, _) in enumerate(runs):
        assert free["kv_dtype"] == "float32" and free["fit"] is None and free["buffer_bytes"] == 17920, free
        for run in (narrowed, narrowed_seeded):  # warmup 2: the buffer is allocated; warmup 1: built from seeds
            assert run["kv_dtype"] == "bfloat16" and run["buffer_bytes"] == 17920 // 2, (rank, run)
            assert run["fit"] == "bfloat16 (narrowed): 8.75 KiB per rank fits rank 0's 12.00 KiB", run["fit"]
        # Narrowed by the budget is what --stadi_kv_dtype bfloat16 gives; the rounded stale K/V move the output.
        assert torch.equal(narrowed["latents"], named["latents"]), rank
        assert not torch.equal(narrowed["latents"], free["latents"]), rank


def test_a_budget_below_the_smallest_store_is_refused_before_the_store_holds_anything(runs):
    for rank, run in enumerate(runs):
        refused = run[3]
        assert refused["refused"] == ("--stadi_memory_budget: the displaced K/V store needs 8.75 KiB per rank in "
                                      "bfloat16, more than rank 1's 4.00 KiB; the smallest store (bfloat16) needs "
                                      "8.75 KiB; use --use_cfg_parallel, a smaller --height/--width, --stadi_exact"), \
            refused
        assert "\n" not in refused["refused"] and refused["store_bytes"] < 17920 // 2, (rank, refused)


def test_a_named_dtype_is_kept_and_a_roomy_budget_changes_nothing(runs):
    for rank, (free, *_, named, roomy) in enumerate(runs):
        assert named["kv_dtype"] == "bfloat16" and named["fit"].startswith("bfloat16: "), named
        assert roomy["kv_dtype"] == "float32" and roomy["fit"].startswith("float32: "), roomy
        assert torch.equal(roomy["latents"], free["latents"]), rank
