"""The batched K/V exchange (runtime/exchange.py, runtime/kv.py).

Single-process: the flat buffer's layout, buffer reuse, the method rule. Multi-process (gloo): collectives
per sync point (counted by wrapping torch's collectives), what arrives where, a dead peer named through
the new waits, and tiny PixArt runs for exactness, grouping invariance, determinism and the quality cost
of `--stadi_kv_dtype`. The calibrated cost model: test_calibration.py; the planner's per-rank overheads:
test_planner_overheads.py. No timing assertions.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import stadi_xdit.xdit  # noqa: F401  (compat layer first)
from stadi_xdit.bench.metrics import psnr
from stadi_xdit.offline.spawn import run_distributed
from stadi_xdit.runtime.comm import BandComm
from stadi_xdit.runtime.exchange import FlatKVBuffer, LayerRegistry, choose_method, method_bytes
from stadi_xdit.runtime.kv import DisplacedKVStore, kv_storage_dtype
from stadi_xdit.runtime.layout import BandView
from stadi_xdit.testing.checks import relative_error

BATCH, HEADS, HEAD_DIM = 2, 2, 4


# --------------------------------------------------------------------------------------------------
# the flat buffer and the method rule


def test_equal_bands_all_gather_uneven_bands_broadcast():
    assert choose_method([16, 16]) == "all_gather"
    assert choose_method([8, 8, 8]) == "all_gather"
    assert choose_method([21, 11]) == "broadcast"
    assert choose_method([5, 5, 6]) == "broadcast"  # 3 * 6 = 18 > 16: padding would cost more
    # gloo's all-gather is not in place: equal bytes, so the broadcasts win the tie there
    assert choose_method([16, 16], in_place_all_gather=False) == "broadcast"
    assert method_bytes([21, 11], 10) == {"broadcast": 320, "all_gather": 420}
    with pytest.raises(ValueError):
        choose_method([4, 0])


@pytest.mark.parametrize("group_layers", [1, 3, 7, 10])
def test_flat_buffer_slices_are_disjoint_and_cover_every_layer(group_layers):
    registry = LayerRegistry()
    shapes = [(2, 2, 4), (2, 2, 4), (1, 3, 2), (2, 2, 4), (2, 1, 8), (2, 2, 4), (1, 1, 1)]
    for layer, shape in enumerate(shapes):
        registry.register(layer, shape)
    registry.close(group_layers)
    assert registry.group_sizes == [len(shapes[i:i + group_layers]) for i in range(0, len(shapes), group_layers)]
    tokens = 5
    buffer = FlatKVBuffer(registry, tokens, torch.float32, torch.device("cpu"))
    assert buffer.flat.numel() == tokens * sum(2 * math.prod(shape) for shape in shapes)
    buffer.flat.fill_(-1.0)
    for layer in range(len(shapes)):
        view = buffer.layer_view(layer)
        assert view.shape == (tokens, 2, *shapes[layer])
        view[:, 0] = 2 * layer  # K
        view[:, 1] = 2 * layer + 1  # V
    assert (buffer.flat >= 0).all(), "every element belongs to some layer"
    for layer in range(len(shapes)):  # nothing written later overlapped an earlier layer
        view = buffer.layer_view(layer)
        assert (view[:, 0] == 2 * layer).all() and (view[:, 1] == 2 * layer + 1).all()
    # One band's rows of a whole group are one contiguous range of the flat buffer.
    for block in buffer.blocks:
        assert block[1:3].is_contiguous()
        assert block.untyped_storage().data_ptr() == buffer.flat.untyped_storage().data_ptr()


def test_layers_are_grouped_in_order_of_first_use():
    registry = LayerRegistry()
    for layer in (3, 1, 2, 0):
        registry.register(layer, (1, 1, 1))
    registry.close(2)
    assert [registry.slots[layer].group for layer in (3, 1, 2, 0)] == [0, 0, 1, 1]
    with pytest.raises(RuntimeError):
        registry.register(4, (1, 1, 1))


def _kv(layer: int, step: int, rank: int, tokens: int, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Recognisable K/V: the value says which layer, step and rank made it, and the token index."""
    base = float(1000 * step + 10 * layer + rank)
    key = base + 0.001 * torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1)
    key = key.expand(batch, HEADS, tokens, HEAD_DIM).clone()
    return key, -key


