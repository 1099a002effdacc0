"""Run a function on a module right after it is first executed (a minimal post-import hook).

The compat layer must patch xfuser modules *before* other xfuser modules read from them
(``xfuser.envs`` is consumed at import time by ``from xfuser.envs import CUDA_VERSION``), and
without importing xfuser eagerly when ``stadi_xdit`` is imported.  A meta-path finder wraps
the loader of each registered module so that its hooks run right after its body executes.
Modules that are already imported are patched immediately.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

Hook = Callable[[ModuleType], None]

_HOOKS: dict[str, list[Hook]] = {}
_MARK = "__stadi_compat_hooks__"


def _key(hook: Hook) -> str:
    return f"{hook.__module__}.{hook.__qualname__}"


def _run_hooks(module: ModuleType) -> None:
    done = module.__dict__.setdefault(_MARK, set())
    for hook in _HOOKS.get(module.__name__, ()):
        if _key(hook) not in done:
            hook(module)
            done.add(_key(hook))


class _HookingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_hooks(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect/linecache
        return getattr(self._loader, name)


class _HookFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookingLoader(spec.loader)
                return spec
        return None


_FINDER = _HookFinder()


def when_imported(name: str, hook: Hook) -> None:
    """Run ``hook(module)`` once per module object, right after module ``name`` is executed.

    Hooks are identified by ``module.qualname``; registering the same one again is a no-op.
    """
    hooks = _HOOKS.setdefault(name, [])
    if all(_key(h) != _key(hook) for h in hooks):
        hooks.append(hook)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        _run_hooks(module)
