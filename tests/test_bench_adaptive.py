"""`stadi-bench` under load that changes during a call: scenarios, the burners' switch, the forward
hook's step schedule, the adaptive targets, and one tiny end-to-end run (no timing is asserted)."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from stadi_xdit.bench import runner as bench_runner
from stadi_xdit.bench.arms import ArmForwardHooks
from stadi_xdit.bench.cli import main
from stadi_xdit.bench.report import checks
from stadi_xdit.bench.runner import LoadShifter
from stadi_xdit.bench.scenarios import BackgroundLoad, parse_scenario
from stadi_xdit.config import StadiConfig


def test_changing_scenarios_parse():
    appears = parse_scenario("slowdown:1,1->1,2@0.5")
    assert appears.varying and appears.emulate_arg() is None
    assert appears.emulate_shift_arg(20) == "10:1,2"
    assert appears.factor_schedule(1, 20) == (1.0, 2.0, 10)
    assert appears.load_phases(2) == ((1.0, 1.0), (1.0, 0.5))
    gone = parse_scenario("slowdown:1,3->1,1@0.25")
    assert gone.emulate_arg() == "1,3" and gone.emulate_shift_arg(8) == "2:1,1"
    real = parse_scenario("shift:1=0->1@0.5")
    assert real.kind == "shift" and real.varying and real.fast_rank(2) == 0
    assert real.load_phases(2) == ((1.0, 1.0), (1.0, 0.5))
    assert parse_scenario("shift:0=2->0@0.3").fast_rank(2) == 1
    assert not parse_scenario("slowdown:1,2").varying
    assert "@" not in real.label and ">" not in real.label
    # A change always leaves at least one step on each side of it.
    assert parse_scenario("slowdown:1,1->1,2@0.99").switch_step(4) == 3


@pytest.mark.parametrize("text", [
    "shift:1=0->0@0.5", "shift:1=0->1", "shift:1=0->1@1", "shift:1=0->1@0", "shift:x=0->1@0.5",
    "shift:1=0->1.5@0.5", "shift:1=0->1@0.5,1=1->0@0.5", "slowdown:1,1->1@0.5", "slowdown:1,1->0.5,1@0.5",
    "slowdown:1,1->1,2@nan",
])
def test_changing_scenarios_reject_with_one_line(text):
    with pytest.raises(ValueError) as error:
        parse_scenario(text)
    assert "\n" not in str(error.value) and text in str(error.value)


def test_emulated_shift_setting():
    config = StadiConfig(emulate_slowdown="1,3", emulate_shift=" 4:1,1")
    assert config.emulate_shift == "4:1,1" and config.emulated_shift == (4, (1.0, 1.0))
    assert [config.emulated_factor(1, step) for step in (0, 3, 4, 9)] == [3.0, 3.0, 1.0, 1.0]
    assert StadiConfig(emulate_shift="2:1,2").emulated_factor(1, 1) == 1.0
    with pytest.raises(ValueError, match="--stadi_emulate_shift has 3 values"):
        StadiConfig(emulate_shift="2:1,2,2").check_world(2)
    for bad in ("2", "x:1,2", "2:0.5,1", "2:", "-1:1,2"):
        with pytest.raises(ValueError, match="--stadi_emulate_shift"):
            StadiConfig(emulate_shift=bad)


class _Stepper(torch.nn.Module):
    def forward(self, x, timestep=None):
        return x * 2


def test_forward_timer_counts_steps_by_timestep_and_slows_from_the_switch():
    module = _Stepper()
    timer = ArmForwardHooks(module, schedule=(1.0, 3.0, 2))
    x = torch.ones(64, 64)
    for t in (900, 900, 800, 700, 700):  # PipeFusion-like: two forwards of one step share its timestep
        module(x @ x, timestep=torch.tensor([t, t]))
    slept = [record[3] for record in timer.records]
    assert slept[:3] == [0.0, 0.0, 0.0]  # steps 0 and 1
    assert all(s > 0 for s in slept[3:])  # steps 2, 2: factor 3 sleeps 2x the compute
    timer.reset()
    module(x, timestep=torch.tensor([700]))
    assert timer.records[0][3] == 0.0  # a new call counts from step 0 again
    timer.remove()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def _wait_state(procs, wanted: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(_state(p.pid) == wanted for p in procs):
            return True
        time.sleep(0.02)
    return False


def test_shift_burners_switch_and_reset():
    scenario = parse_scenario("shift:0=0->2@0.5")
    with BackgroundLoad(scenario, [None]) as load:
        (after,) = load._after
        assert len(after) == 2 and load._before == [[]]
        assert _wait_state(after, "T"), "the 'after' burners must start paused"
        load.switch(0)
        assert _wait_state(after, "R")
        load.reset()
        assert _wait_state(after, "T")
    assert not any(p.is_alive() for p in after)


class _FakeLoad:
    def __init__(self):
        self.switched = threading.Event()
        self.resets = 0

    def switch(self, item: int) -> None:
        self.switched.set()

    def reset(self) -> None:
        self.resets += 1


def test_load_shifter_switches_during_timed_calls_only(monkeypatch):
    load = _FakeLoad()
    shifter = LoadShifter(parse_scenario("shift:1=0->1@0.5"), load)
    with shifter.during_call(None) as (on_start, switches):  # the warm-up call: the reference
        on_start(time.perf_counter())
    assert switches == [] and load.resets == 0
    # The shifter's clock, stepped by hand: armed 4 ms after the release, switched at 10.5 ms.
    readings = iter([100.004, 100.0105])
    monkeypatch.setattr(bench_runner, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    delays = []

    class RecordingTimer(threading.Timer):
        def __init__(self, interval, function):
            delays.append(interval)
            super().__init__(0.0, function)  # fires at once: the delay it was given is what is checked

    monkeypatch.setattr(bench_runner, "threading", SimpleNamespace(Timer=RecordingTimer))
    with shifter.during_call(0.02) as (on_start, switches):
        released = 100.0
        on_start(released)
        assert load.switched.wait(10)  # a hang guard: it switches during the call
    # armed for 0.5 x the 20 ms reference after the release, on the call's clock; one switch, one reset
    assert delays == [pytest.approx(released + 0.5 * 0.02 - 100.004)]
    assert switches == [100.0105] and load.resets == 1


def _summary(kind: str, varying: bool, medians: dict, before=(1.0, 1.0), after=(1.0, 0.5), replans=None) -> dict:
    arms = {name: {"median_seconds": m, "label": name, "latencies": [m], "warmup_call_seconds": m,
                   "stadi": {"replans": replans or [[]]}} for name, m in medians.items()}
    return {"kind": kind, "varying": varying, "arms": arms, "nominal_speeds_before": list(before),
            "nominal_speeds_after": list(after), "best_xdit": None, "fast_rank": 0}


def test_adaptive_targets():
    appears = checks(_summary("shift", True, {"full": 13.0, "full-sync": 10.0, "uniform": 15.0}), None)
    assert [(c["target"], c["status"]) for c in appears] == [("load appears mid-call: sync >= 1.3x off", "PASS")]
    gone = checks(_summary("slowdown", True, {"full": 11.0, "full-sync": 10.0}, (1.0, 0.5), (1.0, 1.0)), None)
    assert gone[0]["target"] == "load disappears mid-call: sync >= 1.2x off" and gone[0]["status"] == "MISS"
    quiet = checks(_summary("none", False, {"full": 10.0, "full-sync": 9.1, "full-calls": 10.5, "uniform": 10.0},
                            replans=[[], [{"offset": 4}]]), None)
    status = {c["target"]: c["status"] for c in quiet}
    assert status["steady load: sync within 2% of off"] == "PASS"
    assert status["steady load: calls within 2% of off"] == "MISS"
    assert status["none: no re-plan fires (sync)"] == "MISS"


def test_bench_tiny_with_load_changing_mid_call(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["--preset", "tiny", "--steps", "6", "--warmup", "3", "--repeats", "1", "--arms", "full,full-sync",
                 "--scenario", "slowdown:1,1->1,3@0.5", "--scenario", "shift:1=0->1@0.5", "--no-decode",
                 "--out", str(out), "--no-progress", "--run-timeout", "90"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "load appears mid-call: sync >= 1.3x off" in printed
    emulated, real = json.loads((out / "results.json").read_text())["scenarios"]
    for summary in (emulated, real):
        assert {arm["status"] for arm in summary["arms"].values()} == {"ok"}
    # Emulated: rank 1 sleeps exactly from base step 3 of 6 on (warmup steps are base steps 0..2).
    for arm in emulated["arms"].values():
        for rank, entry in enumerate(arm["runs"][0]["ranks"]):
            steps = entry["stadi"]["steps"]
            slowed = [(s["phase"], s["base_step"]) for s in steps if s["emulated"] > 0]
            expected = [("stadi", s["base_step"]) for s in steps if s["phase"] == "stadi"] if rank == 1 else []
            assert slowed == expected, (rank, slowed)
    # Real burners: switched once per timed call, after the call started.
    (switches,) = real["load_switches"][0:1]
    assert len(real["load_switches"]) == 2 and len(switches) == 1 and switches[0] > 0
    assert (out / "timeline_shift_1-0-to-1-at-0.5.png").stat().st_size > 1000


def test_a_calls_scenario_reports_every_calls_plan_and_cost_model(tmp_path, capsys):
    """--calls N: the plan, cost model and latency of every call (cold one included), and a per-call plot."""
    out = tmp_path / "bench"
    code = main(["--preset", "tiny", "--steps", "6", "--warmup", "2", "--calls", "3", "--arms", "full-calls",
                 "--scenario", "slowdown:1,4", "--no-decode", "--out", str(out), "--no-progress", "--run-timeout", "90"])
    assert code == 0
    printed = capsys.readouterr().out
    (summary,) = json.loads((out / "results.json").read_text())["scenarios"]
    calls = summary["arms"]["full-calls"]["per_call"]
    assert [c["call"] for c in calls] == ["cold", 1, 2, 3]
    for call in calls:
        assert sum(call["rows"]) == 8 and len(call["strides"]) == 2 and len(call["row_ms"]) == 2
        assert f"call {call['call']!s:>4}: {call['latency']:7.3f} s  rows {call['rows']}" in printed
    # From the second call on the plan starts from the remembered evidence of the calls before.
    assert all(c["evidence"] == ["memory", "memory"] for c in calls[1:])
    assert (out / "calls_slowdown_1_4.png").stat().st_size > 1000
