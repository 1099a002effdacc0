"""Comparisons and fault injection shared by the multi-process STADI tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """||test - reference|| / ||reference||."""
    return ((test - reference).norm() / reference.norm()).item()


@contextlib.contextmanager
def counted_calls(transformer: torch.nn.Module,
                  attention: dict[str, Iterable[torch.nn.Module]]) -> Iterator[tuple[dict[str, int], set[int]]]:
    """Count, while the block runs, the transformer's forwards (``calls["forward"]``), the calls of each
    named group of attention modules (``calls[name]``), and the batch sizes its ``hidden_states`` had."""
    calls = {"forward": 0, **{name: 0 for name in attention}}
    batches: set[int] = set()

    def counter(kind: str):
        def hook(*_):
            calls[kind] += 1
        return hook

    def see_batch(_module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # PixArt: positional
        batches.add(hidden_states.shape[0])

    hooks = [transformer.register_forward_pre_hook(counter("forward")),
             transformer.register_forward_pre_hook(see_batch, with_kwargs=True)]
    for name, modules in attention.items():
        hooks += [module.register_forward_pre_hook(counter(name)) for module in modules]
    try:
        yield calls, batches
    finally:
        for hook in hooks:
            hook.remove()


STALE_MODES = ("uniform", "spatial", "full")


def check_stale_runs(tag: str, two_ranks: list[list[dict]], reference: torch.Tensor,
                     check_calls: Callable[[dict], None]) -> None:
    """The stale-mode checks a family test shares, on the runs of one 2-rank job.

    `two_ranks[rank]` holds that rank's results of the runs [exact, exact decoded, uniform, spatial,
    full, full again, uniform with the exchange broken], each a dict with `plan`, `num_evals`,
    `calls` (forward and attention call counts) and `images` (the final latent). Every rank derives
    the same plan and runs exactly its evaluations; ranks agree; full mode has strides (1, 2) and
    repeats bit for bit; and stale K/V are far closer to one process than no foreign K/V at all.
    """
    from stadi_xdit.bench.metrics import psnr

    broken = two_ranks[0][6]["images"]
    without_exchange = relative_error(broken, reference)
    print(f"[{tag}] foreign K/V ignored (fault injection): rel. error = {without_exchange:.2e}, "
          f"PSNR {psnr(reference, broken):.1f} dB")
    for index, mode in enumerate(STALE_MODES, start=2):
        per_rank = [runs[index] for runs in two_ranks]
        plan = per_rank[0]["plan"]
        assert plan.mode == mode
        for rank, result in enumerate(per_rank):
            assert result["plan"] == plan, "every rank must derive the same plan"
            assert result["num_evals"] == result["calls"]["forward"] == plan.ranks[rank].num_evals, (mode, rank)
            check_calls(result)
            assert torch.equal(result["images"], per_rank[0]["images"]), "ranks disagree on the final latent"
        error = relative_error(per_rank[0]["images"], reference)
        print(f"[{tag}] mode={mode} bands={plan.row_bounds()} strides={[r.stride for r in plan.ranks]} "
              f"evals={[r['num_evals'] for r in per_rank]} rel. error vs 1 process = {error:.2e}, "
              f"PSNR {psnr(reference, per_rank[0]['images']):.1f} dB")
        if mode != "full":  # full also skips steps, a different error source
            # The displaced exchange must matter: stale K/V are far closer than no foreign K/V.
            assert error * 4 < without_exchange, (mode, error, without_exchange)
        assert error < 0.1, (mode, error)
    assert [r.stride for r in two_ranks[0][4]["plan"].ranks] == [1, 2]
    for runs in two_ranks:
        assert torch.equal(runs[4]["images"], runs[5]["images"]), "runs must repeat bit for bit"
