"""The profile cache: stable keys across launches, concurrent writers, poisoned and corrupt files.

The module is loaded from its file; it and its one project import, `stadi_xdit.paths`, are standard
library only, so these tests and the processes they spawn stay fast and torch-free.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODULE_PATH = Path(__file__).resolve().parents[1] / "stadi_xdit" / "runtime" / "profile_cache.py"

# Loads the module by path inside a spawned `python -c` process.
LOAD_IN_CHILD = textwrap.dedent(f"""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("stadi_profile_cache", {str(MODULE_PATH)!r})
    profile_cache = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = profile_cache
    spec.loader.exec_module(profile_cache)
""")


def _load_module():
    spec = importlib.util.spec_from_file_location("stadi_profile_cache", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


profile_cache = _load_module()
ProfileCache = profile_cache.ProfileCache

# dict(transformer.config) of stadi_xdit.families.pixart's PixArt transformer under diffusers 0.42.1,
# without its `_use_default_values` (the tests rebuild that from a set, as diffusers does).
PIXART_TINY_CONFIG = {
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
    "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": 1152, "attention_bias": True,
    "sample_size": 16, "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "upcast_attention": False, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
    "norm_eps": 1e-06, "interpolation_scale": None, "use_additional_conditions": None,
    "caption_channels": 32, "attention_type": "default",
}
HARDWARE = [["NVIDIA H200", "NVIDIA A100"], ["NVIDIA H200", "NVIDIA A100"]]


def _write_cache(path: Path, entries: dict) -> None:
    """A profile cache file in its own format (the marker field, then the entries)."""
    path.write_text(json.dumps({"stadi_profile_cache": 1, "entries": entries}))


def _entries(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["stadi_profile_cache"] == 1 and set(data) == {"stadi_profile_cache", "entries"}
    return data["entries"]


def _warning_lines(captured_err: str) -> list[str]:
    lines = captured_err.splitlines()
    assert all(line.startswith("stadi: warning:") for line in lines), lines
    return lines


# ----------------------------------------------------------------------------------------------
# Key


def test_key_is_identical_across_hash_seeds():
    # Twenty names through a set, the way diffusers builds `_use_default_values`: its order
    # follows PYTHONHASHSEED, so with it in the hash the key changed every launch.
    script = LOAD_IN_CHILD + textwrap.dedent(f"""
        config = dict({PIXART_TINY_CONFIG!r})
        config["_use_default_values"] = list({{"name_%02d" % i for i in range(20)}})
        config["_class_name"] = "PixArtTransformer2DModel"
        config["_diffusers_version"] = "0.42.1"
        print(list({{"name_%02d" % i for i in range(20)}}))
        print(profile_cache.profile_key("PixArtTransformer2DModel", config, 1024, 1024, {HARDWARE!r}))
    """)
    runs = []
    for seed in range(4):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                             text=True, timeout=60).stdout.splitlines()
        runs.append(out)
    assert len({order for order, _ in runs}) > 1, "the seeds must actually reorder the set"
    keys = {key for _, key in runs}
    assert len(keys) == 1, keys
    expected = profile_cache.profile_key("PixArtTransformer2DModel", PIXART_TINY_CONFIG, 1024, 1024, HARDWARE)
    assert keys == {expected}


def test_key_ignores_private_config_but_not_public():
    base = profile_cache.profile_key("PixArtTransformer2DModel", PIXART_TINY_CONFIG, 512, 512, HARDWARE)
    with_private = {**PIXART_TINY_CONFIG, "_use_default_values": ["b", "a"], "_name_or_path": "/x"}
    assert profile_cache.profile_key("PixArtTransformer2DModel", with_private, 512, 512, HARDWARE) == base
    changed = {**PIXART_TINY_CONFIG, "num_layers": 3}
    assert profile_cache.profile_key("PixArtTransformer2DModel", changed, 512, 512, HARDWARE) != base
    assert profile_cache.profile_key("PixArtTransformer2DModel", PIXART_TINY_CONFIG, 512, 768, HARDWARE) != base
    swapped = [["NVIDIA A100", "NVIDIA H200"], ["NVIDIA A100", "NVIDIA H200"]]
    assert profile_cache.profile_key("PixArtTransformer2DModel", PIXART_TINY_CONFIG, 512, 512, swapped) != base


def test_key_is_readable_and_canonical():
    key = profile_cache.profile_key("PixArtTransformer2DModel", {"a": 1}, 256, 512, [["cpu0", "cpu1"], ["cpu2"]])
    model, digest, size, hardware = key.split("-", 3)
    assert (model, size, hardware) == ("PixArtTransformer2DModel", "256x512", "[cpu0,cpu1|cpu2]")
    assert len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)
    # Tuples equal lists, sets are sorted, mapping order does not matter.
    one = {"axes": (16, 56, 56), "names": {"x", "y", "z"}, "b": 1.5, "a": None}
    two = {"a": None, "b": 1.5, "names": {"z", "y", "x"}, "axes": [16, 56, 56]}
    assert (profile_cache.profile_key("M", one, 1, 1, [["d"]])
            == profile_cache.profile_key("M", two, 1, 1, [["d"]]))
    with pytest.raises(TypeError):
        profile_cache.profile_key("M", {}, 1, 1, "NVIDIA H200")


# ----------------------------------------------------------------------------------------------
# Concurrent writers


def test_concurrent_writers_lose_no_entries(tmp_path):
    cache = tmp_path / "sub" / "speeds.json"
    # What is tested is the lock and the merge, not the lock's patience: on a loaded 2-core machine one writer
    # descheduled while holding the lock kept another waiting past LOCK_WAIT_SECONDS (2 s; CI on 6103fb6), and
    # a writer that gives up (by design: warn, skip) is not a lost entry. So here the writers wait as long as it takes.
    script = LOAD_IN_CHILD + textwrap.dedent("""
        profile_cache.LOCK_WAIT_SECONDS = 120.0
        writer = int(sys.argv[1])
        cache = profile_cache.ProfileCache(sys.argv[2])
        for index in range(100):
            if not cache.store(f"writer{writer}-key{index}", [1.0 + writer, 2.0 + index]):
                sys.exit(1)
    """)
    writers = [subprocess.Popen([sys.executable, "-c", script, str(writer), str(cache)])
               for writer in range(4)]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0, 0]
    entries = _entries(cache)
    assert len(entries) == 400
    reader = ProfileCache(cache)
    for writer in range(4):
        for index in range(100):
            assert reader.load(f"writer{writer}-key{index}", 2) == [1.0 + writer, 2.0 + index]
    assert not [p.name for p in cache.parent.iterdir() if p.name.endswith(".tmp")], "temp files left behind"


# ----------------------------------------------------------------------------------------------
# Poisoned entries


@pytest.mark.parametrize("poison", [
    [float("nan"), 1.0], [float("inf"), 1.0], [0.0, 1.0], [-1.0, 1.0], [1.0, "x"], "x", [True, 1.0],
    [1.0], [1.0, 2.0, 3.0], [[1.0], [2.0]], [], None, {"0": 1.0}, 3.0, [1e400, 1.0],
], ids=["nan", "inf", "zero", "negative", "string-speed", "string", "bool", "short", "long", "nested",
        "empty", "null", "object", "number", "overflow"])
def test_poisoned_entry_is_ignored_then_replaced(tmp_path, capsys, poison):
    cache = tmp_path / "speeds.json"
    # json.dumps writes NaN/Infinity literals, which json.loads accepts: a real risk, not a fiction.
    _write_cache(cache, {"bad": poison, "good": [1.0, 2.0]})
    store = ProfileCache(cache)
    assert store.load("bad", 2) is None
    lines = _warning_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "bad" in lines[0] and str(cache) in lines[0]
    assert store.load("good", 2) == [1.0, 2.0]
    assert capsys.readouterr().err == ""
    assert store.store("bad", [3.0, 4.0]) is True
    assert capsys.readouterr().err == ""  # the poisoned entry was replaced, nothing else dropped
    assert store.load("bad", 2) == [3.0, 4.0]
    assert store.load("good", 2) == [1.0, 2.0]


def test_store_drops_other_invalid_entries_with_one_warning(tmp_path, capsys):
    cache = tmp_path / "speeds.json"
    _write_cache(cache, {"nan": [float("nan")], "text": "x", "good": [1.0, 2.0]})
    assert ProfileCache(cache).store("new", [5.0]) is True
    lines = _warning_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "dropped 2 invalid entries" in lines[0]
    assert _entries(cache) == {"good": [1.0, 2.0], "new": [5.0]}


@pytest.mark.parametrize("speeds", [[float("nan"), 1.0], [0.0], [-2.0], [True], ["1.0"], [], "12", None])
def test_store_refuses_bad_speeds(tmp_path, capsys, speeds):
    cache = tmp_path / "speeds.json"
    assert ProfileCache(cache).store("key", speeds) is False
    assert len(_warning_lines(capsys.readouterr().err)) == 1
    assert not cache.exists()


def test_store_accepts_tuples_and_ints(tmp_path):
    cache = ProfileCache(tmp_path / "speeds.json")
    assert cache.store("key", (1, 2.5)) is True
    assert cache.load("key", 2) == [1.0, 2.5]
    assert cache.load("missing", 2) is None


# ----------------------------------------------------------------------------------------------
# Corrupt files


@pytest.mark.parametrize("content", [
    b"{not json", b"[1.0, 2.0]", b"null", b"42", b"\xff\xfe\x00garbage\x80", b"", b"{\"a\": [1.0]",
    b"[" * 100_000,
], ids=["garbage", "list", "null", "number", "binary", "empty", "truncated", "deep"])
def test_corrupt_file_is_quarantined(tmp_path, capsys, content):
    cache = tmp_path / "speeds.json"
    cache.write_bytes(content)
    store = ProfileCache(cache)
    assert store.load("key", 2) is None
    lines = _warning_lines(capsys.readouterr().err)
    quarantined = [p for p in tmp_path.iterdir() if p.name.startswith("speeds.json.corrupt-")]
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == content
    assert len(lines) == 1 and str(cache) in lines[0] and str(quarantined[0]) in lines[0]
    assert not cache.exists()
    assert store.store("key", [1.0, 2.0]) is True
    assert capsys.readouterr().err == ""
    assert _entries(cache) == {"key": [1.0, 2.0]}
    assert store.load("key", 2) == [1.0, 2.0]


def test_store_quarantines_corrupt_file_without_loading_first(tmp_path, capsys):
    cache = tmp_path / "speeds.json"
    cache.write_bytes(b"[]")
    (tmp_path / "speeds.json.corrupt-20000101T000000Z").write_bytes(b"older")
    assert ProfileCache(cache).store("key", [1.0]) is True
    assert len(_warning_lines(capsys.readouterr().err)) == 1
    quarantined = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert len(quarantined) == 2
    assert _entries(cache) == {"key": [1.0]}


def test_quarantine_names_never_collide(tmp_path, capsys):
    cache = tmp_path / "speeds.json"
    for attempt in range(3):  # three corrupt files within one second
        cache.write_bytes(b"garbage %d" % attempt)
        assert ProfileCache(cache).load("key", 1) is None
    capsys.readouterr()
    contents = {p.read_bytes() for p in tmp_path.iterdir() if ".corrupt-" in p.name}
    assert contents == {b"garbage 0", b"garbage 1", b"garbage 2"}


# ----------------------------------------------------------------------------------------------
# Unwritable targets (tests run as root, so chmod would not stop the writes)


def test_store_under_a_regular_file_warns_and_returns_false(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    cache = ProfileCache(blocker / "speeds.json")
    assert cache.store("key", [1.0]) is False
    lines = _warning_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cannot write profile cache" in lines[0]
    assert cache.load("key", 1) is None  # reading there fails quietly too: one line at most
    assert len(_warning_lines(capsys.readouterr().err)) <= 1
    assert blocker.read_text() == "x"


def test_store_onto_a_directory_warns_and_returns_false(tmp_path, capsys):
    target = tmp_path / "speeds.json"
    target.mkdir()
    cache = ProfileCache(target)
    assert cache.store("key", [1.0]) is False
    assert len(_warning_lines(capsys.readouterr().err)) == 1
    assert cache.load("key", 1) is None
    assert len(_warning_lines(capsys.readouterr().err)) == 1
    assert target.is_dir() and list(target.iterdir()) == []


def test_store_creates_missing_parent_directories(tmp_path):
    cache = ProfileCache(tmp_path / "a" / "b" / "speeds.json")
    assert cache.store("key", [2.0]) is True
    assert cache.load("key", 1) == [2.0]


# ----------------------------------------------------------------------------------------------
# check_cache_path


def test_check_cache_path_refuses_a_directory(tmp_path):
    with pytest.raises(ValueError, match="--stadi_profile_cache") as refused:
        profile_cache.check_cache_path(str(tmp_path))
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path) in message and "is a directory" in message


def test_check_cache_path_refuses_a_file_parent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path in (blocker / "speeds.json", blocker / "deeper" / "speeds.json"):
        with pytest.raises(ValueError, match="--stadi_profile_cache") as refused:
            profile_cache.check_cache_path(path)
        assert "\n" not in str(refused.value) and "not a directory" in str(refused.value)


def test_check_cache_path_accepts_files_and_missing_parents(tmp_path):
    profile_cache.check_cache_path(str(tmp_path / "speeds.json"))
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    profile_cache.check_cache_path(existing)
    profile_cache.check_cache_path(str(tmp_path / "missing" / "deeper" / "speeds.json"))
    profile_cache.check_cache_path("relative-speeds.json")


def test_module_does_not_import_torch():
    script = LOAD_IN_CHILD + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         timeout=60).stdout.strip()
    assert out == "False"


def test_an_entry_keeps_the_runs_cost_model_memory(tmp_path):
    """Adaptive STADI's memory (runtime: planner.calls.CallMemory.to_json) survives the launch."""
    cache = ProfileCache(tmp_path / "speeds.json")
    memory = {"evidence": [[[[8, 4.0, 0.01, 0.02, 3.0]], [[8, 2.0, 0.02, 0.01, 1.0]]]], "warmup_rows": [9, 7],
              "plan_rows": [8, 8], "plan_strides": [1, 2], "exchange_seconds": [0.001], "pending": None}
    assert cache.store("k", [100.0, 50.0], memory=memory)
    assert cache.load("k", 2) == [100.0, 50.0]
    assert cache.load_entry("k", 2) == {"speeds": [100.0, 50.0], "memory": memory}
    assert cache.store("old", [1.0, 2.0])  # the speeds-only form stays as it was
    assert _entries(tmp_path / "speeds.json")["old"] == [1.0, 2.0]
    assert cache.load_entry("old", 2) == {"speeds": [1.0, 2.0], "memory": None}


