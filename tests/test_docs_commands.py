"""The docs check: every shell command of README.md and docs/*.md runs as written, or the doc says why not.

Commands are the lines of fenced ```bash blocks (a trailing backslash continues a line). A command
that cannot run here (minutes of benchmark, GPUs, real model weights, a placeholder such as `...`)
follows a line `# not run by the docs check: WHY; tests/FILE.py::TEST ...` in the doc itself, naming
the test that runs its equivalent; `test_every_documented_command_runs_or_is_marked` holds those
names to existing tests.

The others run in document order (README first), each in its own `bash -c` from the repository root,
with the venv's `bin` first on PATH as the README has it set up. `/tmp/` in a command becomes a
folder of this test's own, so that runs of the suite never share or leave files there; nothing else
in the text changes. The closing notes of issue 20 list the same commands run verbatim on a fresh clone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from stadi_xdit.offline.spawn import free_port

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = "# not run by the docs check:"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\S*)\s*$")
TEST_REF = re.compile(r"tests/(?P<file>[\w/]+\.py)(?:::(?P<name>\w+))?")


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int  # 1-based line of the command's first line
    text: str  # continuation lines joined
    skip: str | None  # the mark's text, for commands the check does not run

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def documented_commands(paths: list[Path] = DOCS) -> list[DocCommand]:
    """Every command of the ```bash blocks of `paths`, in order."""
    commands = []
    for path in paths:
        lines = path.read_text().splitlines()
        in_bash, skip, pending, start = False, None, [], 0
        for number, raw in enumerate(lines, 1):
            fence = FENCE.match(raw)
            if fence:
                in_bash = not in_bash and fence["lang"] == "bash"
                continue
            if not in_bash:
                continue
            line = raw.strip()
            if not pending:
                if not line:
                    continue
                if line.startswith("#"):
                    skip = line if line.startswith(MARK) else skip
                    continue
                start = number
            pending.append(line.removesuffix("\\").strip())
            if not line.endswith("\\"):
                commands.append(DocCommand(path.name if path.parent == REPO else f"docs/{path.name}", start,
                                           " ".join(pending), skip))
                pending, skip = [], None
    return commands


def test_every_documented_command_runs_or_is_marked():
    """Marks name an existing test; the check runs most commands; a block never ends inside a command."""
    commands = documented_commands()
    assert commands, "no ```bash blocks found"
    for command in commands:
        if command.skip is None:
            continue
        refs = list(TEST_REF.finditer(command.skip))
        assert refs, f"{command}: the mark names no test that runs its equivalent"
        for ref in refs:
            test_file = REPO / "tests" / ref["file"]
            assert test_file.is_file(), f"{command}: {test_file} does not exist"
            if ref["name"]:
                assert re.search(rf"^def {ref['name']}\(", test_file.read_text(), re.MULTILINE), \
                    f"{command}: no test {ref['name']} in {test_file.name}"
    ran = [c for c in commands if c.skip is None]
    assert len(ran) >= 10, [str(c) for c in ran]
    # The README's own set-up: `make demo`/`make test` are marked, the commands after them run.
    readme = [c for c in commands if c.doc == "README.md"]
    assert [" ".join(c.text.split()) for c in readme if c.skip][:2] == [
        "make demo # creates .venv, installs (CPU torch 2.13.0 + this package), runs a short stadi-bench demo",
        "make test # creates .venv if needed, runs the test suite (pytest, gloo multi-process tests)"]


def test_runner_dict_example_is_shown_in_full():
    """docs/deployment.md shows scripts/runner_dict_example.py below its docstring, line for line."""
    doc = (REPO / "docs" / "deployment.md").read_text()
    block = re.search(r"^   ```python\n(?P<body>.*?)^   ```$", doc, re.MULTILINE | re.DOTALL)["body"]
    shown = "\n".join(line.removeprefix("   ") for line in block.splitlines())
    script = (REPO / "scripts" / "runner_dict_example.py").read_text()
    assert script.split('"""', 2)[2].strip() == shown.strip()


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's finished children: what the suite's commands cost."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _venv_path() -> str:
    """PATH with the running interpreter's venv `bin` first: `. .venv/bin/activate`, as the README says."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@pytest.mark.cpu_only("the documented commands are the CPU ones")
def test_documented_commands_run(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HF_HOME", "HF_HUB_OFFLINE")}
    env.update(PATH=_venv_path(), HF_HUB_DISABLE_PROGRESS_BARS="1")
    seen, failures, report = set(), [], []
    for command in documented_commands():
        key = " ".join(command.text.split())  # README and deployment.md show some commands alike
        if command.skip is not None or key in seen:
            continue
        seen.add(key)
        started, cpu = time.monotonic(), _children_cpu_seconds()
        # The commands name no --master_port: torchrun takes a free one from its PET_ variable (instead of
        # 29500, which a concurrent job may hold); stadi-xdit would refuse a busy 29500 in one line.
        env["PET_MASTER_PORT"] = str(free_port())
        # Past --stadi_timeout's default (600 s): a stalled launch ends with the supervisor's line naming the rank.
        proc = subprocess.run(["bash", "-c", command.text.replace("/tmp/", f"{tmp_path}/")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=660, check=False)
        report.append(f"{time.monotonic() - started:6.1f} s  {_children_cpu_seconds() - cpu:6.1f} CPU-s  "
                      f"exit {proc.returncode}  {command}")
        if proc.returncode != 0:
            failures.append(f"{command}\n  exit {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-2500:]}")
    print("\n".join(["[docs] documented commands:", *report]))
    assert not failures, "\n\n".join(failures)
