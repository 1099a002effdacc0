"""`import stadi_xdit` patches nothing; the planner, the settings, the topology, the geometry and the family
declarations need neither torch nor xfuser."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_planner_and_config_import_with_torch_and_xfuser_blocked():
    result = _run("""
        import sys
        sys.modules['torch'] = None  # any `import torch` now raises ImportError
        sys.modules['xfuser'] = None
        import stadi_xdit, stadi_xdit.planner, stadi_xdit.config, stadi_xdit.cli_errors
        import stadi_xdit.topology, stadi_xdit.geometry, stadi_xdit.families, stadi_xdit.registry
        import stadi_xdit.planner.cli
        from stadi_xdit.config import StadiConfig
        print(StadiConfig(use_stadi=True, speeds="1,0.5").speeds)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1.0, 0.5)" in result.stdout


def test_import_stadi_xdit_patches_nothing_until_enabled():
    result = _run("""
        import sys
        import stadi_xdit
        loaded = sorted(m for m in ("torch", "xfuser", "stadi_xdit.xdit", "stadi_xdit.compat") if m in sys.modules)
        assert not loaded, loaded
        stadi_xdit.enable()  # compat layer (no CUDA here) and CLI hook
        from xfuser.config import FlexibleArgumentParser, xFuserArgs
        parser = xFuserArgs.add_cli_args(FlexibleArgumentParser())
        assert "--use_stadi" in parser._option_string_actions
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_stadi_plan_starts_without_torch():
    result = _run("""
        import sys
        from stadi_xdit.planner.cli import main
        main(["--speeds", "1,0.5", "--height", "1024", "--steps", "20", "--warmup", "2"])
        assert "torch" not in sys.modules
    """)
    assert result.returncode == 0, result.stderr[-2000:]