@pytest.mark.parametrize("entry", [{"speeds": [1.0, 2.0], "memory": [1]}, {"speeds": [1.0], "memory": {}},
                                   {"speeds": [1.0, 2.0], "extra": 1}, {"memory": {}}])
def test_a_malformed_memory_entry_is_ignored_with_one_warning(tmp_path, capsys, entry):
    path = tmp_path / "speeds.json"
    _write_cache(path, {"k": entry})
    assert ProfileCache(path).load_entry("k", 2) is None
    assert capsys.readouterr().err.count("stadi: warning:") == 1


# ----------------------------------------------------------------------------------------------
# Only its own files (issue 36): other JSON, oversized files, model folders, bad memories


KEY = "FluxTransformer2DModel-0123456789abcdef-112x80-[cpu0,cpu1]"
MODEL_CONFIG = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", "num_layers": 2}


@pytest.mark.parametrize("content", [MODEL_CONFIG, {"scenario": "x", "arms": []}, {"key": [1.0, 2.0]},
                                     {"stadi_profile_cache": 2, "entries": {}},
                                     {"stadi_profile_cache": 1, "entries": {}, "extra": 1}],
                         ids=["model-config", "bench-results", "plain-key", "newer-version", "extra-field"])
def test_a_json_file_that_is_not_a_cache_is_refused_and_never_rewritten(tmp_path, capsys, content):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    before = path.read_bytes()
    with pytest.raises(ValueError) as info:
        profile_cache.check_cache_path(path)
    assert "\n" not in str(info.value) and "--stadi_profile_cache" in str(info.value)
    assert "profile cache" in str(info.value)
    cache = ProfileCache(path)
    assert cache.load_entry(KEY, 2) is None
    assert cache.store(KEY, [1.0, 2.0]) is False
    lines = _warning_lines(capsys.readouterr().err)
    assert len(lines) == 2 and all(str(path) in line for line in lines)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.corrupt-*"))


