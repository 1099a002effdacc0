"""Feed known-bad inputs to every entry point and count how each one ends.

    python scripts/probe_bad_inputs.py            # in-process groups (the test suite runs these)
    python scripts/probe_bad_inputs.py --faults   # also real launches under faults (minutes)

Entry points: the example's flags (parsed and validated as under torchrun with 2 ranks), STADI
config files, `stadi-plan` and `stadi-bench` (parse and validate only), `stadi-xdit`'s checks
before launch (against a tiny offline hub cache, some of it damaged on purpose), and the training
script's `--out`. Each input is run in-process with a 20 s alarm. Outcomes: `clean` (exit 2,
exactly one stderr line naming a flag or key), `traceback` (any other exception, or more than one
line), `hang` (the alarm fired), `silent` (an error exit with no line), `accepted` (it returned
normally although the input is bad).

`--faults` runs the real launcher with the tiny FLUX.1-dev under the faults of issue 21 (a rank
stopped in model load, in a STADI step, in VAE decode; a rank killed; Ctrl-C, SIGTERM and SIGKILL
of the launcher; a full disk at save time): `clean` there means the launcher ended within
--stadi_timeout plus its margin, named the failed rank in one line, left no process behind and,
where the run had finished, kept the image; `lost` means a finished image is nowhere. Exit
status 1 unless every case is clean.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = ["--model", "tiny", "--use_stadi", "--height", "128", "--width", "128"]
TMP = tempfile.mkdtemp(prefix="stadi-probe-")

EXAMPLE_FLAGS = [
    ["--ulysses_degree", "3"], ["--ring_degree", "2"], ["--pipefusion_parallel_degree", "2"],
    ["--tensor_parallel_degree", "2"], ["--data_parallel_degree", "2"], ["--use_fast_attn"],
    ["--use_teacache"], ["--use_fbcache"], ["--cache_method", "teacache"],
    ["--use_onediff"],
    ["--stadi_speeds", "1,0.5,2"], ["--stadi_speeds", "1,-1"], ["--stadi_speeds", ","],
    ["--stadi_speeds", "1,nan"], ["--stadi_speeds", "a"], ["--stadi_emulate_slowdown", "1,x"],
    ["--stadi_emulate_slowdown", "1,0.5"], ["--stadi_emulate_slowdown", "1"], ["--stadi_mode", "fast"],
    ["--stadi_emulate_shift", "4"], ["--stadi_emulate_shift", "4:1"], ["--stadi_emulate_shift", "x:1,2"],
    ["--stadi_replan", "always"], ["--stadi_timing", "fast"],
    ["--stadi_max_stride", "0"], ["--stadi_max_stride", "100"], ["--stadi_max_stride", "x"],
    ["--stadi_tolerance", "nan"], ["--stadi_tolerance", "1"], ["--stadi_tolerance", "-0.1"],
    ["--stadi_timeout", "nan"], ["--stadi_timeout", "inf"], ["--stadi_timeout", "1e300"],
    ["--stadi_timeout", "0"], ["--stadi_timeout", "-1"], ["--height", "250"], ["--height", "16"],
    ["--height", "-16"], ["--height", "0"], ["--width", "0"], ["--width", "100"],
    ["--num_inference_steps", "0"], ["--num_inference_steps", "8", "--warmup_steps", "8"],
    ["--warmup_steps", "-1"], ["--warmup_steps", "0"], ["--pipeline", "flux", "--use_cfg_parallel"],
    ["--stadi_profile_cache", TMP], ["--stadi_profile_cache", ""], ["--model", "no-such-model"],
    ["--pipeline", "dalle"], ["--use_cfg_parallel", "--stadi_speeds", "1,2"],
    ["--seed", "1" + "0" * 30], ["--guidance_scale", "nan"], ["--output_type", "nonsense"],
    ["--num_inference_steps", "100000000"], ["--save_latents", "/dev/null/x.pt"], ["--model", TMP],
    ["--stadi_config_file", ""], ["--stadi_emulate_shift", "9999:1,2"],
    # issue 21
    ["--stadi_timeout", "0.1"], ["--stadi_profile_cache", "x\0.json"],
    ["--stadi_config_file", f"{TMP}/settings.json", "--stadi_profile_cache", f"{TMP}/settings.json"],
    ["--stadi_profile_cache", f"{TMP}/w.safetensors"],
    # issue 36: flags without effect in a combination, factors past a sleep, the planner's caps, model files
    ["--stadi_timing", "work", "--stadi_speeds", "1,2"], ["--stadi_exact", "--stadi_kv_dtype", "bfloat16"],
    ["--stadi_emulate_slowdown", "1,1e300"], ["--stadi_emulate_shift", "2:1,1e300"],
    ["--num_inference_steps", "1001"], ["--height", "65552"], ["--model", f"{TMP}/pixart-missing"],
    ["--model", f"{TMP}/pixart-truncated"], ["--stadi_profile_cache", f"{TMP}/results.json"],
    ["--stadi_profile_cache", f"{TMP}/big-cache.json"], ["--stadi_profile_cache", f"{TMP}/pixart-missing/speeds.json"],
]

# --stadi_* flags without --use_stadi: a plain run would ignore them
EXAMPLE_FLAGS_WITHOUT_STADI = [
    ["--stadi_speeds", "1,2", "--stadi_mode", "spatial"], ["--stadi_degree", "2"], ["--stadi_exact"],
]

CONFIG_FILES = [
    ('{"timeout_seconds": NaN}', "json"), ('{"timeout_seconds": Infinity}', "json"),
    ('{"timeout_seconds": 1e300}', "json"), ('{"max_stride": 1000000000}', "json"), ('{"speeds": []}', "json"),
    ('{"mode": "full", "mode": "uniform"}', "json"), ("[1, 2]", "json"), ("null", "json"), ('"full"', "json"),
    ("{", "json"), ('{"exact": "yes"}', "json"), ('{"spead": 1}', "json"), ('{"speeds": [1, "x"]}', "json"),
    ('{"max_stride": 2.5}', "json"), ('{"tolerance": "0.1"}', "json"), ('{"profile_cache": 5}', "json"),
    ("timeout_seconds: .nan\n", "yaml"), ("timeout_seconds: .inf\n", "yaml"), ("max_stride: 1000000000\n", "yaml"),
    ("speeds: []\n", "yaml"), ("mode: full\nmode: spatial\n", "yaml"), ("- 1\n- 2\n", "yaml"),
    ("speeds: [1, 2\n", "yaml"), ("exact: yes please\n", "yaml"), ("mode: 3\n", "yaml"),
    ("use_stadi: 1\n", "yaml"), ("emulate_slowdown: '1,0.5'\n", "yaml"), ("tolerance: [1]\n", "yaml"),
    ("timeout_seconds: 0\n", "yaml"), ("speeds: '1,-2'\n", "yaml"), ("max_stride: true\n", "yaml"),
    ("\xff\xfe", "yaml"), ("mode: fast\n", "yaml"), ('{"emulate_shift": [4, 1]}', "json"),
    ("emulate_shift: '4:0.5,1'\n", "yaml"),
    ("[" * 100_000 + "]" * 100_000, "json"), ("a:\n" + " " * 2 + "- " * 20_000 + "1\n", "yaml"),
    ('{"timeout_seconds": ' + "9" * 401 + "}", "json"), ("tolerance: " + "9" * 401 + "\n", "yaml"),
    ('{"speeds": [1, ' + "9" * 5000 + "]}", "json"), ('{"timeout_seconds": 1e-9}', "json"),
    # issue 21: alias bombs (8 and 10 levels), a 200 MB file (sparse), a NUL byte in a path
    ("l0: &l0 [x,x,x,x,x,x,x,x,x]\n" + "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n"
                                                for i in range(1, 8)) + "speeds: *l7\n", "yaml"),
    ("l0: &l0 [x,x,x,x,x,x,x,x,x]\n" + "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n"
                                                for i in range(1, 10)) + "speeds: [*l9]\n", "yaml"),
    (None, "yaml"), ('profile_cache: "x\\0.json"\n', "yaml"), ('{"profile_cache": "a\\u0000b"}', "json"),
    # issue 36
    ('{"timing": "work", "speeds": [1, 2]}', "json"), ('{"kv_dtype": "bfloat16", "exact": true}', "json"),
    ('{"emulate_slowdown": [1, 1e300]}', "json"), ("emulate_shift: '2:1,5000'\n", "yaml"),
]

PLAN_ARGS = [
    [], ["--speeds", "1,0.5"], ["--speeds", "1,nan", "--height", "1024"], ["--speeds", "", "--height", "1024"],
    ["--speeds", "1,0", "--height", "1024"], ["--speeds", "1,-1", "--height", "1024"],
    ["--gpus", "A100x100000000", "--height", "1024"], ["--gpus", "A100x-1", "--height", "1024"],
    ["--gpus", "B999", "--height", "1024"], ["--gpus", "A100x0", "--height", "1024"],
    ["--speeds", "1,0.5", "--height", "1600000000"], ["--speeds", "1,0.5", "--height", "0"],
    ["--speeds", "1,0.5", "--height", "1000"], ["--speeds", "1,0.5", "--height", "16"],
    ["--speeds", "1,0.5", "--height", "1024", "--steps", "0"],
    ["--speeds", "1,0.5", "--height", "1024", "--steps", "100000000"],
    ["--speeds", "1,0.5", "--height", "1024", "--warmup", "20"],
    ["--speeds", "1,0.5", "--height", "1024", "--warmup", "-1"],
    ["--speeds", "1,0.5", "--height", "1024", "--max-stride", "0"],
    ["--speeds", "1,0.5", "--height", "1024", "--max-stride", "17"],
    ["--speeds", "1,0.5", "--height", "1024", "--tolerance", "nan"],
    ["--speeds", "1,0.5", "--height", "1024", "--tolerance", "-1"],
    ["--speeds", "1,0.5", "--height", "1024", "--sync-seconds", "inf"],
    ["--speeds", "1,0.5", "--height", "1024", "--exchange-seconds", "-1"],
    ["--speeds", "1,0.5", "--height", "1024", "--patch-size", "0"],
    ["--speeds", "1,0.5", "--height", "1024", "--vae-scale", "-8"],
    ["--speeds", "1,0.5", "--height", "1024", "--align", "0"],
    ["--speeds", "1,0.5", "--height", "1024", "--mode", "fast"],
    ["--speeds", "1,0.5", "--gpus", "A100", "--height", "1024"],
    ["--speeds", ",".join(["1"] * 100000), "--height", "1024"],
    ["--speeds", "1e308,1e-308", "--height", "1024"], ["--speeds", "1e-320,1", "--height", "1024"],
    ["--speeds", "1e-300,1", "--height", "1024", "--json"],
]

BENCH_ARGS = [
    ["--scenario", "slowdown:"], ["--scenario", "slowdown:a,b"], ["--scenario", "background:x=1"],
    ["--scenario", "background:1="], ["--scenario", "foo"], ["--scenario", "slowdown:0,1"],
    ["--scenario", "slowdown:-1,2"], ["--scenario", "slowdown:nan,1"], ["--scenario", "background:1=-3"],
    ["--scenario", "slowdown:1,2,3"], ["--scenario", "background:5=1"], ["--scenario", "shift:1=0->1"],
    ["--scenario", "shift:1=0->1@2"], ["--scenario", "shift:1=1->1@0.5"], ["--scenario", "shift:9=0->1@0.5"],
    ["--scenario", "slowdown:1,1->1@0.5"], ["--scenario", "slowdown:1,1->1,2@x"], ["--ranks", "0"], ["--cores", "a,b"],
    ["--repeats", "0"], ["--steps", "0"], ["--warmup", "30"], ["--warmup", "-1"], ["--height", "0"],
    ["--height", "100"], ["--max-stride", "0"], ["--max-stride", "100"], ["--dtype", "nonsense"],
    ["--arms", "full,warp"], ["--run-timeout", "nan"], ["--simulate", "--gpus", "A100x-1"],
    ["--simulate", "--speeds", "1,x"], ["--simulate", "--mfu", "0"], ["--simulate", "--row-seconds", "-1"],
    ["--simulate", "--link-gbps", "0"], ["--preset", "nope"], ["--out", "/dev/null/x"],
    ["--preset", "wan-tiny", "--num-frames", "1", "--height", "16"],
]


# stadi-xdit's checks before launch (xDiT's runner form; a script form for the flag order)
FLUX = ["--model", "FLUX.1-dev", "--use_stadi", "--stadi_degree", "2", "--height", "128", "--width", "128",
        "--num_inference_steps", "3", "--warmup_steps", "1"]
SD3 = ["--model", "SD3.5", "--use_stadi", "--stadi_degree", "2", "--height", "128", "--width", "128",
       "--num_inference_steps", "3", "--warmup_steps", "1", "--prompt", "a cat"]
LAUNCHER_ARGS = [
    (["--model", "FLUX.1-dev", "--stadi_speeds", "1,2", "--stadi_mode", "spatial", "--prompt", "a"], None),
    (["ex.py", "--model", "tiny", "--stadi_degree", "2"], None),
    ([*FLUX, "--prompt", "a cat", "--negative_prompt", "dog"], None),
    ([*SD3, "--guidance_scale", "nan"], None),
    ([*SD3, "--negative_prompt", "dog"], None),
    ([*FLUX, "--prompt"], None),
    ([*FLUX, "--prompt", "caf\udcff"], None),
    ([*SD3, "--height", "256"], None),
    (SD3, "truncate transformer/diffusion_pytorch_model.safetensors"),
    (SD3, "remove vae/diffusion_pytorch_model.safetensors"),
    (SD3, "break model_index.json"),
    (SD3, "num_layers -3"),
    (SD3, "empty cache, offline"),
    (SD3, "empty cache, online"),
    ([*FLUX, "--prompt", "a cat"], "port in use"),
    ([*FLUX, "--prompt", "a cat", "--stadi_mode", "fast"], "RANK=1 WORLD_SIZE=4"),
    ([*FLUX, "--prompt", "a cat"], "STADI_FAULT=decode:x"),
    ([*FLUX, "--prompt", "a cat", "--output_directory", "/dev/null/x"], None),
    # issue 36: what every rank refused with a traceback; a profile cache that is not the cache's to write
    ([*FLUX, "--prompt", "a cat", "--num_iterations", "0"], None),
    ([*FLUX, "--prompt", "a cat", "--num_iterations", "-3"], None),
    ([*FLUX, "--prompt", "a cat", "--num_inference_steps", "1001"], None),
    ([*FLUX, "--prompt", "a cat", "--height", "65552"], None),
    ([*FLUX, "--prompt", "a cat", "--stadi_emulate_slowdown", "1,1e300"], None),
    ([*FLUX, "--prompt", "a cat", "--stadi_timing", "work", "--stadi_speeds", "1,2"], None),
    ([*SD3, "--stadi_profile_cache", "{snapshot}/transformer/config.json"], None),
    ([*SD3, "--stadi_profile_cache", "{snapshot}/new-cache.json"], None),
    ([*FLUX, "--prompt", "a cat", "--stadi_profile_cache", f"{TMP}/results.json"], None),
    ([f"{TMP}/fifo.py", "--model", "tiny", "--output_directory", f"{TMP}/out"], None),
    ([*SD3, "--use_cfg_parallel", "--guidance_scale", "1"], None),
]

# xDiT's runner config dict (the runner's own process: no launcher checks it first)
RUNNER_DICTS = [{"prompt": None}, {"prompt": 5}, {"prompt": b"a cat"}, {"seed": "42"},
                {"guidance_scale": float("nan")}, {"output_directory": None}, {"num_iterations": 0},
                {"num_inference_steps": 5000}, {"height": 80000}, {"negative_prompt": 3},
                {"stadi_timing": "work", "stadi_speeds": "1,2"}]

TRAIN_OUT = ["w.json", "toy_reference.safetensors", "{weights}/toy_reference.safetensors",
             "{weights}/other.safetensors"]


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang


def _load_example():
    from stadi_xdit.offline.modules import load_module_from_path

    return load_module_from_path("stadi_example", REPO / "scripts" / "stadi_example.py")


def outcome(call: Callable[[], object], seconds: int = 20) -> tuple[str, str]:
    """How one bad input ends: clean / traceback / hang / accepted, with its stderr."""
    err = io.StringIO()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            call()
        result = "accepted"
    except Hang:
        result = "hang"
    except SystemExit as exit_:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if exit_.code not in (0, None) and not lines:
            result = "silent"
        else:
            result = "clean" if exit_.code == 2 and len(lines) == 1 and "error:" in lines[0] else "traceback"
    except ValueError as error:  # library entry points (config files): one line is the contract
        result = "clean" if "\n" not in str(error) and str(error) else "traceback"
        err.write(str(error))
    except Exception as error:  # noqa: BLE001 - counting what escapes
        result = "traceback"
        err.write(f"{type(error).__name__}: {error}")
    finally:
        signal.alarm(0)
    return result, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""


def _launcher_case(argv: list[str], setup: str | None, hub: Path) -> None:
    """`stadi-xdit`'s checks before launch for `argv`, with `setup` applied to a copy of the hub."""
    import shutil
    import socket

    from huggingface_hub import constants

    from stadi_xdit import cli_errors
    from stadi_xdit.offline.hub_cache import HUB_MODELS, hub_snapshot_dir
    from stadi_xdit.run import build_launch_command, check_fault_injection, check_launch_environment

    home = Path(tempfile.mkdtemp(prefix="hub-", dir=TMP))
    saved = (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, dict(os.environ), cli_errors._ALWAYS_SPEAKS)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        if setup and setup.startswith("empty cache"):
            (home / "hub").mkdir()
        else:
            shutil.copytree(hub, home, dirs_exist_ok=True)
        snapshot = hub_snapshot_dir(home, HUB_MODELS["SD3.5"])
        if setup == "truncate transformer/diffusion_pytorch_model.safetensors":
            with open(snapshot / "transformer" / "diffusion_pytorch_model.safetensors", "r+b") as handle:
                handle.truncate(50_000)
        elif setup == "remove vae/diffusion_pytorch_model.safetensors":
            (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        elif setup == "break model_index.json":
            (snapshot / "model_index.json").write_text("{broken")
        elif setup == "num_layers -3":
            config = snapshot / "transformer" / "config.json"
            config.write_text(config.read_text().replace('"num_layers": 2', '"num_layers": -3'))
        elif setup == "RANK=1 WORLD_SIZE=4":  # what launch() does with a pod's environment
            os.environ.update(RANK="1", WORLD_SIZE="4")
            cli_errors.speak_always()
        elif setup == "STADI_FAULT=decode:x":
            os.environ["STADI_FAULT"] = "decode:x"
        constants.HF_HUB_OFFLINE = setup != "empty cache, online"
        constants.HF_HUB_CACHE = str(home / "hub")
        if setup == "port in use":
            listener.listen()
        else:  # free again: the case's own input must be what stops it
            listener.close()
        argv = [arg.replace("{snapshot}", str(snapshot)) for arg in argv]
        local = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
        if "--output_directory" not in argv:
            local += ["--output_directory", str(home / "out")]
        build_launch_command([*local, *argv])
        check_launch_environment([*local, *argv])
        check_fault_injection()
    finally:
        listener.close()
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        cli_errors._ALWAYS_SPEAKS = saved[3]


def _write_issue_36_files(tmp: Path) -> None:
    """Local model folders with a missing and a truncated component, a benchmark's results.json, an oversized
    profile cache (sparse), and a FIFO where a script should be."""
    for name in ("pixart-missing", "pixart-truncated"):
        (tmp / name).mkdir()
        (tmp / name / "model_index.json").write_text(
            '{"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}')
    (tmp / "pixart-truncated" / "transformer").mkdir()
    (tmp / "pixart-truncated" / "transformer" / "config.json").write_text("{}")
    (tmp / "pixart-truncated" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x40\x00")
    (tmp / "results.json").write_text('{"scenario": "slowdown:1,2", "arms": []}')
    with open(tmp / "big-cache.json", "wb") as handle:
        handle.truncate(300 << 20)
    os.mkfifo(tmp / "fifo.py")


def _runner_dict(config: dict) -> None:
    from xfuser.config import xFuserArgs

    xFuserArgs.from_runner_args({"model": "FLUX.1-dev", "use_stadi": True, "stadi_degree": 2, "height": 128,
                                 "width": 128, "num_inference_steps": 3, "warmup_steps": 1, "prompt": "a cat",
                                 **config})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.update(WORLD_SIZE="2", RANK="0")
    example = _load_example()
    import stadi_xdit.xdit  # noqa: F401  (compat layer before xfuser)
    from stadi_xdit.offline.hub_cache import write_hub_cache

    hub = Path(TMP) / "hub-base"
    write_hub_cache(hub, ["FLUX.1-dev", "SD3.5"])
    (Path(TMP) / "settings.json").write_text('{"use_stadi": true}')
    (Path(TMP) / "w.safetensors").write_bytes(b"weights")
    _write_issue_36_files(Path(TMP))
    train = None
    from stadi_xdit.bench.cli import parse_args as bench_parse
    from stadi_xdit.config import StadiConfig
    from stadi_xdit.planner.cli import main as plan_main

    def run_example(flags):
        sys.argv = ["stadi_example.py", *BASE, *flags]
        return example.parse_args()

    def run_example_plain(flags):
        sys.argv = ["stadi_example.py", *[a for a in BASE if a != "--use_stadi"], *flags]
        return example.parse_args()

    def read_config(text, suffix):
        path = Path(TMP) / f"config.{suffix}"
        if text is None:  # 200 MB: sparse, the size check must not read it
            path.unlink(missing_ok=True)
            with open(path, "wb") as handle:
                handle.truncate(200 << 20)
        else:
            path.write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text else b"\xff\xfe")
        return StadiConfig.from_file(path)

    def train_out(out):
        from stadi_xdit.offline.modules import load_module_from_path
        from stadi_xdit.toy import model

        nonlocal train
        train = train or load_module_from_path("train_toy_dit_probe", REPO / "scripts" / "train_toy_dit.py")
        return train.parse_args(["--out", out.format(weights=model.WEIGHTS_DIR)])

    groups = {
        "example flags": [lambda f=f: run_example(f) for f in EXAMPLE_FLAGS],
        "config files": [lambda t=t, s=s: read_config(t, s) for t, s in CONFIG_FILES],
        "stadi-plan": [lambda a=a: plan_main(a) for a in PLAN_ARGS],
        "stadi-bench": [lambda a=a: bench_parse(a) for a in BENCH_ARGS],
        "example without --use_stadi": [lambda f=f: run_example_plain(f) for f in EXAMPLE_FLAGS_WITHOUT_STADI],
        "stadi-xdit checks": [lambda a=a, s=s: _launcher_case(a, s, hub) for a, s in LAUNCHER_ARGS],
        "runner config dict": [lambda c=c: _runner_dict(c) for c in RUNNER_DICTS],
        "train_toy_dit --out": [lambda o=o: train_out(o) for o in TRAIN_OUT],
    }
    if "--faults" in argv:
        from probe_launcher_faults import fault_cases  # scripts/, beside this file

        groups["stadi-xdit faults"] = fault_cases(hub)
    print("| | bad inputs | clean one line | traceback | hang | silent | wrongly accepted | lost work |")
    print("|---|---|---|---|---|---|---|---|")
    total = Counter()
    failures = []
    for name, calls in groups.items():
        counts = Counter()
        for index, call in enumerate(calls):
            result, last = call() if getattr(call, "is_fault", False) else outcome(call)
            counts[result] += 1
            if getattr(call, "is_fault", False):
                print(f"  {call.label}: {result}: {last}", file=sys.stderr)
            if result != "clean":
                failures.append(f"{name} #{index}: {result}: {last}")
        total.update(counts)
        print(f"| {name} | {len(calls)} | {counts['clean']} | {counts['traceback']} | {counts['hang']} "
              f"| {counts['silent']} | {counts['accepted']} | {counts['lost']} |")
    for line in failures:
        print(line, file=sys.stderr)
    return 0 if total["clean"] == sum(total.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
