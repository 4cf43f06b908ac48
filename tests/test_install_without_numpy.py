"""The built wheel, installed into a fresh virtual environment that has torch but no NumPy,
compiles and runs a model with ``backend="rope_compile"`` on the CPU.

NumPy is no dependency of the install (only of the ``demo`` and ``test`` extras), so nothing a
runtime path imports may need it: Triton's interpreter does (``rope_compile.kernels.rope_cache``
once imported it unconditionally, and a CUDA install failed at its first compile).

The environment is made without system site-packages. torch is made importable there without
a download: torch's own requirement closure (and Triton, where this environment has it, as a
CUDA install has) is linked into the new environment's site-packages, dist-info included, so
pip sees torch installed; NumPy is never linked, and the test checks that it cannot be
imported there. The wheel is then installed by pip from the file alone (``--no-index``).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import build_wheel

REPO = Path(__file__).resolve().parents[1]

# Run inside the new environment, with no TRITON_INTERPRET: every module of the package is
# imported (a GPU-only module may need Triton, never NumPy), then a RoPE is compiled and run.
SCRIPT = textwrap.dedent("""
    import importlib, importlib.util, pkgutil, sys
    assert importlib.util.find_spec("numpy") is None, "numpy is importable"
    import torch
    from torch._dynamo.utils import counters
    import rope_compile
    from rope_compile.module import apply_rotary_emb
    from rope_compile.reference import compute_cos_sin_cache

    has_triton = importlib.util.find_spec("triton") is not None
    for info in pkgutil.walk_packages(rope_compile.__path__, "rope_compile."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as error:
            if has_triton or error.name != "triton":
                raise
    cache = compute_cos_sin_cache(128, 16, 10000.0, torch.float32)

    def f(qkv, positions):
        q, k, v = qkv.split([256, 256, 256], -1)
        cos, sin = cache.index_select(0, positions).chunk(2, -1)
        q = apply_rotary_emb(q.view(3, 2, 128), cos, sin, True)
        k = apply_rotary_emb(k.view(3, 2, 128), cos, sin, True)
        return (q * k).sum(-1), v * 1

    # On a CUDA machine also on the GPU: the Triton kernel, launched by Inductor.
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        torch._dynamo.reset()
        counters.clear()
        cache = cache.to(device)
        qkv, positions = torch.randn(3, 768, device=device), torch.tensor([1, 5, 2]).to(device)
        with torch.no_grad():
            out = torch.compile(f, backend="rope_compile", options={"devices": (device,)})(
                qkv, positions)
        torch.testing.assert_close(out, f(qkv, positions))
        assert counters["rope_compile"]["rewritten"] == 1, dict(counters["rope_compile"])
    assert "numpy" not in sys.modules
    from importlib.metadata import version
    assert rope_compile.__version__ == version("rope-compile"), rope_compile.__version__
    print("OK", rope_compile.__file__, "triton" if has_triton else "no triton", *devices)
""")


def _requirement_closure(names: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions ``names`` need, transitively (extras left out)."""
    found: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.split(r"[\s;<>=!~\[(]", todo.pop(), maxsplit=1)[0]
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        found[key] = dist
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return found


def _link_distributions(dists: dict[str, md.Distribution], site: Path) -> None:
    for dist in dists.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or []
                if not str(f).startswith("..")} - {"__pycache__"}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)


def _check_wheel_metadata(wheel: Path) -> None:
    """The SPDX license field with its file, the version from ``rope_compile.__version__``,
    and the PEP 561 marker."""
    import rope_compile

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers, headers
    assert "License-File: LICENSE" in headers, headers
    assert f"Version: {rope_compile.__version__}" in headers, headers
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "rope_compile/py.typed" in names


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_wheel_in_a_venv_without_numpy_compiles_on_cpu(tmp_path):
    wheels = tmp_path / "wheels"
    built = build_wheel(wheels, timeout=300)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr[-500:]}")
    wheel = next(wheels.glob("rope_compile-*.whl"))
    _check_wheel_metadata(wheel)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                .stdout.strip())
    dists = _requirement_closure(["torch", "triton"])
    assert "numpy" not in dists, "torch requires numpy: this test no longer isolates it"
    _link_distributions(dists, site)

    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index",
          wheel])
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHONHOME")}
    out = _run([python, "-c", SCRIPT], cwd=tmp_path, env=env).stdout
    assert f"OK {site}" in out, out
