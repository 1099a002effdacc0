"""Helpers for tests and probes that run the real launcher: its ranks' heartbeats, its processes."""

from __future__ import annotations

import os
from pathlib import Path

from stadi_xdit.runtime.heartbeat import read_beats


def beats_under(tmp: str | os.PathLike) -> dict[int, dict]:
    """The heartbeats of a launch whose TMPDIR was `tmp` (the supervisor's folder is made there)."""
    beats: dict[int, dict] = {}
    for folder in Path(tmp).glob("stadi-heartbeat-*"):
        beats.update(read_beats(folder))
    return beats


def ranks_denoising(tmp: str | os.PathLike, ranks: int = 2) -> bool:
    """Every rank of the launch is in a STADI step (warmup or later)."""
    beats = beats_under(tmp)
    return len(beats) == ranks and all(" step " in beat["phase"] for beat in beats.values())


def tagged_processes(variable: str, tag: str) -> list[int]:
    """Live (not zombie) processes whose environment holds `variable=tag` exactly (tests run side by side
    under pytest-xdist: tag `exit` must not match another test's `exit-early`)."""
    entry = f"{variable}={tag}".encode()
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            tagged = entry in Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            if tagged and Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(name))
        except OSError:
            continue
    return found


def reap_leftovers(variable: str, tag: str, guard_seconds: float = 30.0) -> list[int]:
    """Wait (a hang guard, not a measurement) for every tagged process to end; SIGKILL and return
    those still alive after `guard_seconds`."""
    import signal
    import time

    deadline = time.monotonic() + guard_seconds
    while tagged_processes(variable, tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = tagged_processes(variable, tag)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left
