"""No finished output is lost (issue 21): atomic writes, a fallback folder when saving fails, no
writes into the user's inputs (settings file, model folder, shipped weights), a bounded and
symlink-safe profile-cache lock."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stadi_xdit.offline.modules import load_module_from_path
from stadi_xdit.paths import atomic_output, model_folder_problem, safetensors_problem, save_with_fallback
from stadi_xdit.runtime.profile_cache import ProfileCache

REPO = Path(__file__).resolve().parent.parent


# --- atomic writes and the fallback folder -----------------------------------------------------------

def test_atomic_output_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with atomic_output(target) as temp:
        assert temp.parent == tmp_path and temp.name.endswith(".png") and temp != target
        temp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing is visible before the rename
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(OSError), atomic_output(target) as temp:
        temp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_an_empty_result_is_not_published(tmp_path):
    with pytest.raises(OSError), atomic_output(tmp_path / "x.png"):
        pass  # the writer wrote nothing: a 0-byte PNG would look like a result
    assert not list(tmp_path.iterdir())


def test_the_output_folder_removed_mid_run_is_made_again(tmp_path):
    folder = tmp_path / "gone"
    assert save_with_fallback(folder / "a.txt", lambda temp: temp.write_text("x")) == folder / "a.txt"


def test_a_full_disk_keeps_the_result_in_the_fallback_folder(tmp_path, capsys):
    target, spare = tmp_path / "out" / "img.png", tmp_path / "spare"
    spare.mkdir()
    calls = []

    def write(temp: Path) -> None:
        calls.append(temp)
        if temp.parent == target.parent:
            raise OSError(errno.ENOSPC, "No space left on device")
        temp.write_bytes(b"png")

    saved = save_with_fallback(target, write, "image", fallback_dirs=[spare])
    assert saved == spare / "img.png" and saved.read_bytes() == b"png"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(saved) in lines[0]
    assert not list(target.parent.iterdir())  # no 0-byte PNG left where the run was told to write


def test_when_nothing_can_be_written_one_line_says_so(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert save_with_fallback(blocker / "img.png", lambda temp: temp.write_bytes(b"x"), "image",
                              fallback_dirs=[blocker / "a"]) is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stadi: error: cannot save the image")


def test_the_runner_keeps_an_image_it_cannot_save_where_asked(tmp_path, monkeypatch, capsys):
    """xDiT's runner saving path under STADI (`save_runner_output`): the launch folder takes the image."""
    from types import SimpleNamespace

    from PIL import Image

    from stadi_xdit.xdit.runner import save_runner_output

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")  # xDiT's log() asks whether this is the last rank
    monkeypatch.setenv("WORLD_SIZE", "1")
    model = SimpleNamespace(config=SimpleNamespace(output_directory=str(blocker / "out")),
                            get_output_name=lambda args: "flux_128x128")
    output = SimpleNamespace(images=[Image.new("RGB", (8, 8))], videos=None,
                             get_outputs=lambda: iter([(Image.new("RGB", (8, 8)), {})]))
    save_runner_output(model, output)
    assert Image.open(tmp_path / "flux_128x128_0.png").size == (8, 8)
    assert "saved it to" in capsys.readouterr().err


# --- a whole model folder -----------------------------------------------------------------------------

def test_safetensors_files_are_checked_whole(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(256)}, str(path))
    assert safetensors_problem(path) is None
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)
    assert safetensors_problem(path) == f"is truncated ({size - 100} of {size} bytes)"
    path.write_bytes(b"\x00" * 4)
    assert "truncated" in safetensors_problem(path)
    assert model_folder_problem(tmp_path).startswith("model_index.json cannot be read")


# --- never write into the user's inputs ----------------------------------------------------------------

def test_the_profile_cache_may_not_be_the_settings_file_or_inside_the_model(tmp_path):
    from stadi_xdit.runtime.profile_cache import check_cache_path

    settings = tmp_path / "x.json"
    settings.write_text('{"use_stadi": true}')
    with pytest.raises(ValueError, match="is the --stadi_config_file"):
        check_cache_path(str(settings), settings_file=str(settings), model="tiny")
    link = tmp_path / "link.json"
    link.symlink_to(settings)
    with pytest.raises(ValueError, match="is the --stadi_config_file"):
        check_cache_path(str(link), settings_file=str(settings), model="tiny")
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ValueError, match="inside the model folder"):
        check_cache_path(str(model / "speeds.json"), model=str(model))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a speeds cache"):
        check_cache_path(str(weights), model="tiny")
    check_cache_path(str(tmp_path / "speeds.json"), settings_file=str(settings), model=str(model))  # separate


