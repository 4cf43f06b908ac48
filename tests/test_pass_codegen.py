"""What the ``rope_compile`` backend generates for attention blocks, and that it computes the same.

Model (pass_helpers.AttnStack): 2 layers of qkv projection -> split ->
``RotaryEmbedding.forward_native`` -> causal GQA ``scaled_dot_product_attention`` -> o projection,
T=9 tokens, 4 q heads, 2 kv heads, head size 128. Each is compiled twice, with
``backend="rope_compile"`` (pass forced on for CPU, strict) and with plain Inductor (the baseline);
the generated wrapper code is read with ``run_and_get_code``.

Also the semantics the rewrite must keep: q/k that are graph inputs are not mutated, and pre-RoPE
values still read elsewhere keep their pre-RoPE contents.
"""

from __future__ import annotations

import functools

import pytest
import torch
from pass_helpers import (
    CPU_OPTIONS,
    AttnStack,
    QKVRope,
    copy_kinds,
    count_fused_calls,
    fresh_compile,
    positions_for,
    rope_counters,
    tokens,
)
from torch._inductor.utils import run_and_get_code

from rope_compile import RotaryEmbedding

NUM_LAYERS = 2
T = 9
BF16_TOL = {"atol": 2e-2, "rtol": 1.6e-2}


def _run(model, inputs, backend: str):
    """(outputs, wrapper code, rope counters) of one fresh compile."""
    options = CPU_OPTIONS if backend == "rope_compile" else None
    with fresh_compile():
        out, codes = run_and_get_code(torch.compile(model, backend=backend, options=options),
                                      *inputs)
        counts = rope_counters()
    assert len(codes) == 1, "expected one compiled graph"
    return out, codes[0], counts


@functools.cache
def _compiled(gqa: str, dtype: torch.dtype, is_neox: bool = True, rotary_dim: int = 128):
    """Eager, baseline (plain Inductor) and rope_compile results of one AttnStack, shared."""
    model = AttnStack(num_layers=NUM_LAYERS, gqa=gqa, is_neox=is_neox, rotary_dim=rotary_dim,
                      dtype=dtype)
    inputs = (positions_for(T, 512), tokens(T, dtype=dtype))
    with torch.no_grad():
        eager = model(*inputs)
    base_out, base_code, base_counts = _run(model, inputs, "inductor")
    out, code, counts = _run(model, inputs, "rope_compile")
    assert base_counts == {}, "plain Inductor must not run the pass"
    return {"eager": eager, "base_out": base_out, "base_code": base_code, "out": out,
            "code": code, "counts": counts}


CONFIGS = [
    pytest.param("repeat", torch.float32, True, 128, id="repeat-kv-fp32-neox"),
    pytest.param("repeat", torch.float32, False, 64, id="repeat-kv-fp32-gptj-rot64"),
    pytest.param("repeat", torch.bfloat16, True, 128, id="repeat-kv-bf16-neox"),
]


@pytest.mark.parametrize(("gqa", "dtype", "is_neox", "rotary_dim"), CONFIGS)
def test_one_fused_call_per_layer(gqa, dtype, is_neox, rotary_dim):
    r = _compiled(gqa, dtype, is_neox, rotary_dim)
    assert count_fused_calls(r["code"]) == NUM_LAYERS
    assert count_fused_calls(r["base_code"]) == 0
    assert r["counts"] == {"pairs_found": NUM_LAYERS, "rewritten": NUM_LAYERS}
    # The fused op replaced the eager RoPE arithmetic (cos/sin gather): no kernel gathers rows
    # of the cache any more, while the baseline does it once per layer.
    assert "index_select" not in r["code"]
    assert "index_select" in r["base_code"]


@pytest.mark.parametrize(("gqa", "dtype", "is_neox", "rotary_dim"), CONFIGS)
def test_no_copy_introduced(gqa, dtype, is_neox, rotary_dim):
    """The op is reinplaced on the qkv projection buffer: no clone/copy kernel is added."""
    r = _compiled(gqa, dtype, is_neox, rotary_dim)
    base = copy_kinds(r["base_code"])
    assert base == {"clone": 0, "copy": 0}, base
    assert copy_kinds(r["code"]) == base


@pytest.mark.parametrize(("is_neox", "rotary_dim"), [(True, 128), (False, 128), (True, 64)],
                         ids=["neox", "gptj", "neox-rot64"])
