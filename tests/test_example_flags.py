"""The example script refuses bad STADI flags with one line naming the flag, before any process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "scripts" / "stadi_example.py"


@pytest.mark.parametrize("flags,named", [
    (["--ulysses_degree", "2"], "--ulysses_degree"),
    (["--pipefusion_parallel_degree", "2"], "--pipefusion_parallel_degree"),
    (["--stadi_speeds", "1,0.5,2"], "--stadi_speeds"),
    (["--stadi_speeds", "1,-1"], "--stadi_speeds"),
    (["--stadi_emulate_slowdown", "1,x"], "--stadi_emulate_slowdown"),
    (["--stadi_mode", "fast"], "--stadi_mode"),
    (["--stadi_max_stride", "0"], "--stadi_max_stride"),
    (["--height", "250"], "--height"),
])
def test_bad_flag_is_one_line_error(flags, named):
    # WORLD_SIZE says 2 ranks, but nothing listens on MASTER_PORT: reaching init would hang or fail slowly.
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="9")
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model", "tiny", "--use_stadi", *flags],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and named in error_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