def test_the_example_refuses_the_settings_file_as_profile_cache(tmp_path, monkeypatch, capsys):
    settings = tmp_path / "x.json"
    settings.write_text('{"use_stadi": true, "mode": "spatial"}')
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    example = load_module_from_path("stadi_example_outputs", REPO / "scripts" / "stadi_example.py")
    monkeypatch.setattr(sys, "argv", ["stadi_example.py", "--model", "tiny", "--height", "128", "--width", "128",
                                      "--stadi_config_file", str(settings), "--stadi_profile_cache", str(settings)])
    with pytest.raises(SystemExit) as info:
        example.parse_args()
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and "is the --stadi_config_file" in lines[0], lines
    assert settings.read_text() == '{"use_stadi": true, "mode": "spatial"}'


@pytest.mark.parametrize("out,needle", [
    ("w.json", "must be a .safetensors file"),
    ("toy_reference.safetensors", "is the name of the reference latents"),
    ("{weights}/toy_reference.safetensors", "is the name of the reference latents"),
    ("{weights}/other.safetensors", "would write beside the shipped weights"),
])
def test_training_never_overwrites_its_own_outputs_or_the_shipped_files(out, needle, tmp_path, monkeypatch, capsys):
    from stadi_xdit.toy import model

    monkeypatch.chdir(tmp_path)
    train = load_module_from_path("train_toy_dit_outputs", REPO / "scripts" / "train_toy_dit.py")
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--out", out.format(weights=model.WEIGHTS_DIR)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_training_plots_may_not_be_its_weights(tmp_path, capsys):
    train = load_module_from_path("train_toy_dit_outputs", REPO / "scripts" / "train_toy_dit.py")
    out = tmp_path / "w.safetensors"
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(out), "--loss-plot", str(tmp_path / "w.json")])
    assert "is one of the files written for --out" in capsys.readouterr().err
    assert train.parse_args(["--out", str(out)]).out == out


# --- the profile cache's lock ---------------------------------------------------------------------------

def test_the_lock_file_is_private_and_never_a_followed_symlink(tmp_path, capsys):
    cache = ProfileCache(tmp_path / "speeds.json")
    assert cache.store("k", [1.0, 0.5])
    assert stat.S_IMODE(os.stat(cache.lock_path).st_mode) == 0o600
    os.unlink(cache.lock_path)
    victim = tmp_path / "victim"
    os.symlink(victim, cache.lock_path)
    capsys.readouterr()
    assert cache.store("k", [1.0, 0.6]) is False
    assert not victim.exists()  # the symlink's target was neither created nor locked
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "symbolic link" in err


def test_a_lock_held_by_a_stalled_process_only_costs_the_cache(tmp_path, capsys):
    cache = ProfileCache(tmp_path / "speeds.json")
    cache.lock_path.touch()
    hold = ("import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(cache.lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cache.store("k", [1.0, 0.5]) is False  # bounded wait, then a warning: the run goes on
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert "locked by another process" in err and err.count("\n") == 1
    assert cache.store("k", [1.0, 0.5])  # free again
    with open(cache.lock_path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and released after the store


# --- a name longer than the file system allows (ENAMETOOLONG) -----------------------------------------

def test_a_name_too_long_is_one_line_from_every_path_check(tmp_path, capsys):
    """Python 3.11's Path.exists() raises for such a name; every check answers in words instead."""
    from stadi_xdit.bench.cli import parse_args as bench_parse_args
    from stadi_xdit.offline.hub_cache import main as hub_cache_main
    from stadi_xdit.paths import free_space_problem, output_dir_problem, output_file_problem
    from stadi_xdit.run import build_launch_command, check_output_directory
    from stadi_xdit.runtime.profile_cache import check_cache_path

    long = tmp_path / ("x" * 300)
    assert "File name too long" in output_dir_problem(long)
    assert "File name too long" in output_dir_problem(long / "deeper")
    assert "File name too long" in output_file_problem(long / "image.png")
    assert free_space_problem(long / "deeper", 1) is None  # its nearest existing ancestor has room
    check_cache_path(str(long / "speeds.json"))  # only costs the cache when used: not refused
    check_cache_path(str(long))
    # The launcher's look for outputs it would replace leaves the folder to check_output_directory.
    assert build_launch_command(["--model", "FLUX.1-dev", "--output_directory", str(long)])
    calls = (lambda: bench_parse_args(["--out", str(long)]), lambda: check_output_directory(str(long)),
             lambda: hub_cache_main(["--out", str(long), "--models", "FLUX.1-dev"]))
    for call in calls:
        with pytest.raises(SystemExit) as exited:
            call()
        assert exited.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "File name too long" in lines[0], lines