def test_store_reuses_its_buffers_across_periods():
    store = DisplacedKVStore(BandComm(None, 0, 1), group_layers=2)
    store.set_band(BandView.of_token_counts([6], 0))
    layers = 5
    store.set_phase(synchronous=True, publish=False)  # registration forward
    for layer in range(layers):
        key, value = _kv(layer, 0, 0, 6)
        full_key, full_value = store.full_kv(layer, key, value)
        assert torch.equal(full_key, key) and torch.equal(full_value, value)
    store.set_phase(synchronous=True, publish=True)  # seeding step
    for layer in range(layers):
        store.full_kv(layer, *_kv(layer, 1, 0, 6))
    pointers, sizes = set(), set()
    for step in range(2, 8):
        store.set_phase(synchronous=False, publish=step % 2 == 0)
        for layer in range(layers):
            key, value = _kv(layer, step, 0, 6)
            full_key, full_value = store.full_kv(layer, key, value)
            assert torch.equal(full_key, key) and torch.equal(full_value, value)
        pointers.add((store._buffer.flat.data_ptr(), store._staging.data_ptr()))
        sizes.add(store.memory_bytes())
    store.drain()
    assert len(pointers) == 1 and len(sizes) == 1, "buffers were re-allocated between periods"
    stats = store.stats()
    assert stats["layers"] == layers and stats["groups"] == 3 and stats["sync_points"] == 3
    assert stats["collectives_per_sync_point"] == 0  # one rank: nothing to send
    # The next run with the same shapes keeps the buffers; another batch size registers afresh.
    store.reset()
    flat = store._buffer.flat.data_ptr()
    store.set_phase(synchronous=True, publish=True)
    store.full_kv(0, *_kv(0, 0, 0, 6))
    assert store._buffer.flat.data_ptr() == flat
    store.set_phase(synchronous=True, publish=True)
    store.full_kv(0, *_kv(0, 0, 0, 6, batch=1))
    assert store.stats()["layers"] == 1
    store.set_phase(synchronous=False)
    with pytest.raises(RuntimeError, match="batch size"):
        store.full_kv(0, *_kv(0, 0, 0, 6))
    store.release()
    assert store.memory_bytes() == 0


def test_narrow_stale_storage_keeps_the_own_band_exact():
    store = DisplacedKVStore(BandComm(None, 0, 1), kv_dtype=kv_storage_dtype("bfloat16"))
    store.set_band(BandView.of_token_counts([6], 0))
    key, value = _kv(0, 0, 0, 6)
    store.full_kv(0, key, value)  # a fresh store seeds from synchronous steps
    store.set_phase(synchronous=False)
    key, value = _kv(0, 1, 0, 6)
    full_key, full_value = store.full_kv(0, key, value)
    assert full_key.dtype == torch.float32 and torch.equal(full_key, key) and torch.equal(full_value, value)
    assert store._buffer.flat.dtype == torch.bfloat16
    assert store.stale_bytes_ratio() == 0.5
    with pytest.raises(ValueError, match="--stadi_kv_dtype"):
        kv_storage_dtype("fp8")


def test_band_size_must_match_the_layout():
    store = DisplacedKVStore(BandComm(None, 0, 1))
    store.set_band(BandView.of_token_counts([6], 0))
    with pytest.raises(ValueError, match="6 tokens"):
        store.full_kv(0, *_kv(0, 0, 0, 5))
    with pytest.raises(ValueError, match="is not this store's rank 0 of 1"):
        store.set_band(BandView.of_token_counts([3, 3], 1))  # another rank's band, of another group


# --------------------------------------------------------------------------------------------------
# several ranks: counted collectives, delivered values, a dead peer


