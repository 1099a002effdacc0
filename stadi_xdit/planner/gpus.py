"""Relative GPU speeds for what-if planning (``stadi-plan --gpus A100x2,RTX3090x2``).

Use measured speeds when you can: DiT throughput also depends on memory bandwidth, clocks and kernels.
"""

from __future__ import annotations

import re

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

_COUNT_SUFFIX = re.compile(r"^(?P<name>.+)X(?P<count>\d+)$")


def parse_gpu_list(text: str) -> tuple[str, ...]:
    """``"A100x2, rtx3090"`` -> ``("A100", "A100", "RTX3090")``; one entry per rank."""
    names: list[str] = []
    for item in text.split(","):
        name, count = _name_and_count(_normalise(item))
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
    if item in DENSE_TENSOR_TFLOPS:
        return item, 1
    match = _COUNT_SUFFIX.match(item)
    if match and match["name"] in DENSE_TENSOR_TFLOPS and int(match["count"]) >= 1:
        return match["name"], int(match["count"])
    known = ", ".join(sorted(DENSE_TENSOR_TFLOPS))
    raise ValueError(f"gpus: unknown GPU {item!r} (known: {known}; repeat with a suffix, e.g. A100x2)")
