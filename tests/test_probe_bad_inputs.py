"""The bad-input probe of the reliability issue stays at zero: every input ends in one clean line."""

from __future__ import annotations

import sys
from pathlib import Path

from stadi_xdit.offline.modules import load_module_from_path

PROBE = Path(__file__).resolve().parent.parent / "scripts" / "probe_bad_inputs.py"


def test_every_probed_bad_input_is_one_clean_line(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "probe_bad_inputs", raising=False)  # undone after the test
    probe = load_module_from_path("probe_bad_inputs", PROBE)
    status = probe.main([])  # the in-process groups; `--faults` (real launches) is tests/test_launcher_faults.py's
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err[-3000:]
    rows = [line for line in captured.out.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    assert len(rows) >= 7 and all(row.endswith("| 0 | 0 | 0 | 0 | 0 |") for row in rows), captured.out