def test_the_earlier_form_is_read_and_rewritten_in_the_marked_one(tmp_path):
    path = tmp_path / "speeds.json"
    path.write_text(json.dumps({KEY: [1.0, 2.0]}))
    profile_cache.check_cache_path(path)
    cache = ProfileCache(path)
    assert cache.load(KEY, 2) == [1.0, 2.0]
    assert cache.store(KEY.replace("112x80", "64x64"), [3.0, 4.0])
    assert _entries(path) == {KEY: [1.0, 2.0], KEY.replace("112x80", "64x64"): [3.0, 4.0]}
    path.write_text("{}")  # an empty object holds no one's data
    profile_cache.check_cache_path(path)


def test_an_oversized_cache_is_refused_before_parsing(tmp_path, capsys):
    path = tmp_path / "speeds.json"
    path.write_bytes(b'{"stadi_profile_cache": 1, "entries": {}, "pad": "' + b"x" * profile_cache.MAX_CACHE_BYTES
                     + b'"}')
    with pytest.raises(ValueError, match="larger than 8 MiB"):
        profile_cache.check_cache_path(path)
    assert ProfileCache(path).load_entry(KEY, 2) is None
    assert ProfileCache(path).store(KEY, [1.0]) is False
    assert len(_warning_lines(capsys.readouterr().err)) == 2