def test_projection_outputs_keep_eager_layout(is_neox, rotary_dim):
    """q, k and v (all three read after the rotation) are returned. The op is still reinplaced
    on the projection (v is read from the op's output, no copy of the projection), and the
    rotated q and k are returned as eager returns them: fresh tensors in eager's layout, not
    strided views into the projection that share its storage with v (one copy kernel writes
    them; a layer whose q/k go on to attention has none, test_no_copy_introduced)."""
    model = QKVRope(is_neox=is_neox, rotary_dim=rotary_dim)
    inputs = (positions_for(T), tokens(T))
    with torch.no_grad():
        expected = model(*inputs)
    base_out, base_code, _ = _run(model, inputs, "inductor")
    out, code, counts = _run(model, inputs, "rope_compile")
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls(code) == 1
    assert copy_kinds(base_code) == {"clone": 0, "copy": 0}
    assert copy_kinds(code) == {"clone": 0, "copy": 0}
    for got, base, want in zip(out, base_out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(base, want, atol=1e-5, rtol=1e-5)
        assert got.stride() == want.stride() == base.stride()
    q, k, v = out
    for rotated in (q, k):
        assert rotated.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
        rotated.view(-1)  # eager allows it


# Regression: with SDPA(enable_gqa=True) v reaches SDPA as a [1, Hk, T, D] view (strides
# (256, 128, 1024, 1)); it must still be proven disjoint from q/k so that the op is reinplaced.
def test_no_copy_introduced_sdpa_enable_gqa():
    r = _compiled("sdpa", torch.float32)
    assert count_fused_calls(r["code"]) == NUM_LAYERS
    base = copy_kinds(r["base_code"])
    assert base == {"clone": 0, "copy": 0}, base
    assert copy_kinds(r["code"]) == base


def test_sdpa_enable_gqa_rewritten_and_correct():
    """Whatever the copies, the enable_gqa variant is rewritten and computes the same."""
    r = _compiled("sdpa", torch.float32)
    assert count_fused_calls(r["code"]) == NUM_LAYERS
    assert r["counts"] == {"pairs_found": NUM_LAYERS, "rewritten": NUM_LAYERS}
    torch.testing.assert_close(r["out"], r["eager"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("gqa", "dtype", "is_neox", "rotary_dim"), CONFIGS)
def test_numerics(gqa, dtype, is_neox, rotary_dim):
    r = _compiled(gqa, dtype, is_neox, rotary_dim)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(r["out"], r["eager"], **tol)
    torch.testing.assert_close(r["out"], r["base_out"], **tol)
    # Not vacuous: RoPE matters to the output (attention with unrotated q/k differs).
    assert not torch.allclose(r["eager"], _without_rope(gqa, dtype, is_neox, rotary_dim), **tol)


def _without_rope(gqa, dtype, is_neox, rotary_dim) -> torch.Tensor:
    model = AttnStack(num_layers=NUM_LAYERS, gqa=gqa, is_neox=is_neox, rotary_dim=rotary_dim,
                      dtype=dtype)
    for layer in model.layers:
        layer.rope.forward_native = lambda positions, q, k: (q, k)
    with torch.no_grad():
        return model(positions_for(T, 512), tokens(T, dtype=dtype))


# --------------------------------------------------------------------------------------------
# semantics kept by the rewrite

HQ, HK, D = 4, 2, 128


def _rope(is_neox: bool = True, rotary_dim: int = D) -> RotaryEmbedding:
    return RotaryEmbedding(D, rotary_dim, 64, 10000.0, is_neox, torch.float32)


def _inputs(*shapes, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _compile_rope(fn, *args):
    with fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(fn, backend="rope_compile", options=CPU_OPTIONS), *args)
        counts = rope_counters()
    return out, "\n".join(codes), counts


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_graph_input_q_k_not_mutated(is_neox):
    rope = _rope(is_neox)

    def fn(positions, q, k):
        return rope.forward_native(positions, q, k)

    positions = positions_for(T)
    q, k = _inputs((T, HQ * D), (T, HK * D))
    q_before, k_before = q.clone(), k.clone()
    expected = fn(positions, q, k)
    out, code, counts = _compile_rope(fn, positions, q, k)
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls(code) == 1
    assert torch.equal(q, q_before), "the caller's q was mutated"
    assert torch.equal(k, k_before), "the caller's k was mutated"
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_graph_input_qkv_views_not_mutated():
    """q and k are views (split) of one input tensor: the input keeps its values."""
    rope = _rope(True, 64)

    def fn(positions, qkv):
        q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
        q, k = rope.forward_native(positions, q, k)
        return q, k, v

    positions = positions_for(T)
    (qkv,) = _inputs((T, (HQ + 2 * HK) * D))
    qkv_before = qkv.clone()
    expected = fn(positions, qkv)
    out, code, counts = _compile_rope(fn, positions, qkv)
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls(code) == 1
    assert torch.equal(qkv, qkv_before), "the caller's qkv was mutated"
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use", ["q_times_2", "q_sum", "k_plus_v", "q_and_k_after"])
def test_pre_rope_values_used_elsewhere(use):
    """Pre-RoPE q/k still read after the rotation keep their pre-RoPE values."""
    model = QKVRope(rotary_dim=64 if use == "k_plus_v" else 128)

    def fn(positions, x):
        qkv = model.qkv(x)
        q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
        q_rot, k_rot = model.rope.forward_native(positions, q, k)
        if use == "q_times_2":
            extra = (q * 2,)
        elif use == "q_sum":
            extra = (q.sum(),)
        elif use == "k_plus_v":
            extra = (k + v,)
        else:  # computed from the rotated values and the pre-RoPE ones together
            extra = ((q_rot - q).sum(dim=-1), k_rot * k)
        return (q_rot, k_rot, v, *extra)

    positions, x = positions_for(T), tokens(T)
    with torch.no_grad():
        expected = fn(positions, x)
    out, code, counts = _compile_rope(fn, positions, x)
    assert counts == {"pairs_found": 1, "rewritten": 1}
    assert count_fused_calls(code) == 1
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
