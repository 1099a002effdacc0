"""The GPU check (issue 37): what a lent GPU machine measures, as one bounded command.

    scripts/gpu_check.sh                 # on the GPU machine: installs .whl/, then runs this script
    scripts/gpu_check.sh --dry-run       # on CPU: the same checks on tiny models (the suite runs it)

The checks run in this order, each in a process session of its own with a time limit. The summary
($OUT/gpu_check.md and $OUT/gpu_check.json) is rewritten after every check, so a run that is cut
off still returns what it measured; $OUT/gpu_check.log keeps the end of each check's output.

1. environment: the device, its memory, torch and the libraries' versions.
2. exact: STADI exact mode against one process, on an image family (Flux.1) and on Wan, in float32
   and bfloat16, on 2 ranks. On one GPU the two ranks share it, which NCCL refuses: they use gloo on
   CUDA tensors, and the summary says so. Then one rank alone on its device, on xDiT's NCCL groups.
3. single: real-size architectures with random weights on one rank, bfloat16, eager:
   FLUX.1-dev at 1024 px, 28 steps (xDiT publishes 6.71 s on one H100) and PixArt-alpha at 1024 px,
   20 steps. Seconds per call and per step, peak memory.
4. stadi: the same FLUX.1-dev call under STADI on 2 ranks sharing the device, the second slowed
   down 2x (`--stadi_emulate_slowdown 1,2`), exact and `full`: the plan, the measured speeds, the
   K/V store's bytes against the preset's prediction, the exchange, seconds per call.
5. compile: torch.compile on the single-rank FLUX.1-dev call, if time is left.

The dry run maps each check to CPU and tiny shapes (float32, and bfloat16 in checks 2 and 3).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/gpu_check.py` from a checkout without an install
    sys.path.insert(0, str(REPO))

CHECKS = ("environment", "exact", "single", "stadi", "compile")
# Seconds each check may take at most on the GPU machine; the whole run must end within the budget.
LIMITS = {"environment": 60, "exact": 150, "single": 180, "stadi": 180, "compile": 150}
DRY_LIMITS = {"environment": 30, "exact": 60, "single": 30, "stadi": 60, "compile": 60}
# (preset, px, steps, dtype) of each call; the dry run's are tiny, and one builds in bfloat16 as the real ones do.
REAL = {"flux": ("flux-dev-1024", 1024, 28, "bfloat16"), "pixart": ("pixart-alpha-1024", 1024, 20, "bfloat16"),
        "compile": ("flux-dev-1024", 1024, 28, "bfloat16")}
DRY = {"flux": ("flux-small", 128, 4, "float32"), "pixart": ("tiny", 128, 4, "bfloat16"),
       "compile": ("tiny", 128, 4, "float32")}  # inductor's C++ build of a 2-block model: the plumbing, in seconds
EXACT_CASES = ("StadiFluxPipeline", "StadiWanPipeline")  # an image family and a video one
XDIT_FLUX_H100_SECONDS = {"eager": 6.71, "compile": 4.30}  # xDiT's published FLUX.1-dev 1024 px, 28 steps


# --------------------------------------------------------------------------------------------
# the checks (each runs in its own process: `gpu_check.py --check NAME`)


class CheckFailed(Exception):
    """A check that did not pass, with the figures it had gathered."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def check_environment(dry_run: bool) -> dict:
    import platform

    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                     cuda=torch.version.cuda)
        try:  # a tuple in recent torch, an int in older ones; a fact, never a reason to stop
            nccl = torch.cuda.nccl.version()
            facts["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as error:  # noqa: BLE001
            facts["nccl"] = f"unknown ({type(error).__name__})"
    else:
        facts["device"] = "cpu"
    import stadi_xdit.xdit  # noqa: F401  (the compat layer: on CPU xfuser imports only behind it)

    for name in ("xfuser", "diffusers", "transformers", "yunchang", "distvae"):
        try:
            module = __import__(name)
            facts[name] = getattr(module, "__version__", "present")
        except Exception as error:  # noqa: BLE001 - an import that fails is a finding, said in one line
            facts[name] = f"missing ({type(error).__name__}: {error})"
    if not dry_run and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device: run the check on the GPU machine, or pass --dry-run", facts)
    return facts


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _share_the_device(world: int) -> str | None:
    """Ranks of this process's world that share a GPU talk over gloo (NCCL refuses two ranks on one
    device) and all use device 0. Returns the note the summary gives, or None where nothing is shared."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() >= world:
        return None
    from xfuser import envs

    os.environ["LOCAL_RANK"] = "0"  # xDiT places each rank on cuda:LOCAL_RANK
    envs.get_torch_distributed_backend = lambda: "gloo"  # xDiT's world and model-parallel groups
    torch.cuda.set_device(0)
    return f"{world} ranks share 1 GPU: gloo on CUDA tensors (NCCL refuses two ranks on one device)"


EXACT_DTYPES = ("float32", "bfloat16")


def _exact_rank(rank: int, world: int, runs: list[tuple[str, str]]) -> dict:
    """One rank of STADI exact mode on each (conformance case, dtype) of `runs`: the latents (on the
    CPU) and the bands, in that order."""
    import torch

    import stadi_xdit.xdit  # noqa: F401  (compat layer before xfuser)
    from stadi_xdit.families import conformance_cases
    from stadi_xdit.xdit.build import build_stadi_pipeline

    shared = _share_the_device(world)
    speeds = ",".join(("3", "5", "4")[:world])  # uneven bands
    results = []
    for case_name, dtype_name in runs:
        case = conformance_cases()[case_name]
        inputs = case.inputs()
        dtype = getattr(torch, dtype_name)
        pipe = build_stadi_pipeline(case.twin_class(), case.build().to(_device(), dtype), size=inputs["height"],
                                    steps=inputs["num_inference_steps"], model=f"tiny-{case_name}", dtype=dtype,
                                    stadi_exact=True, stadi_mode="spatial", warmup_steps=2, stadi_speeds=speeds)
        out = pipe(**inputs, output_type="latent", generator=torch.Generator().manual_seed(case.seed))
        results.append({"latents": getattr(out, case.output).float().cpu(),
                        "bands": pipe.last_result.plan.row_bounds()})
    import torch.distributed as dist

    return {"shared": shared, "backend": dist.get_backend() if dist.is_initialized() else None, "runs": results}


def check_exact(dry_run: bool) -> dict:
    import torch

    import stadi_xdit.xdit  # noqa: F401  (compat layer before xfuser)
    from stadi_xdit.families import conformance_cases
    from stadi_xdit.offline.spawn import run_distributed

    # Two ranks in one world for every run (spawns cost), and one rank alone on its device: where the
    # two share a GPU over gloo, the single rank still starts xDiT's NCCL groups and runs STADI on them.
    worlds = {2: [(c, d) for c in EXACT_CASES for d in EXACT_DTYPES], 1: [(EXACT_CASES[0], "float32")]}
    rows, notes = [], {}
    for world, runs in worlds.items():
        started = time.perf_counter()
        ranks = run_distributed(_exact_rank, world, runs, timeout=LIMITS["exact"])
        notes[f"{world} rank(s)"] = {"backend": ranks[0]["backend"], "seconds": round(time.perf_counter() - started, 2),
                                     "shared": ranks[0]["shared"]}
        for index, (case_name, dtype_name) in enumerate(runs):
            case = conformance_cases()[case_name]
            reference = getattr(case.build().to(_device(), getattr(torch, dtype_name))(
                **case.inputs(), output_type="latent", generator=torch.Generator().manual_seed(case.seed)),
                case.output).float().cpu()
            errors = [((rank["runs"][index]["latents"] - reference).norm() / reference.norm()).item()
                      for rank in ranks]
            rows.append({"ranks": world, "case": case_name, "dtype": dtype_name,
                         "bands": ranks[0]["runs"][index]["bands"], "relative_error": max(errors)})
    return {"worlds": notes, "runs": rows}


def _real_pipeline(preset_name: str, dtype):
    """The preset's pipeline with random weights, built on the device in `dtype` (a 12 B-parameter
    FLUX.1-dev in float32 would need 48 GB first)."""
    import torch

    from stadi_xdit.bench.presets import get_preset

    preset = get_preset(preset_name)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(_device()):
            pipe = preset.build_pipeline(seed=0)
    finally:
        torch.set_default_dtype(default)
    pipe.set_progress_bar_config(disable=True)
    return preset, pipe.to(_device(), dtype)


def _timed_call(pipe, kwargs: dict) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    pipe(**kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _single_call(name: str, dry_run: bool, compiled: bool = False) -> dict:
    import torch

    preset_name, height, steps, dtype_name = (DRY if dry_run else REAL)[name]
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    preset, pipe = _real_pipeline(preset_name, dtype)
    built = time.perf_counter() - started
    if compiled:
        from stadi_xdit.runtime.compile import compile_blocks

        compile_blocks(pipe.transformer)
    warmup = _timed_call(pipe, preset.call_kwargs(height, 2, 0, _device(), dtype))  # kernels, autotuning, compile
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed_call(pipe, preset.call_kwargs(height, steps, 0, _device(), dtype))
    row = {"preset": preset_name, "height": height, "steps": steps, "dtype": str(dtype).removeprefix("torch."),
           "compiled": compiled, "build_seconds": round(built, 2), "warmup_call_seconds": round(warmup, 2),
           "seconds": round(seconds, 3), "seconds_per_step": round(seconds / steps, 4)}
    if torch.cuda.is_available():
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if preset_name == "flux-dev-1024":
        row["xdit_h100_seconds"] = XDIT_FLUX_H100_SECONDS["compile" if compiled else "eager"]
    return row


def check_single(dry_run: bool) -> dict:
    return {"runs": [_single_call(name, dry_run) for name in ("flux", "pixart")]}


def check_compile(dry_run: bool) -> dict:
    return {"runs": [_single_call("compile", dry_run, compiled=True)]}


STADI_MODES = {"exact": {"stadi_exact": True, "stadi_mode": "spatial"}, "full": {"stadi_mode": "full"}}


def _stadi_rank(rank: int, world: int, dry_run: bool) -> list[dict]:
    """One rank of STADI on the FLUX.1-dev call, rank 1 slowed down 2x: exact mode, then `full`."""
    import gc

    import torch

    import stadi_xdit.xdit  # noqa: F401  (compat layer before xfuser)
    from stadi_xdit.registry import twin_for
    from stadi_xdit.xdit.build import build_stadi_pipeline

    shared = _share_the_device(world)
    preset_name, height, steps, dtype_name = (DRY if dry_run else REAL)["flux"]
    dtype = getattr(torch, dtype_name)
    results = []
    for mode, stadi in STADI_MODES.items():
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        preset, base = _real_pipeline(preset_name, dtype)  # the same seed on every rank: the same weights
        pipe = build_stadi_pipeline(twin_for(preset.xdit_wrapper), base, size=height, steps=steps,
                                    model=preset_name, dtype=dtype, warmup_steps=2, stadi_emulate_slowdown="1,2",
                                    **stadi)
        kwargs = preset.call_kwargs(height, steps, 0, _device(), dtype)
        warmup = _timed_call(pipe, kwargs)
        seconds = _timed_call(pipe, kwargs)
        result = pipe.last_result
        exchange = result.kv_exchange or {}
        value_bytes = getattr(torch, exchange.get("kv_dtype") or dtype_name).itemsize
        results.append({
            "mode": mode, "shared": shared, "warmup_call_seconds": round(warmup, 2), "seconds": round(seconds, 3),
            "plan": result.plan.explain(), "measured_speeds": result.measured_speeds,
            "store_bytes": exchange.get("store_bytes"), "predicted_store_bytes": preset.kv_bytes(height, value_bytes),
            "exchange": {k: exchange.get(k) for k in ("method", "kv_dtype", "bytes_sent_per_sync_point",
                                                     "collectives_per_sync_point", "sync_points")},
            "peak_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if torch.cuda.is_available() else None)})
        del pipe, base, result  # the next mode builds its own model: free this one's first
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def check_stadi(dry_run: bool) -> dict:
    from stadi_xdit.offline.spawn import run_distributed

    ranks = run_distributed(_stadi_rank, 2, dry_run, timeout=LIMITS["stadi"])  # one world for both modes
    runs = [{**ranks[0][index], "ranks": [{k: rank[index][k] for k in ("seconds", "store_bytes", "peak_memory_gib")}
                                          for rank in ranks]}
            for index in range(len(STADI_MODES))]
    return {"preset": (DRY if dry_run else REAL)["flux"][0], "runs": runs}


CHECK_FUNCTIONS = {"environment": check_environment, "exact": check_exact, "single": check_single,
                   "stadi": check_stadi, "compile": check_compile}


# --------------------------------------------------------------------------------------------
# the orchestration


def run_one_check(name: str, dry_run: bool, result_path: Path) -> int:
    """`--check NAME`: run it here and write {"status", "figures" | "error", "seconds"} to `result_path`."""
    started = time.perf_counter()
    try:
        outcome = {"status": "ok", "figures": CHECK_FUNCTIONS[name](dry_run)}
    except Exception as error:  # noqa: BLE001 - a failed check is a finding; the next check still runs
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc()[-4000:]}
        if isinstance(error, CheckFailed):
            outcome["figures"] = error.figures
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    result_path.write_text(json.dumps(outcome, indent=1, default=str))
    return 0 if outcome["status"] == "ok" else 1


def write_summary(out: Path, summary: dict) -> None:
    """gpu_check.json and gpu_check.md, each replaced whole (never half-written)."""
    mode = "CPU dry run (tiny shapes)" if summary["dry_run"] else "GPU"
    lines = ["# GPU check", "", f"Command: `{summary['command']}`", "",
             f"Mode: {mode}; budget {summary['budget_seconds']} s; started {summary['started']}.", ""]
    for name, outcome in summary["checks"].items():
        lines += [f"## {name}: {outcome['status']} ({outcome.get('seconds', 0)} s)", ""]
        if "error" in outcome:
            lines += [f"    {outcome['error']}", ""]
        if "figures" in outcome:
            lines += ["```json", json.dumps(outcome["figures"], indent=1, default=str), "```", ""]
    for file_name, text in (("gpu_check.json", json.dumps(summary, indent=1, default=str)),
                            ("gpu_check.md", "\n".join(lines))):
        partial = out / f".{file_name}.partial"
        partial.write_text(text)
        partial.replace(out / file_name)


def run_bounded(command: list[str], limit: float) -> tuple[int | None, str]:
    """Run a check's process in a session of its own, for at most `limit` seconds: (exit status, or None
    when it ran over, and its output). Over the limit the whole session is killed, the check's rank
    processes with it: none may keep holding the GPU's memory for the next check."""
    import signal

    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                start_new_session=True)
        try:
            status = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            status = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what the check left behind, or all of it
        except ProcessLookupError:
            pass
        proc.wait()
        output.seek(0)
        return status, output.read()


