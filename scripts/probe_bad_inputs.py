"""Feed known-bad inputs to every entry point and count how each one ends.

    python scripts/probe_bad_inputs.py

Entry points: the example's flags (parsed and validated as under torchrun with 2 ranks), STADI
config files, `stadi-plan` and `stadi-bench` (parse and validate only). Each input is run
in-process with a 20 s alarm. Outcomes: `clean` (exit 2, exactly one stderr line naming a flag
or key), `traceback` (any other exception, or more than one line), `hang` (the alarm fired),
`accepted` (it returned normally although the input is bad). Exit status 1 unless every input
is clean.
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
    ["--ulysses_degree", "2"], ["--ring_degree", "2"], ["--pipefusion_parallel_degree", "2"],
    ["--tensor_parallel_degree", "2"], ["--data_parallel_degree", "2"], ["--use_fast_attn"],
    ["--use_teacache"], ["--use_fbcache"], ["--cache_method", "teacache"], ["--use_torch_compile"],
    ["--use_onediff"],
    ["--stadi_speeds", "1,0.5,2"], ["--stadi_speeds", "1,-1"], ["--stadi_speeds", ","],
    ["--stadi_speeds", "1,nan"], ["--stadi_speeds", "a"], ["--stadi_emulate_slowdown", "1,x"],
    ["--stadi_emulate_slowdown", "1,0.5"], ["--stadi_emulate_slowdown", "1"], ["--stadi_mode", "fast"],
    ["--stadi_emulate_shift", "4"], ["--stadi_emulate_shift", "4:1"], ["--stadi_emulate_shift", "x:1,2"],
    ["--stadi_replan", "always"],
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


def main() -> int:
    os.environ.update(WORLD_SIZE="2", RANK="0")
    example = _load_example()
    from stadi_xdit.bench.cli import parse_args as bench_parse
    from stadi_xdit.config import StadiConfig
    from stadi_xdit.planner.cli import main as plan_main

    def run_example(flags):
        sys.argv = ["stadi_example.py", *BASE, *flags]
        return example.parse_args()

    def read_config(text, suffix):
        path = Path(TMP) / f"config.{suffix}"
        path.write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text else b"\xff\xfe")
        return StadiConfig.from_file(path)

    groups = {
        "example flags": [lambda f=f: run_example(f) for f in EXAMPLE_FLAGS],
        "config files": [lambda t=t, s=s: read_config(t, s) for t, s in CONFIG_FILES],
        "stadi-plan": [lambda a=a: plan_main(a) for a in PLAN_ARGS],
        "stadi-bench": [lambda a=a: bench_parse(a) for a in BENCH_ARGS],
    }
    print("| | bad inputs | clean one line | traceback | hang | wrongly accepted |")
    print("|---|---|---|---|---|---|")
    total = Counter()
    failures = []
    for name, calls in groups.items():
        counts = Counter()
        for index, call in enumerate(calls):
            result, last = outcome(call)
            counts[result] += 1
            if result != "clean":
                failures.append(f"{name} #{index}: {result}: {last}")
        total.update(counts)
        print(f"| {name} | {len(calls)} | {counts['clean']} | {counts['traceback']} | {counts['hang']} "
              f"| {counts['accepted']} |")
    for line in failures:
        print(line, file=sys.stderr)
    return 0 if total["clean"] == sum(total.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
