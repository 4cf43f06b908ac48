"""The ops on a GPU (CUDA, or XPU): the op dispatches to the compiled Triton kernel.

Every test is marked ``gpu`` and skipped cleanly without a device (see conftest).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    OP_APPLIES,
    TOLERANCES,
    RopeCase,
    all_cases,
    build_problem,
    case_params,
    rope_f64,
    run_and_check,
)

import rope_compile
from rope_compile import RotaryEmbedding
from rope_compile import module as module_mod

pytestmark = pytest.mark.gpu

GPU_APPLIES = {name: OP_APPLIES[name] for name in ("fused-op", "fused-public", "generic-public",
                                                   "fused-op-full-head")}


def test_gpu_runs_compiled_kernel(gpu_device):
    from rope_compile.kernels import rope_cache

    assert not rope_cache.is_interpreter()


@pytest.mark.parametrize("apply", list(GPU_APPLIES.values()), ids=list(GPU_APPLIES))
@pytest.mark.parametrize("case", case_params(all_cases()))
def test_gpu_op_matrix(gpu_device, case, apply):
    run_and_check(case, apply, gpu_device)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [128, 64])
@pytest.mark.parametrize("num_tokens", [1, 3, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_shapes(gpu_device, num_tokens, rotary_dim, is_neox, dtype):
    """32 q heads, 8 kv heads, head 128; one token (several programs per token) up to 4097."""
    case = RopeCase(num_tokens=num_tokens, num_q_heads=32, num_kv_heads=8, head_size=128,
                    rotary_dim=rotary_dim, is_neox=is_neox, dtype=dtype, max_position=8192,
                    pos_dtype=torch.int32 if num_tokens == 4097 else torch.int64)
    run_and_check(case, OP_APPLIES["fused-op"], gpu_device)


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_gpu_large_poisoned(gpu_device, generic):
    case = RopeCase(num_tokens=4097, num_q_heads=32, num_kv_heads=8, head_size=128,
                    rotary_dim=96, is_neox=False, dtype=torch.bfloat16, max_position=8192,
                    nan_tail=True, cache_kind="poisoned", layout="padded")
    apply = OP_APPLIES["generic-public" if generic else "fused-public"]
    run_and_check(case, apply, gpu_device)


OPCHECK_CASES = [
    RopeCase(layout="contiguous", dtype=torch.float32),
    RopeCase(layout="qkv", dtype=torch.bfloat16, rotary_dim=64, is_neox=False),
    RopeCase(layout="qkv", dtype=torch.float16, rotary_dim=96, same_dtype_cache=True,
             pos_dtype=torch.int32),
    RopeCase(layout="padded", head_size=256, rotary_dim=128, same_dtype_cache=True),
    RopeCase(num_tokens=0),
]


@pytest.mark.parametrize("case", case_params(OPCHECK_CASES))
def test_gpu_opcheck(gpu_device, case):
    p = build_problem(case, gpu_device)
    fused = torch.library.opcheck(
        torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default,
        (p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions, p.rotary_dim, p.is_neox),
    )
    assert fused == dict.fromkeys(fused, "SUCCESS"), fused
    p = build_problem(case, gpu_device)
    generic = torch.library.opcheck(
        torch.ops.rope_compile.rotary_embedding.default,
        (p.positions, p.flat(p.q), p.flat(p.k), p.head_size, p.cos_sin_cache, p.is_neox),
    )
    assert generic == dict.fromkeys(generic, "SUCCESS"), generic


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_gpu_check_positions_opt_in(gpu_device, generic, restore_check_positions):
    rope_compile.set_check_positions(True)
    p = build_problem(RopeCase(max_position=64), gpu_device)
    p.positions[4] = 64
    before = p.buffers[0][0].clone()
    apply = OP_APPLIES["generic-public" if generic else "fused-public"]
    with pytest.raises(IndexError, match=r"positions must lie in \[0, 64\)"):
        apply(p)
    assert torch.equal(p.buffers[0][0], before)


@pytest.mark.parametrize("head_size", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_module_forward(gpu_device, head_size, dtype, monkeypatch):
    fused_calls, generic_calls = [], []
    fused = module_mod.fused_qk_rope_with_cos_sin_cache_inplace
    generic = module_mod.rotary_embedding
    monkeypatch.setattr(module_mod, "fused_qk_rope_with_cos_sin_cache_inplace",
                        lambda *a: fused_calls.append(a) or fused(*a))
    monkeypatch.setattr(module_mod, "rotary_embedding",
                        lambda *a: generic_calls.append(a) or generic(*a))
    m = RotaryEmbedding(head_size, head_size // 2, 256, 10000.0, True, dtype).to(gpu_device)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(9, 4 * head_size, generator=g).to(dtype).to(gpu_device)
    key = torch.randn(9, 2 * head_size, generator=g).to(dtype).to(gpu_device)
    positions = torch.randint(0, 256, (9,), generator=g).to(gpu_device)
    q0, k0 = query.clone(), key.clone()
    native_q, native_k = m.forward_native(positions, q0.clone(), k0.clone())
    out_q, out_k = m(positions, query, key)  # forward() on a GPU takes forward_xpu
    assert out_q is query and out_k is key
    assert len(fused_calls) == int(head_size == 128)
    assert len(generic_calls) == int(head_size != 128)
    cache = m.cos_sin_cache  # converted to the query dtype by the eager call
    exp_q = rope_f64(q0.view(9, 4, head_size), positions, cache, head_size // 2, True)
    torch.testing.assert_close(query.view(9, 4, head_size).cpu().double(), exp_q,
                               **TOLERANCES[dtype])
    tol = {"rtol": 3e-2, "atol": 6e-2} if dtype == torch.bfloat16 else TOLERANCES[dtype]
    torch.testing.assert_close(query, native_q, **tol)
    torch.testing.assert_close(key, native_k, **tol)


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_gpu_compiled_op(gpu_device, generic):
    """Under torch.compile (aot_eager): q and k are split from the qkv input inside the graph."""
    torch._dynamo.reset()
    case = RopeCase(dtype=torch.bfloat16, rotary_dim=64, num_q_heads=4, num_kv_heads=2)

    def f(qkv, cache, positions):
        q, k, _ = qkv.split([4 * 128, 2 * 128, 2 * 128], -1)
        if generic:
            rope_compile.rotary_embedding(positions, q, k, 128, cache, True)
        else:
            rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(
                q.view(-1, 4, 128)[..., :64], k.view(-1, 2, 128)[..., :64], cache, positions,
                64, True)
        return qkv.float().sum()

    eager, compiled = build_problem(case, gpu_device), build_problem(case, gpu_device)
    f(eager.buffers[0][0], eager.cos_sin_cache, eager.positions)
    torch.compile(f, backend="aot_eager", fullgraph=True)(
        compiled.buffers[0][0], compiled.cos_sin_cache, compiled.positions)
    assert torch.equal(compiled.buffers[0][0], eager.buffers[0][0])
    assert not torch.equal(eager.buffers[0][0], build_problem(case, gpu_device).buffers[0][0])
