"""Plans that fit: how wide the displaced K/V store may be on ranks of given memory budgets. Pure Python.

Every rank's store holds the K and V of the whole image for every displaced layer, whatever its band, so
its size is the same on every rank: `values` (tokens x layers x 2 x heads x head_dim x batch) times the
bytes of the dtype it is stored in. The ranks exchange rows of their stores, so all of a group store in
one dtype. `fit_kv_store` picks that dtype against the tightest rank's budget, taking the levers in the
order of their quality cost:

1. the K/V as computed (no cost);
2. bfloat16 (measured: docs/benchmarks.md, `--stadi_kv_dtype` on the small preset and the toy DiT).

A dtype the user named (`--stadi_kv_dtype`) is kept: it is only checked. Where nothing fits, the refusal
names the rank, its budget, the smallest store and the flags that would get there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GIB = 2**30
# Stale stores narrower than float32, in the order of their quality cost.
NARROWER_STORES: tuple[tuple[str, int], ...] = (("bfloat16", 2),)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def shown_bytes(count: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best (a tiny test store is not "0.00 GiB")."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20)):
        if count >= size / 10:
            return f"{count / size:.2f} {unit}"
    return f"{count / 2**10:.2f} KiB"


def narrowest_bytes(computed: str) -> int:
    """Bytes per value of the narrowest store `fit_kv_store` may choose for K/V computed in `computed`."""
    return min(DTYPE_BYTES[computed], *(size for _, size in NARROWER_STORES))


class StoreDoesNotFit(ValueError):
    """No store dtype fits a rank's budget (one line: the rank, the budget, the smallest store, the flags)."""


@dataclass(frozen=True)
class StoreFit:
    """The store's dtype for this call, its bytes per rank, and why."""

    kv_dtype: str  # the dtype the stale K/V are stored and exchanged in
    narrowed: bool  # True where the budget took it below the K/V as computed
    bytes_per_rank: int
    reason: str


def fit_kv_store(values: int, computed: str, budgets: Sequence[float | None], *, requested: str | None = None,
                 source: str = "--stadi_memory_budget", remedies: Sequence[str] = ()) -> StoreFit:
    """The store dtype for `values` K/V values per rank computed in `computed` ("float32", "bfloat16", ...), on
    ranks that may each give the store `budgets[r]` bytes (None: unknown, not checked). `requested`: the dtype
    the user named (kept, only checked); None: the first lever that fits. `source` names where the budgets came
    from, and `remedies` are the flags besides a narrower dtype that would shrink the store."""
    if values < 0 or computed not in DTYPE_BYTES:
        raise ValueError(f"a store of {values} values computed in {computed!r}")
    options = [(requested, DTYPE_BYTES[requested])] if requested else \
        [(computed, DTYPE_BYTES[computed])] + [(name, size) for name, size in NARROWER_STORES
                                               if size < DTYPE_BYTES[computed]]
    known = [(budget, rank) for rank, budget in enumerate(budgets) if budget is not None]
    tightest = min(known) if known else None
    for name, size in options:
        need = values * size
        if tightest is None or need <= tightest[0]:
            if tightest is None:
                reason = "no budget known"
            else:
                reason = f"{shown_bytes(need)} per rank fits rank {tightest[1]}'s {shown_bytes(tightest[0])}"
            return StoreFit(name, name != computed and requested is None, need, reason)
    budget, rank = tightest
    name, size = options[-1]
    smallest_name, smallest_size = min([*options, *NARROWER_STORES], key=lambda option: option[1])
    flags = [*((f"--stadi_kv_dtype {smallest_name}",) if smallest_size < size else ()), *remedies,
             "a smaller --height/--width", "--stadi_exact"]
    raise StoreDoesNotFit(f"{source}: the displaced K/V store needs {shown_bytes(values * size)} per rank in {name}, "
                          f"more than rank {rank}'s {shown_bytes(budget)}; the smallest store ({smallest_name}) needs "
                          f"{shown_bytes(values * smallest_size)}; use {', '.join(flags)}")
