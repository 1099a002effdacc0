"""Relative GPU speeds for what-if planning (``stadi-plan --gpus A100x2,RTX3090x2``).

Use measured speeds when you can: DiT throughput also depends on memory bandwidth, clocks and kernels.
"""

from __future__ import annotations

import re

from .validation import MAX_RANKS

# Peak dense bf16/fp16 tensor-core TFLOPS. Source: vendor datasheets, dense, no sparsity (GeForce cards:
# fp16 with fp32 accumulate, the mode PyTorch uses). Only ratios matter to the planner.
DENSE_TENSOR_TFLOPS: dict[str, float] = {
    "H200": 989.0,  # SXM, bf16
    "H100": 989.0,  # SXM, bf16 (1979 with sparsity)
    "L40S": 362.0,  # bf16 (733 with sparsity)
    "A100": 312.0,  # bf16
    "RTX4090": 165.0,  # fp16, fp32 accumulate (330 with sparsity)
    "A10": 125.0,  # bf16
    "V100": 125.0,  # fp16
    "L4": 121.0,  # bf16
    "RTX3090": 71.0,  # fp16, fp32 accumulate
    "T4": 65.0,  # fp16
}

# The count after the last "x", read before _normalise drops "-": "A100x-1" must not become "A100X1".
_COUNT = re.compile(r"[\s_]*(?P<count>[-+]?\d+)\s*")


def parse_gpu_list(text: str) -> tuple[str, ...]:
    """``"A100x2, rtx3090"`` -> ``("A100", "A100", "RTX3090")``; one entry per rank (<= MAX_RANKS)."""
    names: list[str] = []
    for item in text.split(","):
        name, count = _name_and_count(item)
        # Check before building the list: "A100x100000000" must fail fast, not allocate 10^8 names.
        if len(names) + count > MAX_RANKS:
            raise ValueError(
                f"gpus: at most {MAX_RANKS} ranks are supported, got {text!r} (>= {len(names) + count} ranks)"
            )
        names.extend([name] * count)
    return tuple(names)


def relative_speeds(names: tuple[str, ...]) -> tuple[float, ...]:
    """Datasheet throughput of each card relative to the fastest listed (fastest = 1.0)."""
    tflops = [DENSE_TENSOR_TFLOPS[name] for name in names]
    fastest = max(tflops)
    return tuple(value / fastest for value in tflops)


def _normalise(name: str) -> str:
    return re.sub(r"[\s_-]", "", name).upper()


def _name_and_count(item: str) -> tuple[str, int]:
    # Try the whole name first: "RTX3090" must not parse as "RT" x 3090.
    if _normalise(item) in DENSE_TENSOR_TFLOPS:
        return _normalise(item), 1
    name, _, suffix = item.replace("X", "x").rpartition("x")
    match = _COUNT.fullmatch(suffix)
    if match and _normalise(name) in DENSE_TENSOR_TFLOPS:
        digits = match["count"].lstrip("0")
        if match["count"].startswith(("-", "+")) or not digits:
            raise ValueError(f"gpus: the count in {item.strip()!r} must be an integer >= 1")
        # Count the digits before int(): a 5000-digit count must not reach Python's int-parsing limit.
        if len(digits) > len(str(MAX_RANKS)) or int(digits) > MAX_RANKS:
            raise ValueError(f"gpus: at most {MAX_RANKS} ranks are supported, got {item.strip()!r}")
        return _normalise(name), int(digits)
    known = ", ".join(sorted(DENSE_TENSOR_TFLOPS))
    raise ValueError(
        f"gpus: unknown GPU {_normalise(item)!r} (known: {known}; repeat with a suffix, e.g. A100x2)"
    )
