"""Loading a Python file that is not importable by name (a script in scripts/, a test module) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_module_from_path(name: str, path: str | Path) -> ModuleType:
    """Execute the file at `path` as module `name` and register it in ``sys.modules`` first.

    Registering before executing matters: dataclasses and pickling look the module up by name while it
    is being defined (a script's ``@dataclass``, a spawned rank resolving a test function).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a half-executed module must not be found by the next import
        raise
    return module
