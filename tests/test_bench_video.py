"""``stadi-bench`` on Wan 2.1 text-to-video: presets, bad input, arm validity, construct-only and the what-if.

Nothing here runs a pipeline (the measured wan-tiny bench is a manual check, see docs/benchmarks.md):
validation, meta-device construction and the simulator's cost model only.
"""

from __future__ import annotations

import json

import pytest
import torch

from stadi_xdit.bench.arms import skip_reason
from stadi_xdit.bench.catalog import ARMS, PRESET_SHAPES
from stadi_xdit.bench.cli import main, parse_args
from stadi_xdit.bench.metrics import ssim
from stadi_xdit.bench.presets import BENCH_PRESETS, get_preset


def test_wan_presets_know_their_band_units_and_shape():
    assert {"wan-tiny", "wan-small", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-t2v-14b-720p"} <= set(BENCH_PRESETS)
    tiny = get_preset("wan-tiny")  # 48x64 px, 17 frames = 5 latent frames of 3x4 tokens: 15 token rows
    assert tiny.video and tiny.band_unit == "token row" and tiny.band_units(48) == 15 and tiny.latent_frames == 5
    assert tiny.width(48) == 64 and tiny.width(96) == 128 and tiny.tokens(48) == 60
    assert tiny.layers == 2 and tiny.heads == 2 and tiny.hidden == 24
    image = get_preset("tiny")
    assert not image.video and image.band_unit == "token row" and image.band_units(128) == 8
    assert image.width(128) == 128 and image.shape_label(128) == "128px"
    # Another frame count: the same preset at 9 frames (the arms' processes get both from their spec).
    nine = get_preset("wan-tiny", num_frames=9)
    assert nine.name == "wan-tiny" and nine.band_units(48) == 9 and nine.clip_frames == 9
    assert get_preset("wan-tiny", num_frames=17) is tiny
    with pytest.raises(ValueError, match="image preset"):
        get_preset("tiny", num_frames=9)
    kwargs = nine.call_kwargs(48, steps=3, seed=0)
    assert kwargs["num_frames"] == 9 and kwargs["width"] == 64 and kwargs["output_type"] == "latent"
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (1, 8, 32)


def test_wan_cost_model_and_displaced_kv_memory():
    from stadi_xdit.families.wan import wan_transformer_config
    from stadi_xdit.runtime.video_bands import displaced_kv_bytes

    big = get_preset("wan2.1-t2v-14b-720p")  # 21 latent frames x 45 x 80 = 75,600 tokens, 40 blocks
    assert big.band_units(720) == 21 * 45 and big.tokens(720) == 75_600 and big.width(720) == 1280
    # The figure: 75,600 tokens x 40 layers x 2 x 5120 x 2 bytes = 62 GB per CFG branch, twice batched.
    one = displaced_kv_bytes(wan_transformer_config("wan2.1-t2v-14b-720p"), 720, 1280, 81)
    assert big.kv_bytes(720, 2, batch=1) == one == 75_600 * 40 * 2 * 5120 * 2
    assert big.kv_bytes(720, 2) == 2 * one  # the batched CFG pair
    # Per step (both branches): ~2.2 GFLOP per token and block at this size, self-attention over the clip dominating.
    flops = big.forward_flops(720)
    assert 12e15 < flops < 14e15
    h, n = 5120, 75_600
    attention = 2 * 40 * n * 2 * 2 * n * h
    assert 0.6 < attention / flops < 0.8
    # Cost grows with frames more than linearly (attention over all tokens of the clip).
    short = get_preset("wan2.1-t2v-14b-720p", num_frames=41)
    assert 2 < flops / short.forward_flops(720) < 4


def test_skip_reasons_for_wan_arms():
    tiny = get_preset("wan-tiny")
    assert skip_reason(ARMS["full"], tiny, 48, 16, 4, 1) == "15 token rows < 16 ranks"
    assert skip_reason(ARMS["uniform"], tiny, 48, 15, 4, 1) is None  # one token row of the clip per rank
    assert "no pipefusion" in skip_reason(ARMS["pipefusion"], tiny, 48, 2, 4, 1)
    assert skip_reason(ARMS["ulysses"], tiny, 48, 3, 4, 1) == "2 attention heads are not divisible by 3 ranks"
    # xfuser's Wan transformer pads the token sequence: no row-divisibility rule as for images.
    assert skip_reason(ARMS["ring"], tiny, 48, 3, 4, 1) is None
    assert skip_reason(ARMS["ulysses"], tiny, 48, 2, 4, 1) is None


@pytest.mark.parametrize(
    ("argv", "flag", "says"),
    [
        (["--preset", "wan-tiny", "--num-frames", "8"], "--num-frames", "must be 4k+1"),
        (["--preset", "wan-tiny", "--num-frames", "0"], "--num-frames", "must be 4k+1"),
        (["--preset", "wan-tiny", "--num-frames", "1", "--height", "32", "--ranks", "3", "--scenario", "slowdown:1,2,2"],
         "--num-frames", "2 token rows of the clip, fewer than --ranks 3"),
        (["--preset", "tiny", "--num-frames", "9"], "--num-frames", "image preset"),
        (["--preset", "wan-tiny", "--height", "40"], "--height", "multiple of 16"),
        (["--simulate", "--gpus", "A100x4", "--preset", "wan-tiny", "--num-frames", "1", "--height", "48",
          "--no-measure"], "--num-frames", "1 frames at 48 px have 3 token rows, fewer than the 4 simulated ranks"),
        (["--simulate", "--speeds", "1,0.5", "--preset", "wan2.1-t2v-14b"], "--simulate", "--row-seconds"),
    ],
)
def test_bad_video_input_is_one_line_naming_the_flag(one_error_line, argv, flag, says):
    line = one_error_line(parse_args, argv, "stadi-bench: error: ")
    assert flag in line and says in line, line


def test_video_arguments_resolve_from_the_preset():
    args = parse_args(["--preset", "wan-tiny"])
    assert (args.height, args.num_frames) == (48, 17)
    args = parse_args(["--preset", "wan-small", "--num-frames", "9", "--height", "96"])
    assert (args.height, args.num_frames) == (96, 9)
    assert parse_args(["--preset", "tiny"]).num_frames is None
    shape = PRESET_SHAPES["wan2.1-t2v-14b-720p"]
    assert shape.video and shape.band_units(720) == 21 * 45 and not shape.calibrates


def test_construct_only_wan_14b_720p(capsys):
    assert main(["--construct-only", "--preset", "wan2.1-t2v-14b-720p"]) == 0
    out = capsys.readouterr().out
    assert "14288.5 M parameters" in out and "720x1280px x 81 frames (945 token rows)" in out
    assert "with --use_cfg_parallel" in out and "no pipefusion" in out
    assert "STADI full" in out and "skip: 21" not in out


def test_simulate_mixed_cluster_wan_14b_720p(tmp_path, capsys):
    argv = ["--simulate", "--gpus", "A100x4,RTX4090x4", "--preset", "wan2.1-t2v-14b-720p", "--out", str(tmp_path)]
    assert main(argv) == 0  # no --no-measure needed: real-size Wan has no CPU calibration forward
    out = capsys.readouterr().out
    assert "945 token rows" in out and "ms per token row per step" in out
    assert "RTX4090 (24 GiB)" in out and "does NOT fit" in out and "the weights alone" in out
    result = json.loads((tmp_path / "simulate.json").read_text())
    seconds = result["seconds"]
    assert result["rows"] == 945 and result["calibration"] is None
    assert seconds["full"] < seconds["spatial"] < seconds["uniform"] < seconds["single"]
    fit = result["memory_fit"]
    assert fit["cards"]["RTX4090"]["fits"] == {"as computed": False, "--use_cfg_parallel": False}
    assert result["kv_store"]["--use_cfg_parallel"]["flat_buffer_bytes"] == 75_600 * 40 * 2 * 5120 * 2
    ranks = json.loads(result["plans"]["spatial"])["ranks"]
    assert sum(r["row_end"] - r["row_start"] for r in ranks) == 945 and len(ranks) == 8


def test_simulate_wan_14b_720p_over_ulysses_groups(tmp_path, capsys):
    """Issue 23's what-if: A100x4 and RTX4090x4 nodes, Ulysses-4 in each. The head-sharded store is the flat
    one / 4, which brings Wan 14B 720p within an A100's 80 GiB; the groups plan as two members."""
    argv = ["--simulate", "--gpus", "A100x4,RTX4090x4", "--preset", "wan2.1-t2v-14b-720p", "--ulysses-degree", "4",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "STADI over groups of Ulysses-4 (simulated; launched with stadi-xdit --ulysses_degree 4)" in out
    assert "xDiT Ulysses-8 (every rank)" in out
    result = json.loads((tmp_path / "simulate.json").read_text())
    grouped = result["ulysses_groups"]
    assert list(grouped["kv_store"]) == ["4"]
    for label, form in grouped["kv_store"]["4"].items():
        assert form["store_bytes"] * 4 == result["kv_store"][label]["store_bytes"]
    assert result["memory_fit"]["cards"]["A100"]["fits"] == {"as computed": False, "--use_cfg_parallel": False}
    assert grouped["memory_fit"]["cards"]["A100"]["fits"] == {"as computed": True, "--use_cfg_parallel": True}
    assert grouped["memory_fit"]["cards"]["RTX4090"]["fits"]["--use_cfg_parallel"] is False  # 26.6 GiB of weights
    assert [group["cards"] for group in grouped["groups"]] == [["A100"] * 4, ["RTX4090"] * 4]
    assert grouped["relative_speeds"][0] == 1.0 and 0.4 < grouped["relative_speeds"][1] < 0.53  # PCIe all-to-all
    seconds = grouped["seconds"]
    assert seconds["full"] < seconds["spatial"] < seconds["uniform"]
    assert seconds["full"] < grouped["xdit_ulysses_seconds"]
    # 945 rows: planned in whole 4-row units on 944, the last group also computing the one row past them.
    members = json.loads(grouped["plan"])["ranks"]
    assert (grouped["rows"], grouped["planned_rows"]) == (945, 944)
    assert len(members) == 2 and sum(r["row_end"] - r["row_start"] for r in members) == 944
    assert all((r["row_end"] - r["row_start"]) % 4 == 0 for r in members)
    assert "945 rows are not a multiple of 4: planned in 4-row units on 944" in out


def test_simulate_flux_on_nodes_of_different_sizes(tmp_path, capsys):
    """Issue 23's second what-if: a node of two H100s and a node of four A100s, one group each (--stadi_groups 2,4).
    The A100 group's ranks hold a quarter of the flat store, the H100 group's half; bands come in lcm = 4 rows."""
    argv = ["--simulate", "--gpus", "H100x2,A100x4", "--preset", "flux-dev-1024", "--stadi-groups", "2,4",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "STADI over groups of Ulysses-2,4 (simulated; launched with stadi-xdit --stadi_groups 2,4)" in out
    result = json.loads((tmp_path / "simulate.json").read_text())
    grouped = result["ulysses_groups"]
    assert [group["cards"] for group in grouped["groups"]] == [["H100"] * 2, ["A100"] * 4]
    assert grouped["group_sizes"] == [2, 4] and grouped["align"] == 4
    flat = result["kv_store"]["as computed"]["store_bytes"]
    assert grouped["kv_store"]["2"]["as computed"]["store_bytes"] * 2 == flat
    assert grouped["kv_store"]["4"]["as computed"]["store_bytes"] * 4 == flat
    needs = {card: fit["needs_bytes"]["as computed"] for card, fit in grouped["memory_fit"]["cards"].items()}
    weights = grouped["memory_fit"]["weights_bytes"]
    assert needs == {"H100": weights + flat / 2, "A100": weights + flat / 4}
    members = json.loads(grouped["plan"])["ranks"]
    assert len(members) == 2 and all((r["row_end"] - r["row_start"]) % 4 == 0 for r in members)
    seconds = grouped["seconds"]
    assert seconds["full"] < seconds["uniform"] and seconds["full"] < grouped["xdit_ulysses_seconds"]


def test_simulate_small_wan_with_given_row_cost(tmp_path, capsys):
    assert main(["--simulate", "--speeds", "1,0.5", "--row-seconds", "0.05", "--preset", "wan-tiny",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "15 token rows" in out and "full" in out


def test_ssim_compares_video_frames_as_images():
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 4, 5, 6, 8, generator=g)
    assert ssim(clip, clip) == pytest.approx(1.0)
    noisy = clip + 0.1 * torch.randn(clip.shape, generator=g)
    frames = clip.transpose(1, 2).flatten(0, 1)
    assert ssim(clip, noisy) == pytest.approx(ssim(frames, noisy.transpose(1, 2).flatten(0, 1)))


def test_single_arm_builds_and_returns_the_latent_clip_in_process():
    from stadi_xdit.bench.arms import _build
    from stadi_xdit.bench.presets import call_kwargs

    spec = {"preset": "wan-tiny", "num_frames": 9, "arm": "single", "dtype": "float32", "seed": 0, "device": "cpu"}
    pipe, transformer = _build(spec, 0, 1)
    assert type(transformer).__name__ == "WanTransformer3DModel"
    output = pipe(**call_kwargs(get_preset("wan-tiny", num_frames=9), 48, steps=2, seed=0))
    assert output.images.shape == (1, 4, 3, 6, 8)  # (batch, channels, latent frames, H/8, W/8)
    assert torch.isfinite(output.images).all()
