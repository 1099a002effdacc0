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


def _grouped_rank(rank: int, world: int, layer_streams: list[bool | None]) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    from stadi_xdit.runtime.band_attention import band_attention
    from stadi_xdit.runtime.comm import BandComm
    from stadi_xdit.runtime.kv import DisplacedKVStore
    from stadi_xdit.runtime.layout import BandView

    groups = world // ULYSSES
    group, index = divmod(rank, ULYSSES)  # xDiT's order: a group's ranks are consecutive
    timeout = timedelta(seconds=120)
    sequence_groups = [dist.new_group(list(range(g * ULYSSES, (g + 1) * ULYSSES))) for g in range(groups)]
    shard_groups = [dist.new_group(list(range(i, world, ULYSSES))) for i in range(ULYSSES)]
    sequence = BandComm(sequence_groups[group], index, ULYSSES, timeout)
    store = DisplacedKVStore(BandComm(shard_groups[index], group, groups, timeout), group_layers=1,
                             sequence=sequence)
    store.set_band(BandView.of_token_counts(GROUP_TOKENS, group))
    flat = DisplacedKVStore(BandComm(None, 0, 1), group_layers=1)  # one process, every head: the memory yardstick
    flat.set_band(BandView.of_token_counts([sum(GROUP_TOKENS)], 0))

    start = sum(GROUP_TOKENS[:group])
    part = GROUP_TOKENS[group] // ULYSSES
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
    return {"errors": errors, "bytes": store.memory_bytes(), "flat_bytes": flat.memory_bytes(),
            "sequence_collectives": sequence.collectives, "sequence_waits": sequence.wait_seconds,
            "stats": store.stats()}


@pytest.mark.parametrize("layer_streams", [[None, True], [False, None]], ids=["text-first", "text-last"])
def test_ulysses_inside_groups_attends_as_one_process_and_holds_one_head_shard(layer_streams):
    from stadi_xdit.offline.spawn import run_distributed

    results = run_distributed(_grouped_rank, 2 * ULYSSES, layer_streams, init_process_group=True, timeout=300)
    for rank, result in enumerate(results):
        print(f"[ulysses groups] rank {rank}: max error {max(result['errors']):.1e}, store {result['bytes']} B "
              f"(one process, every head: {result['flat_bytes']} B)")
        assert max(result["errors"]) < 1e-5, (rank, result["errors"])
        assert result["bytes"] * ULYSSES == result["flat_bytes"]  # heads / U of the whole image
        # Per attention: one all-to-all for each of Q, K, V and one back; a stream's output is gathered over
        # the heads (one broadcast per group rank).
        per_step = 4 * len(layer_streams) + ULYSSES * sum(first is not None for first in layer_streams)
        assert result["sequence_collectives"] == per_step * len(STEPS)
        assert result["sequence_waits"] == 0.0  # the group's own exchanges are its forward, not waiting
        assert result["stats"]["sync_points"] == 1


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
