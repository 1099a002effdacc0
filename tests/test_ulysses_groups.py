"""STADI over sequence-parallel groups (issue 23), the attention helper: Ulysses inside each STADI group,
displaced K/V across groups, one head shard per rank.

Four gloo ranks = 2 STADI groups x Ulysses-2, uneven group bands (6 and 10 tokens). Each rank holds half of
its group's band with every head; its store holds the whole image for half of the heads, exchanged with the
rank of the other group that holds the same heads. Checked against plain attention over the whole image:
synchronous steps exactly as one process, displaced steps with the own group's band fresh and the other
group's from its last publication, with and without a joint text stream (its padding masked).
"""

from __future__ import annotations

import pytest
import torch

GROUP_TOKENS = [6, 10]  # the two groups' bands (each splits evenly over the group's 2 ranks)
ULYSSES = 2
BATCH, HEADS, HEAD_DIM, STREAM_TOKENS = 2, 4, 8, 3
# (synchronous, publish) of each step: the seeding warmup step, a displaced publishing step, a displaced step.
STEPS = [(True, True), (False, True), (False, False)]


def _image(step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole image's queries, keys and values of `step` and `layer`, (batch, heads, tokens, head_dim)."""
    generator = torch.Generator().manual_seed(100 * step + layer)
    shape = (BATCH, HEADS, sum(GROUP_TOKENS), HEAD_DIM)
    return tuple(torch.randn(shape, generator=generator) for _ in range(3))


def _stream(step: int, layer: int, first: bool):
    from stadi_xdit.runtime.band_attention import Stream

    generator = torch.Generator().manual_seed(10_000 + 100 * step + layer)
    shape = (BATCH, HEADS, STREAM_TOKENS, HEAD_DIM)
    query, key, value = (torch.randn(shape, generator=generator) for _ in range(3))
    mask = torch.ones(BATCH, STREAM_TOKENS, dtype=torch.bool)
    mask[1, -1] = False  # the second prompt is one token shorter: padding
    return Stream(query, key, value, first, mask)


def _reference(rows: slice, query, key, value, stream) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain attention of the queries `rows` (and the stream's) over `key`/`value` of the whole image."""
    import torch.nn.functional as F

    if stream is None:
        out = F.scaled_dot_product_attention(query[:, :, rows], key, value)
        return out.transpose(1, 2).flatten(2, 3), None
    order = (lambda s, i: [s, i]) if stream.first else (lambda s, i: [i, s])
    image_on = torch.ones(BATCH, key.shape[2], dtype=torch.bool)
    mask = torch.cat(order(stream.key_mask, image_on), dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(torch.cat(order(stream.query, query[:, :, rows]), dim=2),
                                         torch.cat(order(stream.key, key), dim=2),
                                         torch.cat(order(stream.value, value), dim=2), attn_mask=mask)
    stream_out, image_out = (out[:, :, :STREAM_TOKENS], out[:, :, STREAM_TOKENS:]) if stream.first else (
        out[:, :, -STREAM_TOKENS:], out[:, :, :-STREAM_TOKENS])
    return image_out.transpose(1, 2).flatten(2, 3), stream_out.transpose(1, 2).flatten(2, 3)


def _grouped_rank(rank: int, world: int, layer_streams: list[bool | None], group_sizes: tuple[int, ...]) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    from stadi_xdit.runtime.band_attention import band_attention
    from stadi_xdit.runtime.comm import BandComm
    from stadi_xdit.runtime.head_shards import HeadShards
    from stadi_xdit.runtime.kv import DisplacedKVStore
    from stadi_xdit.runtime.layout import BandView

    shards = HeadShards(group_sizes, HEADS)
    groups = shards.members
    group, index = shards.member_of(rank)  # xDiT's order: a group's ranks are consecutive
    degree = group_sizes[group]
    timeout = timedelta(seconds=120)
    sequence_groups = [dist.new_group(list(shards.ranks_of(g))) for g in range(groups)]
    sequence = BandComm(sequence_groups[group], index, degree, timeout)
    if len(set(group_sizes)) == 1:  # equal groups: the ranks that hold the same heads exchange whole bands
        shard_groups = [dist.new_group(list(range(i, world, degree))) for i in range(degree)]
        store = DisplacedKVStore(BandComm(shard_groups[index], group, groups, timeout), group_layers=1,
                                 sequence=sequence)
    else:  # unequal groups: every rank sends each rank of another group the heads both hold
        store = DisplacedKVStore(BandComm(None, rank, world, timeout), group_layers=1, sequence=sequence,
                                 shards=shards)
    store.set_band(BandView.of_token_counts(GROUP_TOKENS, group))
    flat = DisplacedKVStore(BandComm(None, 0, 1), group_layers=1)  # one process, every head: the memory yardstick
    flat.set_band(BandView.of_token_counts([sum(GROUP_TOKENS)], 0))

    start = sum(GROUP_TOKENS[:group])
    part = GROUP_TOKENS[group] // degree
    rows = slice(start + index * part, start + (index + 1) * part)
    group_rows = slice(start, start + GROUP_TOKENS[group])
    published = [0] * groups  # the step whose K/V of each group the others hold
    errors = []
    for step, (synchronous, publish) in enumerate(STEPS):
        store.set_phase(synchronous=synchronous, publish=publish)
        flat.set_phase(synchronous=synchronous, publish=publish)
        for layer, first in enumerate(layer_streams):
            query, key, value = _image(step, layer)
            stream = None if first is None else _stream(step, layer, first)
            image_out, stream_out = band_attention(store, layer, query[:, :, rows], key[:, :, rows],
                                                   value[:, :, rows], stream)
            flat.full_kv(layer, key, value)
            # What the store should hold: every group's band fresh in synchronous steps; else the own group's
            # fresh and the other's from the step it last published.
            used_key, used_value = key.clone(), value.clone()
            if not synchronous:
                for other in range(groups):
                    if other != group:
                        other_rows = slice(sum(GROUP_TOKENS[:other]), sum(GROUP_TOKENS[:other + 1]))
                        _, old_key, old_value = _image(published[other], layer)
                        used_key[:, :, other_rows] = old_key[:, :, other_rows]
                        used_value[:, :, other_rows] = old_value[:, :, other_rows]
            want_image, want_stream = _reference(rows, query, used_key, used_value, stream)
            error = (image_out - want_image).abs().max().item()
            if stream is not None:
                error = max(error, (stream_out - want_stream).abs().max().item())
            errors.append(error)
            assert group_rows.start <= rows.start  # the rank's rows lie in its group's band
        if publish:
            published = [step] * groups
    store.drain()
    flat.drain()
    return {"errors": errors, "bytes": store.memory_bytes(), "flat_bytes": flat.memory_bytes(), "degree": degree,
            "own_tokens": GROUP_TOKENS[group],
            "sequence_collectives": sequence.collectives, "sequence_waits": sequence.wait_seconds,
            "stats": store.stats()}


@pytest.mark.parametrize(("layer_streams", "group_sizes"), [([None, True], (2, 2)), ([False, None], (2, 2)),
                                                           ([None, True], (2, 1))],
                         ids=["text-first", "text-last", "unequal-groups"])
def test_ulysses_inside_groups_attends_as_one_process_and_holds_one_head_shard(layer_streams, group_sizes):
    """Equal groups, and a group of 2 beside a group of 1 (nodes of different sizes), whose ranks hold different
    head shards: each receives exactly its heads of the other group's band."""
    from stadi_xdit.offline.spawn import run_distributed

    results = run_distributed(_grouped_rank, sum(group_sizes), layer_streams, group_sizes, init_process_group=True,
                              timeout=300)
    for rank, result in enumerate(results):
        print(f"[ulysses groups {group_sizes}] rank {rank}: max error {max(result['errors']):.1e}, store "
              f"{result['bytes']} B (one process, every head: {result['flat_bytes']} B)")
        assert max(result["errors"]) < 1e-5, (rank, result["errors"])
        degree, stats = result["degree"], result["stats"]
        assert result["bytes"] * degree == result["flat_bytes"]  # heads / U of the whole image
        # Per attention: one all-to-all for each of Q, K, V and one back; a stream's output is gathered over
        # the heads (one broadcast per group rank). A group of one rank has none.
        per_step = 4 * len(layer_streams) + degree * sum(first is not None for first in layer_streams)
        assert result["sequence_collectives"] == (per_step if degree > 1 else 0) * len(STEPS)
        assert result["sequence_waits"] == 0.0  # the group's own exchanges are its forward, not waiting
        assert stats["sync_points"] == 1
        # Its own band out, the other groups' bands in, for this rank's heads only.
        per_token = stats["buffer_bytes"] // sum(GROUP_TOKENS)
        assert stats["bytes_sent_per_sync_point"] == result["own_tokens"] * per_token
        assert stats["bytes_received_per_sync_point"] == (sum(GROUP_TOKENS) - result["own_tokens"]) * per_token


def test_all_to_all_refuses_uneven_parts():
    from stadi_xdit.runtime.comm import BandComm

    comm = BandComm(None, 0, 2)
    with pytest.raises(ValueError, match="5 entries along dim 2 do not split into 2 equal parts"):
        comm.all_to_all(torch.zeros(1, 4, 5, 8), 2, 1)
    alone = BandComm(None, 0, 1)
    tensor = torch.randn(1, 4, 5, 8)
    assert alone.all_to_all(tensor, 1, 2) is tensor


@pytest.mark.parametrize("first", [True, False])
def test_without_a_group_the_outputs_are_split_from_the_joint_output_as_one_process_splits_them(first):
    """Without Ulysses the helper flattens the joint output first and splits it after, as one process does: the
    layers after attention read the same strides, so bf16 kernels round alike (SD3.5 through xDiT's runner is
    bit-identical only so; a contiguous copy of the band differed by 12/255)."""
    from stadi_xdit.runtime.band_attention import band_attention
    from stadi_xdit.runtime.comm import BandComm
    from stadi_xdit.runtime.kv import DisplacedKVStore
    from stadi_xdit.runtime.layout import BandView

    tokens = 6
    store = DisplacedKVStore(BandComm(None, 0, 1))
    store.set_band(BandView.of_token_counts([tokens], 0))
    store.set_phase(synchronous=True, publish=False)
    query, key, value = (x[:, :, :tokens] for x in _image(0, 0))
    image_out, stream_out = band_attention(store, 0, query, key, value, _stream(0, 0, first))
    joint = tokens + STREAM_TOKENS
    width = HEADS * HEAD_DIM
    assert image_out.shape == (BATCH, tokens, width) and stream_out.shape == (BATCH, STREAM_TOKENS, width)
    assert image_out.stride() == stream_out.stride() == (joint * width, width, 1)  # views of one joint tensor


# --- the pipelines: each family that declares `ulysses_groups`, on 2 STADI groups x Ulysses-2 ----------------------

GROUPED = {"ulysses_degree": ULYSSES, "warmup_steps": 2}
GROUPED_RUNS = [
    {**GROUPED, "stadi_exact": True, "stadi_mode": "spatial", "stadi_speeds": "3,5"},
    {**GROUPED, "stadi_mode": "full", "stadi_speeds": "1,0.5"},
    {**GROUPED, "stadi_mode": "full", "stadi_speeds": "1,0.5"},  # determinism
    {**GROUPED, "stadi_mode": "uniform", "stadi_speeds": "1,0.5"},
    {**GROUPED, "stadi_mode": "uniform", "stadi_speeds": "1,0.5", "ignore_foreign_bands": True},
    # The case's own odd number of token rows: the plan in whole 2-row units, the last group's band one row
    # longer, split 3:2 (or so) over its ranks, with all-to-alls of unequal token counts.
    {**GROUPED, "stadi_exact": True, "stadi_mode": "spatial", "stadi_speeds": "3,5", "odd_rows": True},
]
STALE_RUNS = (1, 3, 4)  # full, uniform, uniform without foreign K/V
# The same stale runs on 2 flat ranks (one family): a group of Ulysses ranks must compute what one rank with its
# band does.
FLAT_RUNS = [{key: value for key, value in GROUPED_RUNS[run].items() if key != "ulysses_degree"} for run in STALE_RUNS]
FLAT_CHECKED = "StadiPixArtAlphaPipeline"


def _grouped_twins() -> list[str]:
    """One twin per family (a family's twins share its code) whose class declares `ulysses_groups`."""
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.families import conformance_cases

    cases = {case.twin.partition(":")[0]: name for name, case in sorted(conformance_cases().items(), reverse=True)
             if case.twin_class().ulysses_groups}
    return sorted(cases.values())


ROW_PX = 16  # a token row in every family here: VAE scale 8 x patch (or Flux's packing) 2


def _even_rows_inputs(twin_name: str) -> dict:
    """The conformance case one token row taller per frame: 8 rows for an image (7 in the case), 20 for the clip
    (5 frames of 4, 15 in the case), so each group's band of a uniform split halves into two parts of whole rows,
    as flat STADI's does."""
    from stadi_xdit.families import conformance_cases

    inputs = conformance_cases()[twin_name].inputs()
    return {**inputs, "height": inputs["height"] + ROW_PX}


def _inputs(twin_name: str, odd_rows: bool) -> dict:
    from stadi_xdit.families import conformance_cases

    return conformance_cases()[twin_name].inputs() if odd_rows else _even_rows_inputs(twin_name)


def _case_call(twin_name: str, pipe, odd_rows: bool = False) -> torch.Tensor:
    from stadi_xdit.families import conformance_cases

    case = conformance_cases()[twin_name]
    out = pipe(**_inputs(twin_name, odd_rows), output_type="latent", generator=torch.Generator().manual_seed(case.seed))
    return None if out is None else getattr(out, case.output)


def _grouped_runs(rank: int, world: int, twin_name: str, runs: list[dict]) -> list[dict]:
    import stadi_xdit.xdit  # noqa: F401  (CPU compat before xfuser)
    from stadi_xdit.families import conformance_cases
    from stadi_xdit.runtime.adaptive import executed_evals
    from stadi_xdit.xdit.build import build_stadi_pipeline

    case = conformance_cases()[twin_name]
    results = []
    for kwargs in runs:
        kwargs = dict(kwargs)
        odd_rows = kwargs.pop("odd_rows", False)
        inputs = _inputs(twin_name, odd_rows)
        pipe = build_stadi_pipeline(case.twin_class(), case.build(), size=inputs["height"],
                                    steps=inputs["num_inference_steps"], model=f"tiny-{twin_name}", **kwargs)
        latents = _case_call(twin_name, pipe, odd_rows)
        result = pipe.last_result
        results.append({"latents": latents, "bands": result.plan.row_bounds(), "evals": result.num_evals,
                        "planned": executed_evals(result.plan, result.replans, pipe.groups.member),
                        "store_bytes": result.kv_exchange["buffer_bytes"],
                        "groups": (pipe.groups.member, pipe.groups.sequence_rank, pipe.groups.sequence_size)})
    return results


def _one_process(twin_name: str, odd_rows: bool = False) -> torch.Tensor:
    import stadi_xdit.xdit  # noqa: F401
    from stadi_xdit.families import conformance_cases

    return _case_call(twin_name, conformance_cases()[twin_name].build(), odd_rows)


@pytest.mark.parametrize("twin_name", _grouped_twins())
def test_a_family_on_ulysses_groups_equals_one_process_and_its_store_holds_a_head_shard(twin_name):
    """4 ranks = 2 STADI groups x Ulysses-2 (xDiT's sequence-parallel groups, consecutive ranks). Exact mode with
    uneven group bands equals one process; the stale modes on the groups follow their plan on every rank, repeat
    bit for bit and are hurt by a broken exchange; each rank's store holds half of what a flat 2-rank run's does,
    and (one family) the stale modes compute what flat STADI does with the same bands."""
    from stadi_xdit.offline.spawn import run_distributed
    from stadi_xdit.testing.checks import relative_error

    reference = _one_process(twin_name)
    grouped = run_distributed(_grouped_runs, 2 * ULYSSES, twin_name, GROUPED_RUNS, timeout=300)
    flat = run_distributed(_grouped_runs, 2, twin_name, FLAT_RUNS if twin_name == FLAT_CHECKED else FLAT_RUNS[:1],
                           timeout=300)
    assert [rank[0]["groups"] for rank in grouped] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    exact_bands = grouped[0][0]["bands"]
    assert len(exact_bands) == 2 and exact_bands[0][1] - exact_bands[0][0] != exact_bands[1][1] - exact_bands[1][0]
    assert all(end % ULYSSES == 0 for _, end in exact_bands)
    odd_reference = _one_process(twin_name, odd_rows=True)
    for rank, (exact, full, again, uniform, broken, odd) in enumerate(grouped):
        odd_error = relative_error(odd["latents"], odd_reference)
        print(f"[ulysses groups] {twin_name} exact, odd rows, 2 groups x Ulysses-2, rank {rank}: rel. error vs "
              f"1 process {odd_error:.2e}; bands {odd['bands']}")
        assert (odd["bands"][-1][1] - odd["bands"][-1][0]) % 2 == 0 and odd_error <= 1e-4  # plan units: 2 rows
        error = relative_error(exact["latents"], reference)
        print(f"[ulysses groups] {twin_name} exact, 2 groups x Ulysses-2, rank {rank}: rel. error vs 1 process "
              f"{error:.2e}; bands {exact['bands']}")
        assert exact["bands"] == exact_bands and error <= 1e-4
        assert full["bands"] == grouped[0][1]["bands"] == flat[0][0]["bands"]  # the flat run's plan, per group
        assert full["evals"] == full["planned"]
        assert torch.equal(full["latents"], grouped[0][1]["latents"])  # every rank holds the same latent
        assert torch.equal(full["latents"], again["latents"])
        if twin_name == FLAT_CHECKED:  # the heads summed in another order
            for grouped_run, flat_run in zip((full, uniform, broken), flat[0]):
                assert relative_error(grouped_run["latents"], flat_run["latents"]) <= 1e-5
        # The displaced exchange between the groups matters: stale K/V are far closer than no foreign K/V.
        stale_error, broken_error = (relative_error(x["latents"], reference) for x in (uniform, broken))
        assert stale_error * 3 < broken_error, (stale_error, broken_error)
        assert full["store_bytes"] * ULYSSES == flat[rank // ULYSSES][0]["store_bytes"] > 0
    errors = [f"{relative_error(grouped[0][run]['latents'], reference):.2e}" for run in STALE_RUNS]
    print(f"[ulysses groups] {twin_name} rel. error vs 1 process: full {errors[0]}, uniform {errors[1]}, uniform "
          f"without foreign K/V {errors[2]}; store per rank {grouped[0][1]['store_bytes']} B (flat 2 ranks: "
          f"{flat[0][0]['store_bytes']} B)")


@pytest.mark.parametrize("members,cfg", [(3, False), (2, True)])
def test_more_groups_and_cfg_parallel_over_ulysses_groups_equal_one_process(members, cfg):
    """6 ranks = 3 STADI groups x Ulysses-2 (uneven bands), and 8 ranks = 2 groups x CFG 2 x Ulysses-2 (xDiT's
    order: a group's Ulysses ranks, then the CFG branch, then the STADI member; PixArt with one CFG branch per
    rank): exact mode equals one process on every rank."""
    from stadi_xdit.offline.spawn import run_distributed
    from stadi_xdit.testing.checks import relative_error

    twin_name = "StadiPixArtAlphaPipeline"
    reference = _one_process(twin_name)
    speeds = {2: "3,5", 3: "2,3,5"}[members]
    run = {**GROUPED_RUNS[0], "stadi_speeds": speeds, **({"use_cfg_parallel": True} if cfg else {})}
    branches = 2 if cfg else 1
    runs = run_distributed(_grouped_runs, members * branches * ULYSSES, twin_name, [run], timeout=300)
    assert [rank[0]["groups"] for rank in runs] == [(member, part, 2) for member in range(members)
                                                    for _ in range(branches) for part in (0, 1)]
    bands = runs[0][0]["bands"]
    assert len(bands) == members and len({end - start for start, end in bands}) > 1  # uneven
    for rank, (exact,) in enumerate(runs):
        error = relative_error(exact["latents"], reference)
        print(f"[ulysses groups] {twin_name} exact, {members} groups{' x CFG 2' if cfg else ''} x Ulysses-2, "
              f"rank {rank}: rel. error vs 1 process {error:.2e}; bands {bands}")
        assert exact["bands"] == bands and error <= 1e-4


UNEQUAL = {"stadi_groups": (2, 1), "warmup_steps": 2}


@pytest.mark.parametrize("twin_name", ["StadiPixArtAlphaPipeline", "StadiWanPipeline"])
def test_unequal_groups_run_a_family_as_one_process_in_exact_mode_and_follow_their_plan_when_stale(twin_name):
    """3 ranks = a group of 2 (Ulysses-2) and a group of 1: a node of two GPUs beside a node of one (an image and
    a clip family; by hand, Flux.1, Qwen-Image and SD3.5 too: docs/method.md). Exact mode equals one process on
    every rank; a stale run follows its plan on every rank, the ranks agree, a repeat run is bit-identical, and
    the exchange between the different head shards matters (no foreign K/V is far worse)."""
    from stadi_xdit.offline.spawn import run_distributed
    from stadi_xdit.testing.checks import relative_error

    reference = _one_process(twin_name)
    runs = [{**UNEQUAL, "stadi_exact": True, "stadi_mode": "spatial"}, {**UNEQUAL, "stadi_mode": "uniform"},
            {**UNEQUAL, "stadi_mode": "uniform", "ignore_foreign_bands": True}, {**UNEQUAL, "stadi_mode": "uniform"}]
    results = run_distributed(_grouped_runs, 3, twin_name, runs, timeout=300)
    assert [rank[0]["groups"] for rank in results] == [(0, 0, 2), (0, 1, 2), (1, 0, 1)]
    for rank, (exact, uniform, broken, again) in enumerate(results):
        error = relative_error(exact["latents"], reference)
        stale_error, broken_error = (relative_error(x["latents"], reference) for x in (uniform, broken))
        print(f"[ulysses groups] {twin_name} groups of 2 and 1, rank {rank}: exact {error:.2e} vs 1 process "
              f"(bands {exact['bands']}); uniform {stale_error:.2e}, without foreign K/V {broken_error:.2e}")
        assert error <= 1e-4 and exact["bands"] == results[0][0]["bands"]
        assert uniform["evals"] == uniform["planned"] and torch.equal(uniform["latents"], results[0][1]["latents"])
        assert torch.equal(uniform["latents"], again["latents"])  # a repeat run, bit for bit
        assert stale_error * 3 < broken_error, (stale_error, broken_error)
    # The group of 1 holds every head of the image; each rank of the group of 2 holds half of them.
    assert results[0][1]["store_bytes"] == results[1][1]["store_bytes"] == results[2][1]["store_bytes"] // 2 > 0


def test_bands_split_into_parts_of_whole_rows_and_the_last_band_takes_the_rows_past_the_plan():
    from stadi_xdit.planner import plan
    from stadi_xdit.runtime.layout import BandGeometry, BandLayout, BandView

    layout = BandLayout(((0, 2), (2, 7)), patch_rows=2, tokens_per_row=5)
    assert layout.split(2).token_rows == ((0, 1), (1, 2), (2, 5), (5, 7))  # 5 rows: 3 and 2
    assert BandView(layout, 1).part_counts(2) == (15, 10)
    with pytest.raises(ValueError, match="a band of 2 token rows cannot be split into 3 parts"):
        layout.split(3)
    geometry = BandGeometry.of_rows(7, patch_rows=2, tokens_per_row=5, align=2)
    assert (geometry.rows, geometry.extra_rows, geometry.image_rows) == (6, 1, 7)
    planned = plan([1.0, 1.0], rows=geometry.rows, align=2, num_steps=4, warmup_steps=1, mode="spatial")
    assert geometry.layout(planned).token_rows == ((0, 4), (4, 7))  # the plan's 4 and 2, the last band one more
    with pytest.raises(ValueError, match=r"extra rows must be in \[0, align=2\)"):
        BandGeometry(rows=6, patch_rows=2, tokens_per_row=5, align=2, extra_rows=2)


def test_head_shards_of_unequal_groups_route_each_pair_the_heads_both_hold():
    from stadi_xdit.runtime.exchange import LayerSlot
    from stadi_xdit.runtime.head_shards import HeadShards, ShardRoutes, shard_columns

    shards = HeadShards((4, 2, 1), heads=8)  # three nodes: 4, 2 and 1 GPUs
    assert shards.world_size == 7 and shards.members == 3
    assert [shards.member_of(rank) for rank in range(7)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0)]
    assert [shards.head_range(rank) for rank in range(7)] == [(0, 2), (2, 4), (4, 6), (6, 8), (0, 4), (4, 8), (0, 8)]
    assert shards.shared_heads(4, 1) == (2, 4) and shards.shared_heads(1, 4) == (2, 4)
    start, end = shards.shared_heads(3, 4)  # [6, 8) and [0, 4): nothing in common, an empty range
    assert start == end
    assert shards.shared_heads(0, 1) == (0, 0)  # one group computes one band: nothing to send inside it
    # Every rank of another group receives, over all senders of a group, exactly the heads it holds, once.
    for receiver in range(7):
        for member in range(3):
            if member == shards.member_of(receiver)[0]:
                continue
            got = sorted(shards.shared_heads(sender, receiver) for sender in shards.ranks_of(member))
            covered = [head for start, end in got for head in range(start, end)]
            assert covered == list(range(*shards.head_range(receiver))), (receiver, member)
    # Columns: layer 7 holds heads [0, 4) of K and V for a batch of 2, 3 channels each; heads [2, 4) wanted.
    slot = LayerSlot(7, 0, 5, (2, 4, 3))
    columns = shard_columns([slot], (0, 4), (2, 4)).tolist()
    row = torch.arange(5 + slot.width).view(-1)[5:].view(2, 2, 4, 3)  # (K/V, batch, heads, channels) of one token
    assert columns == row[:, :, 2:4].reshape(-1).tolist()
    # The sender and the receiver enumerate shared heads alike, each in its own layout.
    sender = ShardRoutes(shards, 4, [LayerSlot(0, 0, 0, (1, 4, 2))])  # heads [0, 4)
    receiver = ShardRoutes(shards, 1, [LayerSlot(0, 0, 0, (1, 2, 2))])  # heads [2, 4)
    assert len(sender.send[1]) == len(receiver.receive[4]) == 2 * 2 * 2
    for bad, message in [((2, 0), "integers >= 1"), ((3,), "cannot split 8 attention heads")]:
        with pytest.raises(ValueError, match=message):
            HeadShards(bad, heads=8)


def test_unequal_groups_split_each_band_by_its_own_degree():
    from stadi_xdit.runtime.layout import BandLayout, BandView

    layout = BandLayout(((0, 5), (5, 7), (7, 8)), patch_rows=2, tokens_per_row=3)
    assert layout.split_groups((4, 2, 1)).token_rows == ((0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8))
    even = BandLayout(((0, 4), (4, 7)), patch_rows=2, tokens_per_row=3)
    assert even.split_groups((2, 2)) == even.split(2) and even.split(2).token_rows == ((0, 2), (2, 4), (4, 6), (6, 7))
    assert BandView(layout, 2).part_counts(1) == (3,)  # a band cut by its own degree only: the others may be short
    with pytest.raises(ValueError, match="2 group sizes for a layout of 3 bands"):
        layout.split_groups((2, 1))
