"""``rope_compile.passes`` in a source checkout that is not installed.

Installed, setuptools maps the repository's top-level ``passes/`` folder to
``rope_compile.passes`` (``pyproject.toml``). Run from a checkout that is not installed (the
device machine, a benchmark script run from the tree), this finder does the same mapping, for
that one name only; an install's own mapping is found first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


class CheckoutPassesFinder:
    """Finds ``rope_compile.passes`` in the checkout's ``passes/`` folder (that name only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "rope_compile.passes":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)])


CHECKOUT = Path(__file__).resolve().parent.parent
if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "passes" / "__init__.py").is_file():
    finder = CheckoutPassesFinder(CHECKOUT / "passes")
    if not any(isinstance(f, CheckoutPassesFinder) for f in sys.meta_path):
        sys.meta_path.append(finder)

