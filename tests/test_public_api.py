"""The public API is typed for its users' type checkers: every function ``rope_compile`` and
``rope_compile.kv_store`` export has annotations on each argument and on its return (the
package ships ``py.typed``), and ``rope_compile.__version__`` is the version pyproject.toml
builds."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import rope_compile
import rope_compile.kv_store

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.mark.parametrize("module", [rope_compile, rope_compile.kv_store],
                         ids=lambda m: m.__name__)
def test_exported_functions_are_annotated(module):
    unannotated = {}
    for name in module.__all__:
        function = getattr(module, name)
        if not inspect.isfunction(function):
            continue
        signature = inspect.signature(function)
        missing = [p for p, v in signature.parameters.items() if v.annotation is v.empty]
        if signature.return_annotation is signature.empty:
            missing.append("return")
        if missing:
            unannotated[name] = missing
    assert not unannotated, unannotated


def test_py_typed_is_shipped():
    assert (REPO / "rope_compile" / "py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["rope_compile"]


def test_version_has_one_source():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "rope_compile.__version__"}
    assert rope_compile.__version__.count(".") >= 2
