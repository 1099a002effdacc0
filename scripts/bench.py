"""``stadi-bench`` from a checkout: ``python scripts/bench.py [args]`` (see stadi_xdit/bench/cli.py)."""
from stadi_xdit.bench.cli import main

if __name__ == "__main__":  # ranks are spawned: they re-import this file and must not re-run it
    raise SystemExit(main())
