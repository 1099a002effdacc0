"""Tiny random-weight pipelines in the Hugging Face hub cache layout, under xDiT runner repo ids.

xfuser 0.7.0's model runner (``python -m xfuser.runner --model FLUX.1-dev``, behind the ``xdit``
console script) loads each model by its real hub id through ``from_pretrained``. With
``HF_HOME=DIR HF_HUB_OFFLINE=1`` that id resolves to ``DIR/hub/models--ORG--NAME/snapshots/REV``
(``refs/main`` names REV), so writing tiny pipelines there lets the runner's own loading code run
offline, on CPU, in seconds::

    python -m stadi_xdit.offline.hub_cache --out DIR --models FLUX.1-dev,SD3.5,Qwen-Image,Wan2.1-T2V

Every component each runner model loads is present: Flux's CLIP + T5, SD3.5's two CLIPs + T5,
Qwen-Image's Qwen2.5-VL text encoder and its tokenizer (built here; ``tiny.py`` skips it),
Wan2.1-T2V's UMT5, video VAE and UniPC scheduler.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from stadi_xdit.cli_errors import OneLineArgumentParser

__all__ = ["HUB_MODELS", "hub_snapshot_dir", "main", "write_hub_cache"]

# runner model name -> hub repo id its ModelSettings(model_name=...) loads (xfuser 0.7.0,
# xfuser/model_executor/models/runner_models/{flux,stable_diffusion,qwen}.py)
HUB_MODELS: dict[str, str] = {
    "FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
    "SD3.5": "stabilityai/stable-diffusion-3.5-large",
    "Qwen-Image": "Qwen/Qwen-Image",
    "Wan2.1-T2V": "Wan-AI/Wan2.1-T2V-14B-Diffusers",  # runner_models/wan.py
}


def _revision(repo_id: str) -> str:
    """A stable fake commit hash (40 hex digits), the form the hub cache uses for snapshots."""
    return hashlib.sha1(f"stadi-xdit-tiny:{repo_id}".encode()).hexdigest()


def hub_snapshot_dir(out: Path, repo_id: str) -> Path:
    """Where ``write_hub_cache`` puts ``repo_id`` under ``out`` (used as HF_HOME)."""
    org, name = repo_id.split("/")
    return Path(out) / "hub" / f"models--{org}--{name}" / "snapshots" / _revision(repo_id)


def _byte_level_alphabet() -> list[str]:
    """The 256 characters byte-level BPE maps bytes to (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _tiny_qwen2_5_vl(hidden_size: int):
    """A Qwen2.5-VL text encoder of width ``hidden_size`` and a byte-level BPE tokenizer with no merges."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for ch in _byte_level_alphabet():  # every byte is one token: any text encodes
        vocab[ch] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    heads, head_dim = 2, hidden_size // 2
    quarter = head_dim // 4  # mrope sections (t, h, w) cover head_dim / 2 rotary pairs
    text = {
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": 1,
        "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
        "rope_scaling": {"type": "mrope", "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden_size,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [0],
              "window_size": 56}
    # image/video token ids past the vocabulary: text-only prompts never contain them
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tokenizer),
                              image_token_id=len(tokenizer) + 1, video_token_id=len(tokenizer) + 2,
                              vision_start_token_id=len(tokenizer) + 3)
    return tokenizer, Qwen2_5_VLForConditionalGeneration(config).eval()


def _flux():
    from stadi_xdit.offline.pipelines import build_flux_pipeline

    return build_flux_pipeline("tiny")


def _sd3():
    from dataclasses import replace

    from stadi_xdit.offline.pipelines import SD3_PRESETS, build_sd3_pipeline

    # SD3.5-large has no dual-attention (attn2) blocks; the tiny preset has one, SD3.5-medium style
    return build_sd3_pipeline(replace(SD3_PRESETS["tiny"], dual_attention_layers=()))


def _qwen_image():
    from diffusers import QwenImagePipeline

    from stadi_xdit.offline.pipelines import QWEN_IMAGE_PRESETS, build_qwen_image_pipeline

    pipe = build_qwen_image_pipeline("tiny")
    tokenizer, text_encoder = _tiny_qwen2_5_vl(QWEN_IMAGE_PRESETS["tiny"].joint_attention_dim)
    return QwenImagePipeline(scheduler=pipe.scheduler, vae=pipe.vae, transformer=pipe.transformer,
                             text_encoder=text_encoder, tokenizer=tokenizer)


def _wan():
    from stadi_xdit.offline.pipelines import build_wan_pipeline

    return build_wan_pipeline("tiny")


_BUILDERS: dict[str, Callable] = {"FLUX.1-dev": _flux, "SD3.5": _sd3, "Qwen-Image": _qwen_image, "Wan2.1-T2V": _wan}


def write_hub_cache(out: Path, models: Sequence[str]) -> dict[str, Path]:
    """Save a tiny pipeline for each runner model name in ``models`` into the hub cache under ``out``.

    Use ``out`` as ``HF_HOME`` (with ``HF_HUB_OFFLINE=1``). Returns name -> snapshot directory.
    An existing snapshot of the same repo is replaced.
    """
    unknown = [name for name in models if name not in HUB_MODELS]
    if unknown:
        raise ValueError(f"unknown runner model(s) {', '.join(unknown)}; known: {', '.join(HUB_MODELS)}")
    written: dict[str, Path] = {}
    for name in dict.fromkeys(models):
        repo_id = HUB_MODELS[name]
        snapshot = hub_snapshot_dir(Path(out), repo_id)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        _BUILDERS[name]().save_pretrained(snapshot)
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
    parser.add_argument("--models", default=",".join(HUB_MODELS),
                        help=f"comma-separated runner model names (default: all of {', '.join(HUB_MODELS)})")
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in HUB_MODELS]
    if unknown or not models:
        parser.error(f"argument --models: unknown model {', '.join(unknown) or '(none given)'}; "
                     f"known: {', '.join(HUB_MODELS)}")
    for name, path in write_hub_cache(args.out, models).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
