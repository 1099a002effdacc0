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

# K/V exchange links, GB/s per GPU and direction, for what-ifs that are not given one (`default_link`).
# NVLink where the card has an NVLink switch fabric in its usual node (datasheets: 18 NVLink 4 links =
# 900 GB/s both ways on H100/H200, 12 NVLink 3 links = 600 GB/s on A100, 300 GB/s on V100); the others
# talk over PCIe 4.0 x16 (32 GB/s raw, about 25 GB/s achieved). Between nodes: a 100 Gb/s network.
NVLINK_GBYTES_PER_S: dict[str, float] = {"H200": 450.0, "H100": 450.0, "A100": 300.0, "V100": 150.0}
PCIE4_X16_GBYTES_PER_S = 25.0
NETWORK_GBYTES_PER_S = 100 / 8  # 100 Gb/s


def default_link(names: tuple[str, ...] | None) -> tuple[float, str]:
    """(GB/s, what it is) of the link a what-if assumes for the K/V exchange when none is given.

    One GPU type is taken as one node: its NVLink, or PCIe for cards without an NVLink fabric. Mixed
    types (A100x4,RTX3090x4) are taken as separate nodes, joined by a 100 Gb/s network, and so are
    bare relative speeds, which name no hardware.
    """
    network = (NETWORK_GBYTES_PER_S, f"a 100 Gb/s network between nodes ({NETWORK_GBYTES_PER_S:g} GB/s)")
    if not names:
        return network[0], network[1] + ": no GPUs named"
    kinds = sorted(set(names))
    if len(kinds) > 1:
        return network[0], network[1] + f": {' and '.join(kinds)} taken as separate nodes"
    gpu = kinds[0]
    if gpu in NVLINK_GBYTES_PER_S:
        return NVLINK_GBYTES_PER_S[gpu], f"NVLink inside one {gpu} node ({NVLINK_GBYTES_PER_S[gpu]:g} GB/s per direction)"
    return PCIE4_X16_GBYTES_PER_S, f"PCIe 4.0 x16 inside one {gpu} node ({PCIE4_X16_GBYTES_PER_S:g} GB/s, no NVLink fabric)"


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