def test_paths_inside_model_files_are_refused(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hub))
    for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(env, raising=False)
    snapshot = hub / "hub" / "models--org--model" / "snapshots" / "abc"
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    local = tmp_path / "my_model"
    (local / "unet").mkdir(parents=True)
    (local / "model_index.json").write_text("{}")
    weights = tmp_path / "weights_only"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    for path, words in ((snapshot / "transformer" / "config.json", "Hugging Face cache"),
                        (hub / "hub" / "speeds.json", "Hugging Face cache"),
                        (local / "unet" / "speeds.json", "model folder"), (local / "speeds.json", "model folder"),
                        (weights / "speeds.json", "model folder")):
        with pytest.raises(ValueError, match=words):
            profile_cache.check_cache_path(path)
        assert ProfileCache(path).store(KEY, [1.0, 2.0]) is False
        assert not path.exists() or path.name == "config.json"
    assert len(_warning_lines(capsys.readouterr().err)) == 5
    profile_cache.check_cache_path(tmp_path / "elsewhere" / "speeds.json")  # beside them is fine


GOOD_MEMORY = {"evidence": [[[[8, 4.0, 0.01, 0.02, 3.0]], [[8, 2.0, 0.02, 0.01, 1.0]]]], "warmup_rows": [9, 7],
               "plan_rows": [8, 8], "plan_strides": [1, 2], "exchange_seconds": [0.001], "pending": None}


