"""The GPU check (issue 37): its CPU dry run passes every check here, so the script cannot rot between
leases of a GPU machine; what it carries there is what this checkout is tested with; bad arguments get
one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from stadi_xdit.offline.processes import reap_leftovers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # the venv's python
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **(env or {})}, check=False)


@pytest.mark.cpu_only("the dry run is the CPU form of the check")
def test_the_dry_run_passes_every_check_and_writes_its_summary(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path), "--budget", "300")
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = summary["checks"]
    assert proc.returncode == 0, (proc.stdout[-2000:], (tmp_path / "gpu_check.log").read_text()[-4000:])
    assert list(checks) == ["environment", "exact", "single", "stadi", "compile"]
    assert all(check["status"] == "ok" for check in checks.values()), checks
    assert summary["dry_run"] and checks["environment"]["figures"]["device"] == "cpu"
    exact = checks["exact"]["figures"]["runs"]
    assert [(run["ranks"], run["case"], run["dtype"]) for run in exact] == [
        *((2, case, dtype) for case in ("StadiFluxPipeline", "StadiWanPipeline") for dtype in ("float32", "bfloat16")),
        (1, "StadiFluxPipeline", "float32")]
    assert {world["backend"] for world in checks["exact"]["figures"]["worlds"].values()} == {"gloo"}  # CPU
    for run in exact:  # the conformance suite's bound in float32; bfloat16 rounds at every layer
        assert run["relative_error"] <= (1e-4 if run["dtype"] == "float32" else 2e-2), run
    single = checks["single"]["figures"]["runs"]
    assert [run["preset"] for run in single] == ["flux-small", "tiny"] and all(run["seconds"] > 0 for run in single)
    stadi = checks["stadi"]["figures"]["runs"]
    assert [run["mode"] for run in stadi] == ["exact", "full"]
    full = stadi[1]
    assert "mode=full" in full["plan"] and len(full["measured_speeds"]) == 2 and full["store_bytes"] > 0
    assert checks["compile"]["figures"]["runs"][0]["compiled"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}: ok" in markdown for name in checks)


@pytest.mark.cpu_only("the dry run is the CPU form of the check")
def test_a_check_over_its_limit_ends_with_its_ranks_and_the_rest_still_report(tmp_path):
    """A 2-rank check whose rank 1 hangs in its first warmup step (the heartbeat's fault hook): it is cut
    off at its limit as a timeout, none of its rank processes is left behind (they would hold the GPU's
    memory), and the summary says so for it and for the check the budget then has no time for."""
    tag = f"gpu-check-{os.getpid()}-{tmp_path.name}"
    proc = _run("--dry-run", "--only", "exact,single", "--budget", "12", "--out", str(tmp_path),
                env={"STADI_TEST_TAG": tag, "STADI_FAULT": "warmup step:1:sleep"})
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert checks["exact"] == {"status": "timeout", "error": "over its limit of 12 s"}, checks
    assert checks["single"] == {"status": "skipped", "error": "out of time (12 s budget)"}
    assert not reap_leftovers("STADI_TEST_TAG", tag, guard_seconds=5), "the check's processes outlived it"


def test_the_carried_wheels_are_the_versions_tested_here():
    """--fetch-wheels downloads pinned versions: those installed in this checkout's environment."""
    pins = re.search(r"^PACKAGES=\((?P<pins>[^)]*)\)", SCRIPT.read_text(), re.MULTILINE)["pins"].split()
    assert {pin.split("==")[0] for pin in pins} >= {"xfuser", "diffusers", "yunchang", "distvae"}
    for pin in pins:
        name, pinned = pin.split("==")
        assert version(name) == pinned, f"{name}: carried {pinned}, tested with {version(name)}"


@pytest.mark.parametrize("args,env,needle", [
    (["--dry-run", "--only", "environment,nope"], {}, "--only: unknown nope; known: environment, exact"),
    (["--dry-run", "--budget", "-5"], {}, "--budget must be a positive number of seconds"),
    (["--dry-run", "--budget", "nan"], {}, "--budget must be a positive number of seconds"),
    ([], {"STADI_GPU_WHEELS": "/nonexistent/wheels"}, "no /nonexistent/wheels folder"),
    (["--dry-run", "--out", "/dev/null"], {}, "--out: '/dev/null' exists and is not a folder"),
])
def test_bad_arguments_are_one_line(args, env, needle, tmp_path):
    proc = _run(*args, *([] if "--out" in args else ["--out", str(tmp_path)]), env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and needle in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "gpu_check.json").exists()  # nothing ran
