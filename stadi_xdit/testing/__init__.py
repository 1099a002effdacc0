"""Test helpers only: comparisons and stale-mode checks (``checks``), stand-ins for process groups (``fakes``). What production code also uses
(offline pipelines, the hub cache, the multi-process harness) lives in ``stadi_xdit.offline``."""
