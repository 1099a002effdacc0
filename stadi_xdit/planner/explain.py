"""Human-readable rendering of a ``Plan`` (used by ``Plan.explain()`` and the ``stadi-plan`` CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plan_types imports this module (Plan.explain); at run time a Plan is passed in
    from .plan_types import Plan

_HEADER = (
    f"{'rank':>4}  {'rows [start, end)':<18} {'#rows':>6} {'speed':>9} {'stride':>6} {'evals':>5} "
    f"{'busy':>10} {'idle':>10}"
)


def format_plan(plan: Plan) -> str:
    predicted = plan.predicted
    lines = [
        (
            f"STADI plan, mode={plan.mode}: {len(plan.ranks)} ranks, {plan.rows} latent rows "
            f"(align {plan.align}), {plan.num_steps} steps = {plan.warmup_steps} warmup + "
            f"{plan.num_base_steps} base steps"
        ),
        _HEADER,
    ]
    for rank in plan.ranks:
        lines.append(
            f"{rank.rank:>4}  {f'[{rank.row_start}, {rank.row_end})':<18} {rank.num_rows:>6} "
            f"{plan.speeds[rank.rank]:>9.4g} {rank.stride:>6} {rank.num_evals:>5} "
            f"{predicted.busy_seconds[rank.rank]:>10.4g} {predicted.idle_seconds[rank.rank]:>10.4g}"
        )
    warmup_rows = [end - start for start, end in plan.warmup_row_bounds]
    lines += [
        f"warmup rows per rank: {_join(warmup_rows)}",
        f"period L = {plan.period}; {len(plan.sync_points)} sync points at k = {_join(plan.sync_points)}",
        (
            f"predicted: {predicted.total_seconds:.4g} s total ({predicted.warmup_seconds:.4g} s warmup) "
            f"vs {predicted.uniform_total_seconds:.4g} s uniform -> speedup {predicted.speedup_vs_uniform:.3f}x"
        ),
    ]
    return "\n".join(lines)


def _join(values: Sequence[int], keep: int = 6) -> str:
    """Comma-separated values; long lists keep their first and last few (64 ranks fit on one line)."""
    if len(values) <= 2 * keep:
        return ", ".join(str(value) for value in values)
    head = ", ".join(str(value) for value in values[:keep])
    tail = ", ".join(str(value) for value in values[-keep:])
    return f"{head}, ..., {tail}"
