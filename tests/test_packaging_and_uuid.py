"""Packaging (no top-level ``passes`` package is installed) and the pass's cache key.

* The repository's ``passes/`` folder installs as ``rope_compile.passes``: checked in a built
  wheel, and by compiling with ``backend="rope_compile"`` from a folder that has a ``passes/``
  package of its own (the editable install CI uses, and the wheel installed into a folder).
* ``FuseQKRopePass.uuid()`` hashes every source the rewrite and its lowering depend on: every
  module of the package that the pass, the op and the lowering load is in it, and editing any
  one of them changes the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import build_wheel
from rope_compile.passes import fuse_qk_rope

REPO = Path(__file__).resolve().parents[1]

USER_SCRIPT = textwrap.dedent("""
    import passes  # the user's own package, not ours
    assert passes.MINE is True, passes.__file__
    import torch
    from torch._dynamo.utils import counters
    from rope_compile.module import apply_rotary_emb
    from rope_compile.reference import compute_cos_sin_cache

    cache = compute_cos_sin_cache(128, 16, 10000.0, torch.float32)
    def f(qkv, positions):
        q, k, v = qkv.split([256, 256, 256], -1)
        cos, sin = cache.index_select(0, positions).chunk(2, -1)
        q = apply_rotary_emb(q.view(3, 2, 128), cos, sin, True)
        k = apply_rotary_emb(k.view(3, 2, 128), cos, sin, True)
        return (q * k).sum(-1), v * 1
    qkv, positions = torch.randn(3, 768), torch.tensor([1, 5, 2])
    with torch.no_grad():
        out = torch.compile(f, backend="rope_compile", options={"devices": ("cpu",)})(
            qkv, positions)
    torch.testing.assert_close(out, f(qkv, positions))
    assert counters["rope_compile"]["rewritten"] == 1, dict(counters["rope_compile"])
    import rope_compile.passes.fuse_qk_rope as ours
    print("OURS", ours.__file__)
""")


def _user_folder(tmp_path: Path) -> Path:
    user = tmp_path / "user"
    (user / "passes").mkdir(parents=True)
    (user / "passes" / "__init__.py").write_text("MINE = True\n")
    (user / "main.py").write_text(USER_SCRIPT)
    return user


def _run_user_script(user: Path, pythonpath: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(user), *pythonpath])
    result = subprocess.run([sys.executable, "main.py"], cwd=user, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_user_passes_package_beside_the_installed_backend(tmp_path):
    """The environment's install of rope-compile (editable in CI) with a user ``passes/``."""
    out = _run_user_script(_user_folder(tmp_path), [])
    assert "OURS" in out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = build_wheel(out)
    if result.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {result.stderr[-500:]}")
    return next(out.glob("rope_compile-*.whl"))


def test_wheel_has_no_top_level_passes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "rope_compile/passes/fuse_qk_rope.py" in names
    assert "rope_compile/passes/rope_pattern.py" in names
    assert not [n for n in names if n.startswith("passes/")], names


def test_wheel_install_with_a_user_passes_package(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=600)
    assert not (site / "passes").exists()
    out = _run_user_script(_user_folder(tmp_path), [str(site)])
    assert f"OURS {site}" in out, out


# --------------------------------------------------------------------------------------------
# the cache key


def _package_modules_loaded() -> set[str]:
    """Source files of rope_compile / rope_compile.passes that are loaded once the pass, the
    ops, the lowering and the backend are imported."""
    import rope_compile.backend  # noqa: F401
    import rope_compile.inductor_lowering  # noqa: F401
    import rope_compile.kernels.rope_cache  # noqa: F401
    import rope_compile.ops  # noqa: F401

    roots = (REPO / "rope_compile", REPO / "passes")
    loaded = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and any(Path(path).resolve().is_relative_to(r) for r in roots):
            loaded.add(str(Path(path).resolve()))
    return loaded


def test_uuid_covers_every_loaded_source():
    sources = {str(Path(p).resolve()) for p in fuse_qk_rope._source_files()}
    missing = _package_modules_loaded() - sources
    assert not missing, f"the uuid does not hash {sorted(missing)}"
    for name in ("fuse_qk_rope.py", "rope_pattern.py", "fx_surgery.py", "validation.py",
                 "ops.py", "rope_cache.py", "inductor_lowering.py", "options.py"):
        assert any(Path(p).name == name for p in sources), name


def test_editing_any_source_changes_the_uuid(tmp_path, monkeypatch):
    copies = []
    for path in fuse_qk_rope._source_files():
        copy = tmp_path / f"{len(copies)}_{Path(path).name}"
        copy.write_bytes(Path(path).read_bytes())
        copies.append(copy)
    monkeypatch.setattr(fuse_qk_rope, "_source_files", lambda: [str(c) for c in copies])
    rope_pass = fuse_qk_rope.FuseQKRopePass()
    base = rope_pass.uuid()
    assert rope_pass.uuid() == base
    for copy in copies:
        original = copy.read_bytes()
        copy.write_bytes(original + b"\n# edited\n")
        assert rope_pass.uuid() != base, copy.name
        copy.write_bytes(original)
    assert rope_pass.uuid() == base
    assert fuse_qk_rope.FuseQKRopePass(head_sizes=(64,)).uuid() != base
