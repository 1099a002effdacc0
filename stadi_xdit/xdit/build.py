"""Building a STADI pipeline from StadiArgs keywords in one call, and the fault injection that shows
what the displaced K/V exchange is worth (the quality benchmarks and the conformance tests use both)."""

from __future__ import annotations

import torch

from stadi_xdit.runtime.kv import DisplacedKVStore


def build_stadi_pipeline(pipeline_cls: type, diffusers_pipeline, *, size: int, steps: int, model: str = "tiny",
                         dtype: torch.dtype = torch.float32, **stadi_args):
    """A STADI pipeline (float32 unless `dtype`) configured from `StadiArgs` keywords, as the benchmarks,
    the tests and the GPU check run it.

    `ignore_foreign_bands=True` among the keywords also injects the broken-exchange fault.
    """
    from stadi_xdit.xdit.args import StadiArgs

    corrupt = stadi_args.pop("ignore_foreign_bands", False)
    args = StadiArgs(model=model, use_stadi=True, height=size, width=size, num_inference_steps=steps, **stadi_args)
    args.stadi_pipeline_class = pipeline_cls  # the launch checks follow its family
    engine_config, _ = args.create_config()
    engine_config.runtime_config.dtype = dtype
    pipe = pipeline_cls(diffusers_pipeline, engine_config)
    if corrupt:
        ignore_foreign_bands(pipe.kv_store)
    return pipe


def ignore_foreign_bands(store: DisplacedKVStore) -> None:
    """Fault injection: displaced attention sees zeros instead of the other bands' K/V.

    Synchronous steps stay exact, so the damage is exactly what a broken exchange would do.
    """
    exact = store.full_kv

    def own_band_only(layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full_key, full_value = exact(layer, key, value)
        if store.synchronous:
            return full_key, full_value
        start, end = store.own_range
        masked = [torch.zeros_like(t) for t in (full_key, full_value)]
        for dst, src in zip(masked, (full_key, full_value)):
            dst[:, :, start:end] = src[:, :, start:end]
        return masked[0], masked[1]

    store.full_kv = own_band_only