def _exchange_worker(rank: int, world: int, counts: list[int], group_layers: int, layers: int,
                     steps: int, in_place_all_gather: bool) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    from stadi_xdit.runtime import comm as comm_module
    from stadi_xdit.runtime import exchange, kv

    # gloo takes the broadcasts on a tie; pretend its all-gather is in place to test that path too.
    if in_place_all_gather:
        kv.choose_method = lambda counts, in_place_all_gather: exchange.choose_method(counts, True)

    calls = {"broadcast": 0, "all_gather": 0}
    broadcast, all_gather = dist.broadcast, comm_module._all_gather_single

    def counting_broadcast(*args, **kwargs):
        calls["broadcast"] += 1
        return broadcast(*args, **kwargs)

    def counting_all_gather(*args, **kwargs):
        calls["all_gather"] += 1
        return all_gather(*args, **kwargs)

    dist.broadcast, comm_module._all_gather_single = counting_broadcast, counting_all_gather
    comm = BandComm(None, rank, world, timedelta(seconds=120))
    store = DisplacedKVStore(comm, group_layers=group_layers)
    store.set_band(BandView.of_token_counts(counts, rank))
    bounds = list(itertools.accumulate([0, *counts]))

    def expected(layer: int, step_of_rank: list[int]) -> torch.Tensor:
        return torch.cat([_kv(layer, step_of_rank[r], r, counts[r])[0] for r in range(world)], dim=2)

    per_step, wrapped, pointers, errors = [], [], set(), []
    for step in range(steps):
        synchronous = step == 0
        publish = step < steps - 1  # every displaced step publishes (period 1) but the last
        store.set_phase(synchronous=synchronous, publish=publish)
        before = dict(calls)
        for layer in range(layers):
            full_key, full_value = store.full_kv(layer, *_kv(layer, step, rank, counts[rank]))
            # Synchronous: everyone's fresh K/V. Displaced: own band fresh, the others' from the last step.
            sources = [step if synchronous or r == rank else step - 1 for r in range(world)]
            want = expected(layer, sources)
            if not (torch.equal(full_key, want) and torch.equal(full_value, -want)):
                errors.append((step, layer))
            own = full_key[:, :, bounds[rank]:bounds[rank + 1]]
            if not torch.equal(own, _kv(layer, step, rank, counts[rank])[0]):
                errors.append(("own", step, layer))
        wrapped.append(before)
        if store._buffer is not None:
            pointers.add(store._buffer.flat.data_ptr())
    store.drain()
    # calls during step s (plus the deferred last group, sent at the next step's start) per step
    launched = [sum(after[k] - before[k] for k in calls) for before, after in zip(wrapped, [*wrapped[1:], calls])]
    per_step = launched
    return {"errors": errors, "per_step": per_step, "stats": store.stats(), "counts": store.counts,
            "pointers": len(pointers), "comm_collectives": comm.collectives, "calls": calls}


@pytest.mark.parametrize("counts,group_layers,in_place", [
    ([4, 4], 3, True),       # equal bands, in-place all-gather (NCCL's rule): one all-gather per group
    ([4, 4], 3, False),      # equal bands on gloo: one broadcast per source per group
    ([5, 3], 3, True),       # uneven: one broadcast per source per group, whatever the backend
    ([2, 3, 5], 2, False),   # 3 ranks, uneven
    ([3, 3, 3], 7, True),    # one group, one all-gather
    ([1, 6], 1, False),      # a group per layer (the old per-layer exchange, K and V together)
])
def test_grouped_exchange_counts_collectives_and_delivers_every_band(counts, group_layers, in_place):
    layers, steps = 7, 5
    world = len(counts)
    results = run_distributed(_exchange_worker, world, counts, group_layers, layers, steps, in_place,
                              init_process_group=True, timeout=180)
    groups = math.ceil(layers / group_layers)
    per_source = 1 if choose_method(counts, in_place) == "all_gather" else world
    for rank, result in enumerate(results):
        assert result["errors"] == [], (rank, result["errors"][:5])
        assert result["pointers"] == 1, "the flat buffer was re-allocated"
        stats = result["stats"]
        # Synchronous step: every layer gathers before its attention.
        assert result["per_step"][0] == layers * per_source
        # Publishing steps: one collective per group (all-gather) or per group and source (broadcast).
        assert result["per_step"][1:steps - 1] == [groups * per_source] * (steps - 2)
        assert result["per_step"][steps - 1] == 0  # the last step publishes nothing
        assert stats["collectives_per_sync_point"] == groups * per_source
        assert stats["collectives_per_synchronous_step"] == layers * per_source
        assert stats["sync_points"] == steps - 2
        assert result["comm_collectives"] == sum(result["calls"].values())
        width = layers * 2 * BATCH * HEADS * HEAD_DIM * 4
        assert stats["bytes_sent_per_sync_point"] == counts[rank] * width
        assert stats["buffer_bytes"] == sum(counts) * width


