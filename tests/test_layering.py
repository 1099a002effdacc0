"""Layers that only point down: the package's imports, read with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stadi_xdit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """Every stadi_xdit module `path` imports, at module level or inside functions (lazy imports run
    too), relative imports resolved; imports only for type checkers do not count."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def test_the_walker_sees_lazy_relative_and_type_only_imports(tmp_path):
    source = tmp_path / "stadi_xdit" / "planner" / "demo.py"
    source.parent.mkdir(parents=True)
    source.write_text("from typing import TYPE_CHECKING\nfrom .plan_types import Plan\nif TYPE_CHECKING:\n"
                      "    from stadi_xdit.runtime import kv\n"
                      "def f():\n    import stadi_xdit.xdit.args\n    from ..bench import report\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = imports_of(source)
    finally:
        ROOT = saved
    assert {"stadi_xdit.planner.plan_types", "stadi_xdit.xdit.args", "stadi_xdit.bench.report"} <= found
    assert "stadi_xdit.runtime.kv" not in found


def test_no_import_circle_in_the_package():
    assert _cycles(_graph()) == []


def _package_of(module: str) -> str:
    """`stadi_xdit.bench.presets` -> `stadi_xdit.bench`; a top-level module is its own unit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_circle_between_subpackages():
    """Subpackages as units (families, bench, runtime, planner, xdit, ...): an import from one into another
    in both directions is a circle too, even when no two modules import each other."""
    packages: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        source = _package_of(module)
        packages.setdefault(source, set()).update(_package_of(m) for m in imported if _package_of(m) != source)
    for targets in packages.values():
        for target in targets:
            packages.setdefault(target, set())
    assert _cycles(packages) == []


def test_no_production_module_imports_the_test_helpers():
    production = [p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts]
    production += list((ROOT / "scripts").glob("*.py"))
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.startswith("stadi_xdit.testing"))
                 for p in production}
    assert {path: found for path, found in offenders.items() if found} == {}


def test_a_bands_position_has_one_holder():
    """Only `BandView` (runtime/layout.py) holds a band's token range: no module stores one of its own (an
    attribute assigned a `token_range`/`own_range`, or a tuple unpacked from `layout.token_range(...)` and kept)."""
    holders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "runtime" / "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("token_range", "own_range"):
                    holders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not holders, holders
