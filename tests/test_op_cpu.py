"""The registered ops on CPU: results against the float64 oracle and the reference, opcheck,
dispatch registrations and schema."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FUSED_OP,
    GENERIC_OP,
    OP_APPLIES,
    TOLERANCES,
    RopeCase,
    all_cases,
    build_problem,
    case_params,
    core_cases,
    poison_cases,
    rope_f64,
    run_and_check,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import rope_compile
from rope_compile import rope_reference

OP_NAMES = [rope_compile.FUSED_OP_NAME, rope_compile.GENERIC_OP_NAME]


MAIN_APPLIES = ("fused-op", "fused-public", "generic-public")
OTHER_APPLIES = ("fused-op-full-head", "generic-op")


@pytest.mark.parametrize("apply", [OP_APPLIES[a] for a in MAIN_APPLIES], ids=MAIN_APPLIES)
@pytest.mark.parametrize("case", case_params(all_cases()))
def test_op_matrix(case, apply):
    run_and_check(case, apply)


@pytest.mark.parametrize("apply", [OP_APPLIES[a] for a in OTHER_APPLIES], ids=OTHER_APPLIES)
@pytest.mark.parametrize("case", case_params(core_cases() + poison_cases()))
def test_op_matrix_other_spellings(case, apply):
    run_and_check(case, apply)


@pytest.mark.parametrize("case", case_params([
    RopeCase(dtype=torch.bfloat16, head_size=128, rotary_dim=64, is_neox=False),
    RopeCase(dtype=torch.float16, head_size=256, rotary_dim=128, layout="padded"),
    RopeCase(dtype=torch.float32, head_size=128, rotary_dim=96, same_dtype_cache=True),
]))
def test_op_equals_reference(case):
    """Both ops, through torch.ops and the public functions, agree with rope_reference."""
    base = build_problem(case)
    expected_q = rope_reference(base.q, base.positions, base.cos_sin_cache, case.rotary_dim,
                                case.is_neox)
    expected_k = rope_reference(base.k, base.positions, base.cos_sin_cache, case.rotary_dim,
                                case.is_neox)
    for name, apply in OP_APPLIES.items():
        p = build_problem(case)
        apply(p)
        torch.testing.assert_close(p.q, expected_q, **TOLERANCES[case.dtype], msg=name)
        torch.testing.assert_close(p.k, expected_k, **TOLERANCES[case.dtype], msg=name)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_generic_op_batched_positions(is_neox):
    """rotary_embedding takes positions [B, S] and query/key [B, S, H * head_size]."""
    g = torch.Generator().manual_seed(0)
    batch, seq, hq, hk, d, rot = 2, 3, 3, 1, 80, 48
    query = torch.randn(batch, seq, hq * d, generator=g)
    key = torch.randn(batch, seq, hk * d, generator=g)
    cache = torch.rand(20, rot, generator=g) * 2 - 1
    positions = torch.randint(0, 20, (batch, seq), generator=g)
    q_exp = rope_f64(query.view(-1, hq, d), positions.flatten(), cache, rot, is_neox)
    k_exp = rope_f64(key.view(-1, hk, d), positions.flatten(), cache, rot, is_neox)
    rope_compile.rotary_embedding(positions, query, key, d, cache, is_neox)
    torch.testing.assert_close(query.view(-1, hq, d).double(), q_exp, **TOLERANCES[torch.float32])
    torch.testing.assert_close(key.view(-1, hk, d).double(), k_exp, **TOLERANCES[torch.float32])


def test_ops_return_none_and_mutate_in_place():
    p = build_problem(RopeCase())
    q_ptr, k_ptr = p.q.data_ptr(), p.k.data_ptr()
    before = p.q.clone()
    assert FUSED_OP(p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions, 128, True) is None
    assert p.q.data_ptr() == q_ptr and p.k.data_ptr() == k_ptr
    assert not torch.equal(p.q, before)


# ---------------------------------------------------------------------------------------------
# opcheck

OPCHECK_CASES = [
    RopeCase(layout="contiguous", dtype=torch.float32, num_tokens=5),
    RopeCase(layout="qkv", dtype=torch.bfloat16, head_size=128, rotary_dim=64, is_neox=False),
    RopeCase(layout="qkv", dtype=torch.float16, head_size=128, rotary_dim=96,
             same_dtype_cache=True, pos_dtype=torch.int32),
    RopeCase(layout="padded", dtype=torch.bfloat16, head_size=256, rotary_dim=128,
             same_dtype_cache=True),
    RopeCase(layout="qkv", dtype=torch.float32, pos_dtype=torch.int32, num_q_heads=1,
             num_kv_heads=1, num_tokens=1),
    RopeCase(layout="qkv", num_tokens=0),
    RopeCase(layout="contiguous", num_tokens=0, dtype=torch.float16, pos_dtype=torch.int32),
]


def _fused_args(p, full_head=False):
    q, k = (p.q, p.k) if full_head else (p.q_rot(), p.k_rot())
    return (q, k, p.cos_sin_cache, p.positions, p.rotary_dim, p.is_neox)


def _generic_args(p):
    return (p.positions, p.flat(p.q), p.flat(p.k), p.head_size, p.cos_sin_cache, p.is_neox)


def _assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert result == dict.fromkeys(result, "SUCCESS"), result
    assert set(result) >= {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"}


@pytest.mark.parametrize("case", case_params(OPCHECK_CASES))
def test_opcheck_fused(case):
    p = build_problem(case)
    _assert_opcheck(FUSED_OP.default, _fused_args(p))
    if case.rotary_dim < case.head_size:
        _assert_opcheck(FUSED_OP.default, _fused_args(build_problem(case), full_head=True))


@pytest.mark.parametrize("case", case_params(OPCHECK_CASES))
def test_opcheck_generic(case):
    _assert_opcheck(GENERIC_OP.default, _generic_args(build_problem(case)))


# ---------------------------------------------------------------------------------------------
# registrations


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("key", ["CPU", "CUDA", "XPU", "Meta"])
def test_dispatch_kernels_registered(name, key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


def test_schemas_declare_mutations():
    fused = str(FUSED_OP.default._schema)
    assert "Tensor(a0!) q" in fused and "Tensor(a1!) k" in fused
    assert "Tensor cos_sin_cache" in fused and "Tensor positions" in fused
    assert fused.endswith("-> ()")
    generic = str(GENERIC_OP.default._schema)
    assert "Tensor(a1!) query" in generic and "Tensor(a2!) key" in generic
    assert "Tensor positions" in generic and "Tensor cos_sin_cache" in generic
    assert generic.endswith("-> ()")


# ---------------------------------------------------------------------------------------------
# under torch.compile (functionalization of the mutation of two views of one buffer)


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_compiled_op_on_qkv_views(generic):
    torch._dynamo.reset()
    case = RopeCase(dtype=torch.float32, head_size=128, rotary_dim=64, is_neox=False)

    def f(qkv, cache, positions):
        q, k, v = qkv.split([4 * 128, 2 * 128, 2 * 128], -1)
        if generic:
            rope_compile.rotary_embedding(positions, q, k, 128, cache, False)
        else:
            q = q.view(-1, 4, 128)[..., :64]
            k = k.view(-1, 2, 128)[..., :64]
            rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q, k, cache, positions, 64,
                                                                  False)
        return qkv * 2

    eager = build_problem(case)
    compiled = build_problem(case)
    qkv_eager = eager.buffers[0][0]
    qkv_compiled = compiled.buffers[0][0]
    out_eager = f(qkv_eager, eager.cos_sin_cache, eager.positions)
    out_compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(
        qkv_compiled, compiled.cos_sin_cache, compiled.positions)
    torch.testing.assert_close(qkv_compiled, qkv_eager, rtol=0, atol=0)
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    assert not torch.equal(qkv_eager, build_problem(case).buffers[0][0])


# ---------------------------------------------------------------------------------------------
# random shapes


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    num_tokens=st.integers(0, 9),
    num_q_heads=st.integers(1, 5),
    num_kv_heads=st.integers(1, 3),
    half=st.integers(1, 40),
    extra=st.sampled_from([0, 0, 2, 17]),
    is_neox=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    layout=st.sampled_from(["qkv", "contiguous", "padded"]),
    apply=st.sampled_from(sorted(OP_APPLIES)),
    seed=st.integers(0, 1000),
)
def test_op_hypothesis(num_tokens, num_q_heads, num_kv_heads, half, extra, is_neox, dtype,
                       layout, apply, seed):
    case = RopeCase(num_tokens=num_tokens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                    head_size=2 * half + extra, rotary_dim=2 * half, is_neox=is_neox, dtype=dtype,
                    layout=layout)
    run_and_check(case, OP_APPLIES[apply], seed=seed)


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_compiled_op_on_aliased_inputs(generic, request):
    """q and k passed to the compiled function as two views of one buffer, sliced in the graph.

    torch 2.13's auto_functionalized_v2 regenerates ``k[..., :rot]`` from its base with
    ``try_use_slice``, which ignores the base's storage offset and yields an empty slice, so the
    fake implementation rejects the (bogus) shape at trace time."""
    if not generic and torch.__version__.startswith("2.13."):
        request.applymarker(pytest.mark.xfail(
            strict=True, raises=torch._dynamo.exc.BackendCompilerFailed,
            reason="torch bug: auto_functionalize.try_use_slice ignores base.storage_offset()"))
    torch._dynamo.reset()
    case = RopeCase(dtype=torch.float32, head_size=128, rotary_dim=64)

    def f(q, k, cache, positions):
        if generic:
            rope_compile.rotary_embedding(positions, q[:, :, :], k[:, :, :], 128, cache, True)
        else:
            rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q[..., :64], k[..., :64],
                                                                  cache, positions, 64, True)
        return q.sum() + k.sum()

    eager, compiled = build_problem(case), build_problem(case)
    out_eager = f(eager.q, eager.k, eager.cos_sin_cache, eager.positions)
    out_compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(
        compiled.q, compiled.k, compiled.cos_sin_cache, compiled.positions)
    torch.testing.assert_close(out_compiled, out_eager)
    assert torch.equal(compiled.buffers[0][0], eager.buffers[0][0])
