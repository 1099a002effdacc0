"""STADI: heterogeneity-aware patch parallelism for diffusion transformers, as an xDiT plugin."""

import torch as _torch

__version__ = "0.1.0"

if not _torch.cuda.is_available():
    from stadi_xdit.compat import apply_cpu_compat as _apply_cpu_compat

    _apply_cpu_compat()

from stadi_xdit.xdit import cli_hook as _cli_hook  # noqa: F401  (registers --use_stadi in xDiT's CLI)
