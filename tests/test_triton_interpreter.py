"""The Triton kernel itself, called through its launcher (and through the ops' GPU kernels).

Without a GPU this runs on CPU tensors under Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); on a GPU machine the same tests run the compiled kernel on the device.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    GPU_DEVICE,
    RopeCase,
    all_cases,
    build_problem,
    case_params,
    rope_f64,
    run_and_check,
)

pytest.importorskip("triton")

if GPU_DEVICE is None and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no GPU and TRITON_INTERPRET is not '1': the Triton kernel cannot run on CPU tensors",
        allow_module_level=True,
    )

from rope_compile import ops, set_check_positions  # noqa: E402
from rope_compile.kernels import rope_cache as tk  # noqa: E402

DEVICE = GPU_DEVICE or "cpu"


def test_kernel_runs_under_interpreter_on_cpu():
    if DEVICE == "cpu":
        # Otherwise these tests would not exercise the kernel at all.
        assert tk.is_interpreter()
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(tk.fused_qk_rope_kernel, InterpretedFunction)
    else:
        assert DEVICE in ("cuda", "xpu")


def launch(p, **overrides):
    return tk.launch_fused_qk_rope(p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions,
                                   p.rotary_dim, p.is_neox, **overrides)


def launch_full_head(p):
    """The launcher takes q/k with head_size >= rotary_dim and rotates [..., :rotary_dim]."""
    return tk.launch_fused_qk_rope(p.q, p.k, p.cos_sin_cache, p.positions, p.rotary_dim,
                                   p.is_neox)


def fused_gpu_kernel(p):
    """The fused op's CUDA/XPU kernel (validation + launcher), called on these tensors."""
    return ops._fused_qk_rope_triton(p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions,
                                     p.rotary_dim, p.is_neox)


def generic_gpu_kernel(p):
    """The generic op's CUDA/XPU kernel: [T, H * D] views through the same Triton kernel."""
    return ops._rotary_embedding_triton(p.positions, p.flat(p.q), p.flat(p.k), p.head_size,
                                        p.cos_sin_cache, p.is_neox)


def _interpreter_cases():
    """all_cases(), less most 33-token shape cases when interpreted (slow, ~1 s each)."""
    if DEVICE != "cpu":
        return all_cases()
    return [c for c in all_cases()
            if c.num_tokens != 33 or (c.num_q_heads, c.num_kv_heads) in ((1, 1), (4, 2))]


@pytest.mark.parametrize("case", case_params(_interpreter_cases()))
def test_launcher_matrix(case):
    run_and_check(case, launch, DEVICE)


@pytest.mark.parametrize("case", case_params(
    [c for c in all_cases() if c.rotary_dim < c.head_size and c.num_tokens in (1, 7)]))
def test_launcher_full_head(case):
    run_and_check(case, launch_full_head, DEVICE)


CORE_SUBSET = [
    RopeCase(is_neox=True, head_size=128, rotary_dim=64, dtype=torch.bfloat16, layout="qkv"),
    RopeCase(is_neox=False, head_size=128, rotary_dim=96, dtype=torch.float16, layout="padded",
             nan_tail=True, pos_dtype=torch.int32),
    RopeCase(is_neox=False, head_size=256, rotary_dim=256, dtype=torch.float32,
             same_dtype_cache=True, layout="contiguous"),
    RopeCase(is_neox=True, num_tokens=0),
    RopeCase(is_neox=False, num_tokens=1, num_q_heads=1, num_kv_heads=1, head_size=64,
             rotary_dim=32),
]


@pytest.mark.parametrize("kernel", [fused_gpu_kernel, generic_gpu_kernel],
                         ids=["fused", "generic"])
@pytest.mark.parametrize("case", case_params(CORE_SUBSET))
def test_op_gpu_kernels(case, kernel):
    run_and_check(case, kernel, DEVICE)


@pytest.mark.parametrize(
    ("block_h", "head_splits"),
    [(1, 1), (1, 3), (2, 2), (2, 5), (4, 1), (8, 2), (1, 7), (None, 4), (2, None)],
)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(5, 3), (4, 1), (2, 5)])
def test_launch_overrides(block_h, head_splits, is_neox, num_q_heads, num_kv_heads):
    """Head blocks smaller than the head count and several programs per token: every head of
    q and of k is rotated exactly once, whatever the split."""
    case = RopeCase(num_tokens=3, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                    head_size=128, rotary_dim=96, is_neox=is_neox, dtype=torch.float32,
                    nan_tail=True)
    run_and_check(case, lambda p: launch(p, block_h=block_h, head_splits=head_splits), DEVICE)


