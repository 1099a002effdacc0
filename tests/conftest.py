"""Fixtures that several test files share.

- ``cpu_only(reason)``: a marker that skips a test (or, as ``pytestmark``, a file) where CUDA is available:
  the runs through the CPU compat layer and the tiny offline hub cache.
- ``make_hub_cache``: a fresh offline Hugging Face cache with the named tiny pipelines.
- ``patched_xfuser``: a copy of the installed xfuser with patches/ diffs applied.
- ``one_error_line``: a rejected command line's single stderr line (exit status 2, no traceback).
- ``report``: a line for the test log even when output is captured (PSNR figures belong there).
- ``tiny_pixart``: the tiny PixArt reference on one plain diffusers process, and STADI runs of it on N ranks.

The test files are imported with ``--import-mode=importlib``, so they reach these through fixtures only.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

PROMPT = "a red cat"
SEED = 1


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): skip where CUDA is available (CPU compat layer runs)")


# Files whose tests start whole launches (a launcher and its ranks, tens of seconds each): they run first, so
# that under `make test`'s workers the long ones overlap each other instead of ending the run alone.
LAUNCH_FILES_FIRST = ("test_docs_commands.py", "test_xdit_runner.py", "test_runner_conformance.py",
                      "test_launcher_faults.py", "test_cli_hook.py", "test_stadi_flux.py", "test_compile.py")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LAUNCH_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: each file keeps its order
    marked = [(item, item.get_closest_marker("cpu_only")) for item in items]
    marked = [(item, marker) for item, marker in marked if marker is not None]
    if not marked:
        return
    import torch

    for item, marker in marked:
        item.add_marker(pytest.mark.skipif(torch.cuda.is_available(), reason=marker.args[0]))


@pytest.fixture(scope="session")
def make_hub_cache(tmp_path_factory):
    """``make_hub_cache(models, name)``: a new folder holding the offline hub cache of ``models``."""
    from stadi_xdit.offline.hub_cache import write_hub_cache

    def make(models, name: str = "hf_home") -> Path:
        home = tmp_path_factory.mktemp(name)
        write_hub_cache(home, list(models))
        return home

    return make


@pytest.fixture
def patched_xfuser():
    """``patched_xfuser(folder, patches)``: a copy of the installed xfuser under ``folder/xfuser`` with the
    given patch files applied (skips where no `patch` program exists); returns ``folder`` (for PYTHONPATH).
    The copy keeps xfuser's bytecode with the sources' times: only the patched modules compile again, not
    all of xfuser in every process that imports it."""
    import shutil
    import subprocess

    def make(folder: Path, patches) -> Path:
        import xfuser

        if shutil.which("patch") is None:
            pytest.skip("no `patch` program")
        shutil.copytree(Path(xfuser.__file__).parent, folder / "xfuser")
        for patch in patches:
            subprocess.run(["patch", "-p1", "-s", "-i", str(patch)], cwd=folder, check=True, timeout=60)
        return folder

    return make


@pytest.fixture
def one_error_line(capsys):
    """``one_error_line(cli, argv, prefix="")``: `cli(argv)` exits 2 with one stderr line starting with `prefix`."""

    def check(cli, argv: list[str], prefix: str = "") -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith(prefix), err
        return err.strip()

    return check


@pytest.fixture
def report(capsys):
    """Write a line into the test log even when output is captured (PSNR figures belong there)."""

    def write(line: str) -> None:
        with capsys.disabled():
            print(line)

    return write


def pixart_reference(size: int, steps: int, variant: str = "alpha"):
    """The final latent of one plain diffusers process on the tiny PixArt pipeline."""
    import torch

    import stadi_xdit.xdit  # noqa: F401  (compat layer before diffusers/xfuser meet)
    from stadi_xdit.families.pixart import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline(variant)
    return pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(SEED), use_resolution_binning=False).images


def run_pixart_stadi(rank: int, world: int, variant: str, size: int, steps: int, runs: list[dict]) -> list[dict]:
    """A rank (of `run_distributed`): one STADI pipeline per entry of `runs` (StadiArgs keywords, plus
    `group_layers` for the K/V store), each run once; what each run planned, measured and exchanged."""
    import torch

    import stadi_xdit.xdit  # noqa: F401
    from stadi_xdit.families.pixart import tiny_pixart_pipeline
    from stadi_xdit.models.pixart import StadiPixArtAlphaPipeline, StadiPixArtSigmaPipeline
    from stadi_xdit.xdit.build import build_stadi_pipeline

    cls = StadiPixArtAlphaPipeline if variant == "alpha" else StadiPixArtSigmaPipeline
    results = []
    for kwargs in runs:
        kwargs = dict(kwargs)
        group_layers = kwargs.pop("group_layers", None)
        pipe = build_stadi_pipeline(cls, tiny_pixart_pipeline(variant), size=size, steps=steps, **kwargs)
        if group_layers is not None:
            pipe.kv_store.configure(group_layers=group_layers)
        forwards = []
        handle = pipe.module.transformer.register_forward_pre_hook(lambda *_, calls=forwards: calls.append(1))
        out = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator().manual_seed(SEED), use_resolution_binning=False)
        handle.remove()
        result = pipe.last_result
        steps_run = result.timeline.steps
        results.append({"latents": out.images, "plan": result.plan, "warmup_plan": result.warmup_plan,
                        "forwards": len(forwards), "measured_speeds": result.measured_speeds,
                        "exchange": result.kv_exchange, "costs": result.costs,
                        "rows": [record.rows for record in steps_run],
                        "steps": [(s.phase, s.base_step) for s in steps_run],
                        "slowed": [(s.phase, s.base_step) for s in steps_run if s.emulated > 0]})
    return results


@pytest.fixture(scope="session")
def tiny_pixart():
    """``.reference(size, steps, variant)`` and ``.run(world, variant, size, steps, runs, timeout)``: the
    per-rank lists of `run_pixart_stadi`'s results."""
    from stadi_xdit.offline.spawn import run_distributed

    def run(world: int, variant: str, size: int, steps: int, runs: list[dict], timeout: float = 300) -> list:
        return run_distributed(run_pixart_stadi, world, variant, size, steps, runs, timeout=timeout)

    return SimpleNamespace(reference=pixart_reference, run=run)
