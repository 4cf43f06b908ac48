"""Tensor parallel (issue 12 item 5): ``tests/tp_check.py`` in two processes.

CPU: gloo, the sglang-style stack, one layer (each rank compiles with the rewrite forced on).
GPU: nccl on two CUDA devices, both models (``torchrun --nproc-per-node 2 tests/tp_check.py``
is the same check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "tp_check.py"


def _run(*args: str, timeout: int) -> str:
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--spawn", *args],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"tp_check.py {' '.join(args)} took over {timeout} s on this machine")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _pass_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("tp_check rank")]


def test_tensor_parallel_gloo_cpu():
    out = _run("--device", "cpu", "--model", "sglang", "--layers", "1", timeout=240)
    lines = _pass_lines(out)
    assert len(lines) == 2 and all(": PASS " in line for line in lines), out[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tensor_parallel_nccl_cuda():
    out = _run("--device", "cuda", timeout=300)
    lines = _pass_lines(out)
    assert len(lines) == 4 and all(": PASS " in line for line in lines), out[-4000:]