def _skipping_worker(rank: int, world: int, counts: list[int], layers_run: dict) -> dict:
    """Displaced steps that publish, where a step cache cut some ranks' forwards short: `layers_run[(rank,
    step)]` is how many leading layers that rank ran in that step (all, where not given)."""
    from datetime import timedelta

    layers, steps = 7, 5
    comm = BandComm(None, rank, world, timedelta(seconds=120))
    store = DisplacedKVStore(comm, group_layers=2)
    store.layers_may_skip = True
    store.set_band(BandView.of_token_counts(counts, rank))
    ran = {(r, step): layers_run.get(f"{r},{step}", layers) for r in range(world) for step in range(steps)}
    errors, per_sync_point = [], []
    for step in range(steps):
        store.set_phase(synchronous=step == 0, publish=step < steps - 1)
        before = store.counts["sync_point_collectives"]
        for layer in range(ran[(rank, step)]):
            full_key, _ = store.full_kv(layer, *_kv(layer, step, rank, counts[rank]))
            # A peer's band: from the last earlier step in which that peer ran this layer (its skipped
            # layers were published from the step that computed them); the own band: fresh.
            sources = [step if step == 0 or r == rank else
                       max(t for t in range(step) if ran[(r, t)] > layer) for r in range(world)]
            want = torch.cat([_kv(layer, sources[r], r, counts[r])[0] for r in range(world)], dim=2)
            if not torch.equal(full_key, want):
                errors.append((step, layer))
        per_sync_point.append(before)
    store.drain()
    return {"errors": errors, "counts": store.counts}


@pytest.mark.parametrize("counts", [[3, 5], [2, 3, 4]])
def test_a_publishing_step_cut_short_by_a_step_cache_publishes_the_last_computed_kv(counts):
    """Layers that a rank's step cache skipped still go out at the sync point, with the K/V of the step that
    last computed them, in the same group order on every rank (a rank that caches only waits there)."""
    world = len(counts)
    # Rank 1 ran no layer in step 1 (TeaCache skips them all) and only the first in step 2; rank 0 three in step 3.
    layers_run = {"1,1": 0, "1,2": 1, "0,3": 3}
    results = run_distributed(_skipping_worker, world, counts, layers_run, init_process_group=True, timeout=180)
    per_source = 1 if choose_method(counts, False) == "all_gather" else world
    for rank, result in enumerate(results):
        assert result["errors"] == [], (rank, result["errors"][:5])
        stats = result["counts"]
        assert stats["sync_points"] == 3  # steps 1-3 publish
        assert stats["max_sync_point_collectives"] == 4 * per_source  # 4 groups of 7 layers, every sync point
        assert stats["sync_point_collectives"] == 3 * 4 * per_source
        assert stats["skipped_layer_publishes"] == {0: 4, 1: 7 + 6}.get(rank, 0)


def test_a_layer_missing_from_a_publishing_step_is_an_error_without_a_step_cache():
    for may_skip in (False, True):
        store = DisplacedKVStore(BandComm(None, 0, 1), group_layers=2)
        store.layers_may_skip = may_skip
        store.set_band(BandView.of_token_counts([6], 0))
        for step in range(2):
            store.set_phase(synchronous=step == 0, publish=True)
            for layer in range(5 if step == 0 else 2):  # step 1 runs 2 of the 5 layers
                store.full_kv(layer, *_kv(layer, step, 0, 6))
        if not may_skip:
            with pytest.raises(RuntimeError, match="every displaced layer must run once per step"):
                store.set_phase(synchronous=False)
            continue
        store.set_phase(synchronous=False)  # a step cache: the last 3 layers publish what step 0 computed
        assert store.counts["skipped_layer_publishes"] == 3 and store.counts["sync_points"] == 1


def _dead_peer_worker(rank: int, world: int) -> str | None:
    import os
    from datetime import timedelta

    from stadi_xdit.runtime.faults import PeerFailure, PeerWatch

    comm = BandComm(None, rank, world, timedelta(seconds=5), watch=PeerWatch([0, 1], rank, 5.0))
    store = DisplacedKVStore(comm, group_layers=2)
    store.set_band(BandView.of_token_counts([3, 3], rank))
    try:
        for step in range(4):
            comm.enter("stadi", step)
            store.set_phase(synchronous=step == 0, publish=True)
            if rank == 1 and step == 2:
                os._exit(1)  # dies before publishing its second sync point
            for layer in range(3):
                store.full_kv(layer, *_kv(layer, step, rank, 3))
        store.drain()
    except PeerFailure as error:
        return str(error)
    return None


def test_a_dead_peer_is_named_by_the_exchange_waits():
    (message, _) = run_distributed(_dead_peer_worker, 2, init_process_group=True, timeout=120, faulty_ranks=(1,))
    assert message is not None and "\n" not in message
    assert message.startswith("stadi: peer rank 1 (global rank 1)") and "--stadi_timeout 5 s" in message


# --------------------------------------------------------------------------------------------------
# tiny PixArt on 2-3 ranks


