"""The toy data set (`stadi_xdit.toy.data`) and its coherence metrics (`stadi_xdit.toy.metrics`), plus the
one-line refusals of the training script's and the quality benchmark's flags.

Cheap (no model): determinism of the data set and captions, and the metrics' sanity: exact on
ground truth, clearly worse on corrupted samples, each corruption caught by the metric made for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stadi_xdit.offline.modules import load_module_from_path
from stadi_xdit.toy import data, metrics


def test_sample_batch_is_deterministic_and_shaped():
    a, ca = data.sample_batch(7, 32)
    b, cb = data.sample_batch(7, 32)
    assert a.shape == (32, data.CHANNELS, data.SIZE, data.SIZE) and a.dtype == torch.float32
    assert ca.shape == (32,) and ca.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(ca, cb)
    c, _ = data.sample_batch(8, 32)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    # A generator is drawn from (and advanced): the same stream as the seed, then new images.
    g = torch.Generator().manual_seed(7)
    first, _ = data.sample_batch(g, 32)
    second, _ = data.sample_batch(g, 32)
    assert torch.equal(first, a) and not torch.equal(second, a)


def test_scenes_are_mirror_symmetric_and_classes_can_be_fixed():
    ids = torch.arange(data.NUM_CLASSES)
    x, got = data.sample_batch(0, data.NUM_CLASSES, class_ids=ids)
    assert torch.equal(got, ids)
    assert torch.equal(x, data.flip_rows(x))
    # The class sets the background colour: the edge rows carry it (the median skips the pole).
    edge = x[:, :3, 0].median(dim=-1).values
    expected = torch.tensor(list(data.BACKGROUND_COLORS.values()))[data.class_background(ids)]
    assert torch.allclose(edge, expected)


def test_caption_table_is_fixed_and_distinct():
    ids = torch.tensor([0, 3, 11, 3])
    e = data.caption_embeds(ids)
    assert e.shape == (4, data.CAPTION_TOKENS, data.CAPTION_CHANNELS)
    assert torch.equal(e, data.caption_embeds(ids)) and torch.equal(e[1], e[3])
    assert not torch.equal(e[0], e[1])
    null = data.null_embeds(2)
    assert null.shape == (2, data.CAPTION_TOKENS, data.CAPTION_CHANNELS) and torch.equal(null[0], null[1])
    table = data.caption_embeds(torch.arange(data.NUM_CLASSES))
    assert not (table == null[0]).all(dim=(1, 2)).any()
    assert data.caption_mask(3).shape == (3, data.CAPTION_TOKENS)


def test_decode_to_rgb():
    x, _ = data.sample_batch(1, 2)
    rgb = data.decode_to_rgb(x)
    assert rgb.shape == (2, 3, 4 * data.SIZE, 4 * data.SIZE)
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert torch.equal(rgb[:, :, ::4, ::4], ((x[:, :3] + 1) / 2).clamp(0, 1))
    assert data.decode_to_rgb(x[0], scale=1).shape == (3, data.SIZE, data.SIZE)


def test_ground_truth_metrics_are_perfect():
    gt = metrics.ground_truth_metrics(128, seed=3)
    assert set(gt) == set(metrics.METRIC_NAMES)
    assert gt["symmetry_error"] == 0.0
    for name in metrics.METRIC_NAMES:
        if name != "symmetry_error":
            assert gt[name] == 1.0, (name, gt[name])


def _corruptions(x: torch.Tensor, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    n = x.shape[0]
    perm = torch.roll(torch.arange(n), 1)  # every image gets another image's bottom half
    swapped = x.clone()
    swapped[:, :, data.HALF:] = x[perm, :, data.HALF:]
    shifted = x.clone()  # the bottom half moved sideways: a seam at the midline
    shifted[:, :, data.HALF:] = x[:, :, data.HALF:].roll(5, dims=-1)
    return {
        "swapped_bottom": (swapped, ids),
        "shifted_bottom": (shifted, ids),
        "noise": (torch.randn(x.shape, generator=g), ids),
        # The next background, the same shape.
        "wrong_class": (x, (ids + len(data.SHAPES)) % data.NUM_CLASSES),
    }


def test_corruptions_score_clearly_worse():
    x, ids = data.sample_batch(5, 96)
    scores = {name: metrics.coherence_metrics(*pair) for name, pair in _corruptions(x, ids).items()}
    swapped, shifted, noise, wrong = (scores[k] for k in ("swapped_bottom", "shifted_bottom", "noise", "wrong_class"))
    # Swapping halves breaks symmetry, colour match and the pole; shifting breaks symmetry and the pole.
    assert swapped["symmetry_error"] > 0.2 and shifted["symmetry_error"] > 0.1
    assert swapped["color_match"] < 0.5
    assert swapped["pole_continuity"] < 0.8 and shifted["pole_continuity"] < 0.8
    # Pure noise fails everything.
    assert noise["symmetry_error"] > 0.5
    for name in ("color_match", "pole_continuity", "horizon_continuity", "background_accuracy", "shape_accuracy"):
        assert noise[name] < 0.4, (name, noise[name])
    # The wrong background class (same shape) fails the background check only.
    assert wrong["background_accuracy"] == 0.0 and wrong["shape_accuracy"] == 1.0
    assert wrong["symmetry_error"] == 0.0


def test_shape_accuracy_reads_the_shape():
    ids = torch.arange(data.NUM_CLASSES).repeat(4)
    x, _ = data.sample_batch(2, ids.shape[0], class_ids=ids)
    assert metrics.shape_accuracy(x, ids).mean() == 1.0
    other_shape = ids - data.class_shape(ids) + (data.class_shape(ids) + 1) % len(data.SHAPES)
    assert metrics.shape_accuracy(x, other_shape).mean() == 0.0


def test_noise_degrades_metrics_monotonically():
    x, ids = data.sample_batch(9, 64)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x.shape, generator=g)
    errors = [metrics.coherence_metrics(x + s * eps, ids)["symmetry_error"] for s in (0.0, 0.1, 0.3)]
    assert errors[0] == 0.0 and errors[0] < errors[1] < errors[2]
    clean = metrics.coherence_metrics(x + 0.05 * eps, ids)  # mild noise: the discrete checks hold
    for name in ("color_match", "pole_continuity", "background_accuracy", "shape_accuracy"):
        assert clean[name] >= 0.9, (name, clean[name])


def test_row_error_profile_finds_a_seam():
    x, _ = data.sample_batch(4, 8)
    y = x.clone()
    y[:, :, 16] += 0.5  # a seam at the 2-rank band boundary
    profile = metrics.row_error_profile(x, y)
    assert profile.shape == (data.SIZE,)
    assert int(profile.argmax()) == 16
    assert torch.allclose(profile[16], torch.tensor(0.5)) and profile.sum() == profile[16]
    assert metrics.band_boundary_rows([8, 8, 8, 8]) == [8, 16, 24]
    assert metrics.band_boundary_rows([16, 16]) == [16]


TRAIN = Path(__file__).resolve().parent.parent / "scripts" / "train_toy_dit.py"


def _train_script():
    return load_module_from_path("train_toy_dit", TRAIN)


@pytest.mark.parametrize("argv,flag", [
    (["--steps", "0"], "--steps"), (["--batch", "-1"], "--batch"), (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"), (["--ema", "1"], "--ema"), (["--class-dropout", "1.5"], "--class-dropout"),
    (["--threads", "0"], "--threads"), (["--time-budget-min", "inf"], "--time-budget-min"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio"), (["--grad-clip", "nan"], "--grad-clip"),
    (["--eval-steps", "0"], "--eval-steps"), (["--out", "{tmp}"], "--out"), (["--steps", "x"], "--steps"),
    (["--eval-steps", "1"], "--eval-steps"), (["--threads", str(10**30)], "--threads"), (["--seed", str(10**30)], "--seed"),
    (["--out", "/dev/null/w.safetensors"], "--out"), (["--loss-plot", "/dev/null/l.png"], "--loss-plot"),
])
def test_training_script_refuses_bad_flags_in_one_line(argv, flag, tmp_path, capsys):
    script = _train_script()
    with pytest.raises(SystemExit) as info:
        script.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_toy_dit.py: error: ") and flag in lines[0], lines


@pytest.mark.parametrize("argv,flag", [
    (["--steps", "1"], "--steps"), (["--steps", "5000"], "--steps"), (["--warmup", "0"], "--warmup"),
    (["--steps", "8", "--warmup", "8"], "--warmup"), (["--repeats", "0"], "--repeats"), (["--seed", "-1"], "--seed"),
    (["--out", "{file}"], "--out"), (["--out", "/dev/null/x"], "--out"),
])
def test_quality_benchmark_refuses_bad_flags_in_one_line(argv, flag, tmp_path, capsys):
    from stadi_xdit.toy import quality

    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as info:
        quality.main([a.replace("{file}", str(tmp_path / "f")) for a in argv])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error: argument " + flag in lines[0], lines


def test_quality_benchmark_writes_untracked_files_by_default():
    """`python -m stadi_xdit.toy.quality` without --out must not rewrite the docs' tracked figures."""
    import shutil
    import subprocess
    from pathlib import Path

    from stadi_xdit.toy import quality

    if shutil.which("git") is None:
        pytest.skip("no git")
    repo = Path(__file__).resolve().parents[1]
    names = [str(quality.DEFAULT_OUT / name) for name in ("toy_quality.json", "toy_quality_tradeoff.png")]
    ignored = subprocess.run(["git", "check-ignore", *names], cwd=repo, capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == names, ignored