@pytest.mark.parametrize("field,value", [
    ("plan_rows", [float("inf"), 8]), ("plan_rows", [-1, 8]), ("exchange_seconds", [1e308]),
    ("evidence", [[[[8, 1e300, 0.01, 0.02, 3.0]], [[8, 2.0, 0.02, 0.01, 1.0]]]]),
    ("evidence", [[[[8, 4.0, 1e-301, 0.02, 3.0]], [[8, 2.0, 0.02, 0.01, 1.0]]]]),
    ("plan_strides", [0, 1]), ("plan_strides", [1, 10**9]), ("warmup_rows", [9]),
], ids=["inf-rows", "negative-rows", "huge-exchange", "huge-weight", "tiny-row-cost", "stride-0", "stride-1e9",
        "short"])
def test_a_bad_memory_is_dropped_with_one_warning_and_replaced_never_kept(tmp_path, capsys, field, value):
    """Each of these gave a traceback in every rank, and since the failed run never replaced the entry,
    every later launch with the cache failed too (issue 36); or was planned on silently."""
    path = tmp_path / "speeds.json"
    _write_cache(path, {KEY: {"speeds": [1.0, 2.0], "memory": {**GOOD_MEMORY, field: value}},
                        "other": {"speeds": [1.0, 2.0], "memory": {**GOOD_MEMORY, field: value}}})
    cache = ProfileCache(path)
    assert cache.load_entry(KEY, 2) is None
    assert len(_warning_lines(capsys.readouterr().err)) == 1
    assert cache.store(KEY, [3.0, 4.0], memory=GOOD_MEMORY)
    assert "dropped 1 invalid entry" in capsys.readouterr().err  # "other": the same damage
    assert _entries(path) == {KEY: {"speeds": [3.0, 4.0], "memory": GOOD_MEMORY}}


def test_speeds_a_million_times_apart_are_not_an_entry(tmp_path, capsys):
    path = tmp_path / "speeds.json"
    _write_cache(path, {KEY: [1e-300, 1.0]})
    assert ProfileCache(path).load(KEY, 2) is None
    assert "differ by more than" in capsys.readouterr().err