def run_all(out: Path, dry_run: bool, budget: float, only: tuple[str, ...]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    limits = DRY_LIMITS if dry_run else LIMITS
    deadline = time.monotonic() + budget
    summary = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "dry_run": dry_run,
               "budget_seconds": budget, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "checks": {}}
    log = out / "gpu_check.log"
    log.write_text("")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for name in only:
            left = deadline - time.monotonic()
            environment = summary["checks"].get("environment", {"status": "ok"})
            if left < 10 or environment["status"] != "ok":
                why = f"out of time ({budget:.0f} s budget)" if left < 10 else "the environment check did not pass"
                summary["checks"][name] = {"status": "skipped", "error": why}
                write_summary(out, summary)
                continue
            result_path = Path(scratch) / f"{name}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--check", name, "--result", str(result_path)]
            if dry_run:
                command.append("--dry-run")
            limit = min(limits[name], left)
            print(f"[gpu-check] {name} (limit {limit:.0f} s)", flush=True)
            status, output = run_bounded(command, limit)
            outcome = (json.loads(result_path.read_text()) if result_path.exists() else
                       {"status": "timeout", "error": f"over its limit of {limit:.0f} s"} if status is None else
                       {"status": "failed", "error": f"the check's process ended with status {status}"})
            with log.open("a") as handle:
                handle.write(f"===== {name}: {outcome['status']}\n{output[-6000:]}\n{outcome.get('traceback', '')}\n")
            outcome.pop("traceback", None)
            summary["checks"][name] = outcome
            failed += outcome["status"] != "ok"
            write_summary(out, summary)
            print(f"[gpu-check] {name}: {outcome['status']}" + (f": {outcome['error']}" if "error" in outcome else ""),
                  flush=True)
    print(f"[gpu-check] summary: {out / 'gpu_check.md'}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from stadi_xdit.cli_errors import OneLineArgumentParser, comma_subset

    parser = OneLineArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out",
                        help="folder of gpu_check.md, .json and .log (default $OUT, else ./gpu-check-out)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the plumbing, in under a minute")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all checks (default 450 on the GPU, 120 dry)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--check", choices=CHECKS, help=argparse.SUPPRESS)  # one check, in a process of its own
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        return run_one_check(args.check, args.dry_run, Path(args.result))
    try:
        only = tuple(comma_subset(args.only, CHECKS))
    except ValueError as error:
        parser.error(f"--only: {error}")
    from stadi_xdit.paths import output_dir_problem

    problem = output_dir_problem(args.out)
    if problem:
        parser.error(f"--out: {problem}")
    budget = args.budget if args.budget is not None else (120.0 if args.dry_run else 450.0)
    if not (math.isfinite(budget) and budget > 0):
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return run_all(Path(args.out), args.dry_run, budget, only)


if __name__ == "__main__":
    raise SystemExit(main())
