"""STADI: heterogeneity-aware patch parallelism for diffusion transformers, as an xDiT plugin.

`import stadi_xdit` does nothing else: no torch, no xfuser, no patching. STADI is switched on in
xDiT explicitly, by importing `stadi_xdit.xdit` (or calling `stadi_xdit.enable()`), by
`python -m stadi_xdit.run SCRIPT`, or through our launchers; that applies the CPU compat layer
(only without CUDA) and the CLI hook that adds `--use_stadi` to xDiT's parsers. The planner
(`stadi_xdit.planner`) and the settings (`stadi_xdit.config`) never need torch or xfuser.
"""

__version__ = "0.1.0"


def enable() -> None:
    """Switch STADI on inside xDiT: CPU compat layer (without CUDA) and the `--use_stadi` CLI hook."""
    import stadi_xdit.xdit  # noqa: F401  (its import does the work, once)
