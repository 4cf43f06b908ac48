"""The package's import graph has no cycle, counting imports inside functions too (a lazy
import back is still a circle): ``ops`` and ``fast_launch`` do not import each other, layout
maths and argument checks sit below both, and the backend imports ``rope_compile.passes``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"rope_compile": REPO / "rope_compile", "rope_compile.passes": REPO / "passes"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its source (``from . import x`` resolved)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # The package __init__ re-exports; importing "rope_compile" alone is not a dependency
    # cycle of the modules, so edges into the bare package name are left out.
    return {name: _imports(name, path, known) - {"rope_compile"}
            for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_ops_and_fast_launch_do_not_import_each_other():
    graph = _graph()
    assert "rope_compile.fast_launch" in graph["rope_compile.ops"]  # the eager path
    assert "rope_compile.ops" not in graph["rope_compile.fast_launch"]  # never back


def test_a_lazy_import_back_is_seen_as_a_cycle():
    """The checker itself: a function-level import of ops in fast_launch makes a cycle."""
    real = _imports

    def with_lazy_import(name, path, known):
        found = real(name, path, known)
        return found | {"rope_compile.ops"} if name == "rope_compile.fast_launch" else found

    globals()["_imports"] = with_lazy_import
    try:
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycle()
    finally:
        globals()["_imports"] = real


def test_layout_maths_has_its_own_module():
    graph = _graph()
    assert "rope_compile.layout" in graph["rope_compile.validation"]
    assert "rope_compile.layout" in graph["rope_compile.passes.fuse_qk_rope"]
    assert "rope_compile.validation" not in graph["rope_compile.layout"]


def test_backend_imports_the_installed_passes_name():
    assert "rope_compile.passes.fuse_qk_rope" in _graph()["rope_compile.backend"]
    source = (REPO / "rope_compile" / "backend.py").read_text()
    assert "from passes" not in source and "import passes" not in source
