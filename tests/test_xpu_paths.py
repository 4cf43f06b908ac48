"""The eager path's branches on ``device_type == "xpu"``, exercised without an Intel GPU.

* ``RotaryEmbedding.forward`` sends xpu (and cuda) tensors to ``forward_xpu``, the in-place ops,
  and CPU tensors to ``forward_native``.
* The launch options: sub-groups of 16 lanes, 4 to 8 of them, on xpu (``device_launch_options``;
  the XPU lane checks them for spills on PVC).
* The fast launcher (``rope_compile/fast_launch.py``) relaunches a compiled kernel only where the
  installed Triton's ``JITFunction.run`` launches exactly as it does. Intel's Triton (triton-xpu
  3.3, the lane's) launches through ``CompiledKernel``'s hooks instead, so the fast path turns
  itself off there and every call goes through the op: checked on that Triton's own source
  where the lane has installed it, and on a stand-in source otherwise.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import rope_compile.fast_launch as fast_launch
from rope_compile import RotaryEmbedding
from rope_compile.kernels.rope_cache import device_launch_options

LANE_TRITON = Path(__file__).resolve().parent.parent / ".xpu" / "venv"


def _fake(device_type: str):
    return SimpleNamespace(device=torch.device(device_type) if device_type == "cpu"
                           else SimpleNamespace(type=device_type))


@pytest.mark.parametrize("device_type", ["xpu", "cuda"])
def test_forward_sends_gpu_tensors_to_the_inplace_ops(device_type):
    rope = RotaryEmbedding(128, 128, 64, 10000.0, True, torch.float32)
    query, key = _fake(device_type), _fake(device_type)
    with mock.patch.object(RotaryEmbedding, "forward_xpu", return_value="xpu") as xpu, \
            mock.patch.object(RotaryEmbedding, "forward_native") as native:
        assert rope.forward("positions", query, key) == "xpu"
    xpu.assert_called_once()
    native.assert_not_called()


def test_forward_keeps_cpu_tensors_native():
    rope = RotaryEmbedding(128, 128, 64, 10000.0, True, torch.float32)
    with mock.patch.object(RotaryEmbedding, "forward_xpu") as xpu, \
            mock.patch.object(RotaryEmbedding, "forward_native", return_value="native"):
        assert rope.forward("positions", _fake("cpu"), _fake("cpu")) == "native"
    xpu.assert_not_called()


@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("tile", [64, 1024, 4096, 1 << 16])
@pytest.mark.parametrize("vectors", [1, 2])
def test_xpu_launch_options(tile, elem_bytes, vectors):
    options = device_launch_options("xpu", tile, elem_bytes, vectors)
    assert options["threads_per_warp"] == 16
    assert 4 <= options["num_warps"] <= 8
    assert "threads_per_warp" not in device_launch_options("cuda", tile, elem_bytes, vectors)


def _run_source(jit_file: Path) -> str:
    """``JITFunction.run``'s source in a Triton's ``runtime/jit.py``, whitespace removed."""
    text = jit_file.read_text()
    start = text.index("    def run(self")
    end = text.index("\n    def ", start + 1)
    return "".join(text[start:end].split())


def test_intel_triton_turns_the_fast_path_off():
    found = sorted(LANE_TRITON.glob("lib/python*/site-packages/triton/runtime/jit.py"))
    if not found:
        pytest.skip("the XPU lane's Triton is not installed (bash .ci/xpu_lane.sh)")
    assert fast_launch._TRITON_LAUNCH not in _run_source(found[0])


def test_a_foreign_launcher_sends_every_call_to_the_op(monkeypatch):
    """With a ``JITFunction.run`` that launches otherwise (as Intel's does), ``_init`` leaves
    the fast path off and ``try_fused`` declines, so the op runs."""
    pytest.importorskip("triton")
    foreign = ("def run(self, *args, **kwargs):\n    kernel.run(grid_0, grid_1, grid_2, stream,"
               " kernel.function, kernel.packed_metadata, launch_metadata,"
               " self.CompiledKernel.launch_enter_hook, self.CompiledKernel.launch_exit_hook,"
               " *bound_args.values())\n")
    import rope_compile.kernels.rope_cache as rope_cache

    # As on a GPU: no interpreter. The installed Triton's own launcher turns the path on...
    monkeypatch.setattr(rope_cache, "is_interpreter", lambda: False)
    monkeypatch.setattr(fast_launch, "_enabled", None)
    if not fast_launch._init():
        pytest.skip("the installed Triton launches otherwise: the fast path is off anyway")
    # ... and a launcher like Intel's turns it off.
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj: foreign if getattr(obj, "__name__", "") == "run" else real(obj))
    monkeypatch.setattr(fast_launch, "_enabled", None)
    assert fast_launch._init() is False
    q = torch.zeros(1, 1, 128)
    assert fast_launch.try_fused(q, q.clone(), torch.zeros(4, 128), torch.zeros(1,
                                 dtype=torch.int64), 128, True) is False
    monkeypatch.setattr(fast_launch, "_enabled", None)  # the next call checks again
