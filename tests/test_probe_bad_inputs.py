"""The bad-input probe of the reliability issue stays at zero: every input ends in one clean line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parent.parent / "scripts" / "probe_bad_inputs.py"


def test_every_probed_bad_input_is_one_clean_line(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("probe_bad_inputs", PROBE)
    probe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, probe)
    spec.loader.exec_module(probe)
    status = probe.main()
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err[-3000:]
    assert "| 0 | 0 | 0 |" in captured.out