@pytest.mark.parametrize("num_warps", [1, 2, 8])
def test_launch_num_warps_override(num_warps):
    run_and_check(RopeCase(num_tokens=2, dtype=torch.float16),
                  lambda p: launch(p, num_warps=num_warps), DEVICE)


def test_zero_tokens_launches_nothing():
    run_and_check(RopeCase(num_tokens=0), launch, DEVICE)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(tk, "is_interpreter", lambda: False)
    p = build_problem(RopeCase())
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        launch(p)


@pytest.mark.parametrize("bad", [-1, 64, 10**6])
def test_check_positions_flag_guards_gpu_launch(bad, restore_check_positions):
    """set_check_positions(True) makes the GPU kernels raise IndexError before launching."""
    set_check_positions(True)
    for kernel in (fused_gpu_kernel, generic_gpu_kernel):
        p = build_problem(RopeCase(max_position=64), DEVICE)
        p.positions[2] = bad
        before = p.buffers[0][0].clone()
        with pytest.raises(IndexError, match=r"positions must lie in \[0, 64\)"):
            kernel(p)
        assert torch.equal(p.buffers[0][0], before)


def test_check_positions_flag_off_still_rotates(restore_check_positions):
    set_check_positions(False)
    run_and_check(RopeCase(), fused_gpu_kernel, DEVICE)


# ---------------------------------------------------------------------------------------------
# launch heuristics


@pytest.mark.parametrize("num_tokens", [1, 7, 33, 1024, 100000])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(1, 1), (4, 2), (32, 8), (64, 64)])
@pytest.mark.parametrize("rotary_dim", [2, 64, 96, 128, 512])
def test_choose_config(num_tokens, num_q_heads, num_kv_heads, rotary_dim):
    cfg = tk.choose_config(num_tokens, num_q_heads, num_kv_heads, rotary_dim)
    half_pad, block_h, splits = cfg["half_pad"], cfg["block_h"], cfg["head_splits"]
    assert half_pad >= rotary_dim // 2 and half_pad & (half_pad - 1) == 0
    assert half_pad < rotary_dim or rotary_dim == 2
    assert block_h >= 1 and block_h & (block_h - 1) == 0
    assert block_h * 2 * half_pad <= max(tk._MAX_TILE_ELEMS, 2 * half_pad)
    head_blocks = -(-max(num_q_heads, num_kv_heads) // block_h)
    assert 1 <= splits <= head_blocks
    if num_tokens >= tk._TARGET_PROGRAMS:
        assert splits == 1  # many tokens: one program per token


@pytest.mark.parametrize("device_type", ["cuda", "xpu"])
@pytest.mark.parametrize("tile_elems", [2, 64, 2048, 8192])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_device_launch_options(device_type, tile_elems, elem_bytes):
    warps = tk.device_launch_options(device_type, tile_elems, elem_bytes)["num_warps"]
    assert warps in (4, 8)
    # Two vectors per lane (the norm kernels) never take more warps, and halve a large tile's.
    two = tk.device_launch_options(device_type, tile_elems, elem_bytes, vectors_per_lane=2)
    assert two["num_warps"] in (4, 8) and two["num_warps"] <= warps
    if tile_elems * elem_bytes == 2048 * 2 and device_type == "cuda":
        assert (warps, two["num_warps"]) == (8, 4)
    # XPU: sub-groups of 16 and one vector per lane (docs/xpu.md: PVC's spill reports).
    assert two.get("threads_per_warp") == (16 if device_type == "xpu" else None)


def test_cos_sin_loaded_per_token_not_per_head():
    """Different tokens with the same position give the same rotation; tokens at different
    positions in one program split do not leak into each other."""
    case = RopeCase(num_tokens=4, num_q_heads=3, num_kv_heads=1, dtype=torch.float32)
    p = build_problem(case, DEVICE)
    p.positions.copy_(torch.tensor([5, 5, 9, 5]))
    same = p.q[0].clone()
    p.q[1].copy_(same)
    p.q[3].copy_(same)
    expected = rope_f64(p.q, p.positions, p.cos_sin_cache, case.rotary_dim, case.is_neox)
    launch(p, block_h=1, head_splits=2)
    assert torch.equal(p.q[0], p.q[1]) and torch.equal(p.q[0], p.q[3])
    torch.testing.assert_close(p.q.cpu().double(), expected, rtol=1e-5, atol=1e-5)