@pytest.mark.parametrize("world,speeds,size,bands", [
    (2, "3,5", 128, [(0, 3), (3, 8)]),
    (3, "2,3,5", 160, [(0, 2), (2, 5), (5, 10)]),
])
def test_exact_mode_equals_one_process_and_keeps_no_stale_kv(tiny_pixart, world, speeds, size, bands):
    steps = 4
    reference = tiny_pixart.reference(size, steps)
    # (--stadi_kv_dtype is refused in exact mode: there are no stale K/V to store.)
    runs = [{"stadi_exact": True, "stadi_mode": "spatial", "stadi_speeds": speeds, "warmup_steps": 2,
             "group_layers": 1}]
    results = tiny_pixart.run(world, "alpha", size, steps, runs)
    for rank, (result,) in enumerate(results):
        assert result["plan"].row_bounds() == bands
        assert relative_error(result["latents"], reference) <= 1e-4, f"rank {rank}"
        exchange = result["exchange"]
        assert exchange["buffer_bytes"] == 0 and exchange["sync_points"] == 0
        assert exchange["collectives_per_synchronous_step"] == 2 * world  # 2 layers x one broadcast per source


def test_grouping_does_not_change_the_result_and_runs_repeat_bit_for_bit(tiny_pixart, report):
    steps, size = 6, 128
    reference = tiny_pixart.reference(size, steps)
    runs = []
    for mode in ("uniform", "spatial", "full"):
        for group_layers in (1, 2, 1):  # the last repeats the first
            runs.append({"stadi_mode": mode, "stadi_speeds": "1,0.5", "warmup_steps": 2,
                         "group_layers": group_layers})
    runs.append({"stadi_mode": "spatial", "stadi_speeds": "1,0.5", "warmup_steps": 2, "stadi_kv_dtype": "bfloat16"})
    runs.append({"stadi_mode": "uniform", "stadi_speeds": "1,0.5", "warmup_steps": 2, "stadi_kv_dtype": "bfloat16"})
    runs.append({"stadi_mode": "uniform", "stadi_speeds": "1,0.5", "warmup_steps": 2, "ignore_foreign_bands": True})
    results = tiny_pixart.run(2, "alpha", size, steps, runs, timeout=400)
    fault = psnr(reference, results[0][-1]["latents"])
    lines = [f"[exchange] foreign K/V ignored (fault injection): PSNR vs 1 process {fault:.1f} dB"]
    for index in range(0, 9, 3):
        per_rank = [results[rank][index:index + 3] for rank in range(2)]
        mode = per_rank[0][0]["plan"].mode
        for rank in range(2):
            first, other, repeat = per_rank[rank]
            assert torch.equal(first["latents"], other["latents"]), (mode, "group size changed the result")
            assert torch.equal(first["latents"], repeat["latents"]), (mode, "repeat run differs")
            assert torch.equal(first["latents"], per_rank[0][0]["latents"]), "ranks disagree"
            for result, group_layers in zip((first, other), (1, 2)):
                exchange = result["exchange"]
                assert exchange["method"] == "broadcast"  # gloo: uneven bands, or a tie on equal ones
                assert exchange["collectives_per_sync_point"] == math.ceil(2 / group_layers) * 2
        quality = psnr(reference, per_rank[0][0]["latents"])
        lines.append(f"[exchange] mode={mode} PSNR vs 1 process {quality:.1f} dB")
        if mode != "full":
            assert quality >= fault + 6.0, (mode, quality, fault)
    for index, mode in ((9, "spatial"), (10, "uniform")):
        narrow = results[0][index]
        wide = results[0][0 if mode == "uniform" else 3]
        assert narrow["exchange"]["kv_dtype"] == "bfloat16" and wide["exchange"]["kv_dtype"] == "float32"
        assert 2 * narrow["exchange"]["buffer_bytes"] == wide["exchange"]["buffer_bytes"]
        assert 2 * narrow["exchange"]["bytes_received_per_sync_point"] == wide["exchange"]["bytes_received_per_sync_point"]
        quality, full_precision = psnr(reference, narrow["latents"]), psnr(reference, wide["latents"])
        lines.append(f"[exchange] mode={mode} --stadi_kv_dtype bfloat16: PSNR vs 1 process {quality:.1f} dB "
                     f"(float32 stale K/V: {full_precision:.1f} dB)")
        assert quality >= 40.0 and quality >= fault + 6.0, (mode, quality, fault)
        assert torch.equal(narrow["latents"], results[1][index]["latents"])
    report("\n" + "\n".join(lines))
