"""STADI inside xDiT: args, runtime state, pipeline base, CLI hook, and the switch that turns it on.

Importing this package (directly, or through anything that needs xfuser) applies the CPU compat
layer when CUDA is absent, then installs the CLI hook (`--use_stadi` in xDiT's parsers), both
before any xfuser module is imported here. `STADI_XDIT_NO_CLI_HOOK=1` skips the hook.
"""

from stadi_xdit.compat import bootstrap as _bootstrap

_bootstrap()

from stadi_xdit.xdit import cli_hook as _cli_hook  # noqa: F401  (registers --use_stadi in xDiT's CLI)
