"""Tiny random-weight pipelines in the Hugging Face hub cache layout, under xDiT runner repo ids.

xfuser 0.7.0's model runner (``python -m xfuser.runner --model FLUX.1-dev``, behind the ``xdit``
console script) loads each model by its real hub id through ``from_pretrained``. With
``HF_HOME=DIR HF_HUB_OFFLINE=1`` that id resolves to ``DIR/hub/models--ORG--NAME/snapshots/REV``
(``refs/main`` names REV), so writing tiny pipelines there lets the runner's own loading code run
offline, on CPU, in seconds::

    python -m stadi_xdit.offline.hub_cache --out DIR --models FLUX.1-dev,SD3.5,Qwen-Image,Wan2.1-T2V

The runner models, their hub repos and their tiny recipes are the families' declarations
(``FamilySpec.hub_models``, ``stadi_xdit/families/``): each recipe builds every component its runner
model loads (Flux's CLIP + T5, SD3.5's two CLIPs + T5, Qwen-Image's Qwen2.5-VL, Wan2.1-T2V's UMT5,
video VAE and UniPC scheduler).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from stadi_xdit.cli_errors import OneLineArgumentParser, comma_subset
from stadi_xdit.families import hub_models
from stadi_xdit.paths import output_dir_problem

__all__ = ["HUB_MODELS", "hub_snapshot_dir", "main", "write_hub_cache"]

# runner model name -> the hub repo its ModelSettings(model_name=...) loads, from every family's declaration
HUB_MODELS: dict[str, str] = {name: hub.repo_id for name, hub in hub_models().items()}


def _revision(repo_id: str) -> str:
    """A stable fake commit hash (40 hex digits), the form the hub cache uses for snapshots."""
    return hashlib.sha1(f"stadi-xdit-tiny:{repo_id}".encode()).hexdigest()


def hub_snapshot_dir(out: Path, repo_id: str) -> Path:
    """Where ``write_hub_cache`` puts ``repo_id`` under ``out`` (used as HF_HOME)."""
    org, name = repo_id.split("/")
    return Path(out) / "hub" / f"models--{org}--{name}" / "snapshots" / _revision(repo_id)


def write_hub_cache(out: Path, models: Sequence[str]) -> dict[str, Path]:
    """Save a tiny pipeline for each runner model name in ``models`` into the hub cache under ``out``.

    Use ``out`` as ``HF_HOME`` (with ``HF_HUB_OFFLINE=1``). Returns name -> snapshot directory.
    An existing snapshot of the same repo is replaced.
    """
    known = hub_models()
    unknown = [name for name in models if name not in known]
    if unknown:
        raise ValueError(f"unknown runner model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    written: dict[str, Path] = {}
    for name in dict.fromkeys(models):
        hub = known[name]
        snapshot = hub_snapshot_dir(Path(out), hub.repo_id)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        hub.build().save_pretrained(snapshot)
        refs = snapshot.parent.parent / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text(snapshot.name)  # no newline: the hub reads it verbatim
        written[name] = snapshot
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="python -m stadi_xdit.offline.hub_cache",
        description="Write tiny random-weight pipelines as an offline Hugging Face hub cache (use DIR as HF_HOME).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to use as HF_HOME")
    known = hub_models()
    parser.add_argument("--models", default=",".join(known),
                        help=f"comma-separated runner model names (default: all of {', '.join(known)})")
    args = parser.parse_args(argv)
    try:
        models = comma_subset(args.models, known)
    except ValueError as error:
        parser.error(f"argument --models: {error}")
    problem = output_dir_problem(args.out)
    if problem:
        parser.error(f"argument --out: {problem}")
    for name, path in write_hub_cache(args.out, models).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
