"""torch.compile over a STADI twin's transformer (issue 24, groundwork): the displaced K/V store is the compile
boundary, so dynamo traces attention's own tensor work and runs the exchange eagerly between the compiled
parts; band changes cost a bounded number of graphs, and a second call of the same size compiles nothing.

Compiled with dynamo's `eager` backend: it traces and guards as inductor would, without code generation, so
outputs must be bit-identical to the uncompiled run (inductor's own figures belong to the compile arms of
`stadi-bench`, which are not built yet; `--use_torch_compile` with `--use_stadi` is still refused).
"""

from __future__ import annotations

import torch


def compiled_flux_calls(rank: int, world: int, compiled: bool) -> dict:
    """A rank: two tiny Flux STADI calls (full mode, speeds 1:0.5, so bands change after warmup)."""
    from torch._dynamo.utils import counters

    from stadi_xdit.families.flux import flux_conformance_inputs, tiny_flux_pipeline
    from stadi_xdit.models.flux import StadiFluxPipeline
    from stadi_xdit.xdit.build import build_stadi_pipeline

    inputs = flux_conformance_inputs()
    pipe = build_stadi_pipeline(StadiFluxPipeline, tiny_flux_pipeline(), size=inputs["height"],
                                steps=inputs["num_inference_steps"], stadi_mode="full", stadi_speeds="1,0.5",
                                warmup_steps=2)
    if compiled:
        pipe.module.transformer = torch.compile(pipe.module.transformer, backend="eager")
    calls = []
    for _ in range(2):
        out = pipe(**inputs, output_type="latent", generator=torch.Generator().manual_seed(1))
        calls.append({"latents": out.images, "graphs": counters["stats"]["unique_graphs"],
                      "rows": sorted({record.rows for record in pipe.last_result.timeline.steps})})
    breaks = [reason.split("Developer debug context:")[-1] for reason in counters["graph_break"]]
    return {"calls": calls, "breaks": breaks}


def test_the_store_is_the_compile_boundary_and_a_second_call_compiles_nothing():
    from stadi_xdit.offline.spawn import run_distributed

    eager = run_distributed(compiled_flux_calls, 2, False, timeout=300)
    compiled = run_distributed(compiled_flux_calls, 2, True, timeout=300)
    for rank in range(2):
        (first, second), reference = compiled[rank]["calls"], eager[rank]["calls"]
        assert len(first["rows"]) == 2, first["rows"]  # warmup bands, then the plan's: the band size changed
        for call, expected in zip((first, second), reference):
            assert torch.equal(call["latents"], expected["latents"])
        assert second["graphs"] == first["graphs"] > 0  # the second call of the size: no new graph
        # Dynamo stops only where it is told to: at the store's entry (collectives, host timers, logging run
        # eagerly) and at the launcher's progress hook on each block; never inside the exchange.
        breaks = compiled[rank]["breaks"]
        assert breaks and all("_full_kv" in reason or "on_block" in reason for reason in breaks), breaks
