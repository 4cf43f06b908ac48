"""RotaryEmbedding: which op each forward takes, and that they all compute the same RoPE."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, make_qkv, rope_f64

import rope_compile
from rope_compile import FUSED_HEAD_SIZES, RotaryEmbedding, compute_cos_sin_cache
from rope_compile import module as module_mod

MAX_POSITION = 64

# forward_native rounds every intermediate to the query's dtype; the fused paths round once.
NATIVE_TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 5e-3, "atol": 5e-3},
    torch.bfloat16: {"rtol": 3e-2, "atol": 6e-2},
}


class Spy:
    """Calls through to ``fn`` and records the calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
    fused = Spy(module_mod.fused_qk_rope_with_cos_sin_cache_inplace)
    generic = Spy(module_mod.rotary_embedding)
    monkeypatch.setattr(module_mod, "fused_qk_rope_with_cos_sin_cache_inplace", fused)
    monkeypatch.setattr(module_mod, "rotary_embedding", generic)
    return fused, generic


def make_module(head_size, rotary_dim, is_neox=True, dtype=torch.bfloat16, base=10000.0):
    return RotaryEmbedding(head_size, rotary_dim, MAX_POSITION, base, is_neox, dtype)


def make_inputs(num_tokens, hq, hk, head_size, dtype, seed=0, pos_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    q, k, v, qkv = make_qkv(num_tokens, hq, hk, head_size, dtype, generator=g)
    query = qkv[:, : hq * head_size]  # [T, Hq * D] views, as sglang passes them
    key = qkv[:, hq * head_size : (hq + hk) * head_size]
    positions = torch.randint(0, MAX_POSITION // 2, (num_tokens,), generator=g).to(pos_dtype)
    return query, key, v, qkv, positions


def expected_rope(m, query, key, positions, cache):
    t = positions.numel()
    q = rope_f64(query.reshape(t, -1, m.head_size), positions.flatten(), cache, m.rotary_dim,
                 m.is_neox_style)
    k = rope_f64(key.reshape(t, -1, m.head_size), positions.flatten(), cache, m.rotary_dim,
                 m.is_neox_style)
    return q.reshape(query.shape), k.reshape(key.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cache_buffer_is_fp32_at_construction(dtype):
    m = make_module(128, 64, dtype=dtype)
    assert m.cos_sin_cache.dtype == torch.float32
    assert m.cos_sin_cache.shape == (MAX_POSITION, 64)
    torch.testing.assert_close(m.cos_sin_cache, compute_cos_sin_cache(64, MAX_POSITION),
                               rtol=0, atol=0)
    assert "cos_sin_cache" in dict(m.named_buffers())
    assert "cos_sin_cache" not in m.state_dict()  # non-persistent, as sglang


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("head_size", "rotary_dim", "fused"),
    [(128, 128, True), (128, 64, True), (256, 128, True), (256, 256, True), (512, 256, True),
     (64, 64, False), (80, 80, False), (96, 48, False), (120, 120, False), (192, 64, False)],
)
def test_forward_xpu_chooses_op_and_matches(spies, head_size, rotary_dim, fused, dtype, is_neox):
    fused_spy, generic_spy = spies
    assert (head_size in FUSED_HEAD_SIZES) == fused
    m = make_module(head_size, rotary_dim, is_neox, dtype)
    query, key, v, qkv, positions = make_inputs(7, 4, 2, head_size, dtype)
    before = qkv.clone()
    native_q, native_k = m.forward_native(positions, query.clone(), key.clone())
    cache_f32 = m.cos_sin_cache

    out_q, out_k = m.forward_xpu(positions, query, key)

    assert len(fused_spy.calls) == int(fused)
    assert len(generic_spy.calls) == int(not fused)
    if fused:
        q_arg, k_arg = fused_spy.calls[0][:2]
        assert q_arg.shape == (7, 4, rotary_dim) and k_arg.shape == (7, 2, rotary_dim)
        assert q_arg.data_ptr() == query.data_ptr() and k_arg.data_ptr() == key.data_ptr()
    # In place: the very tensors passed in come back, rotated.
    assert out_q is query and out_k is key
    # Eager forward_xpu converts its cache buffer to the query dtype (as sglang does).
    assert m.cos_sin_cache.dtype == dtype
    cache = cache_f32.to(dtype)
    exp_q, exp_k = expected_rope(m, before[:, : 4 * head_size], before[:, 4 * head_size :
                                 6 * head_size], positions, cache)
    torch.testing.assert_close(query.double(), exp_q, **TOLERANCES[dtype])
    torch.testing.assert_close(key.double(), exp_k, **TOLERANCES[dtype])
    assert torch.equal(v, before[:, 6 * head_size :].view_as(v))  # v untouched
    # The unrotated tail is bit-identical.
    tail = lambda x, h: x.reshape(7, h, head_size)[..., rotary_dim:]
    assert torch.equal(tail(query, 4), tail(before[:, : 4 * head_size], 4))
    assert torch.equal(tail(key, 2), tail(before[:, 4 * head_size : 6 * head_size], 2))
    # And forward_native computes the same RoPE.
    torch.testing.assert_close(query, native_q, **NATIVE_TOLERANCES[dtype])
    torch.testing.assert_close(key, native_k, **NATIVE_TOLERANCES[dtype])


@pytest.mark.parametrize("head_size", [128, 64])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_forward_xpu_honours_offsets(head_size, is_neox):
    dtype = torch.float32
    m = make_module(head_size, head_size // 2, is_neox, dtype)
    query, key, _, _, positions = make_inputs(9, 2, 1, head_size, dtype, seed=1)
    offsets = torch.arange(9) % 4 + 3
    exp_q, exp_k = expected_rope(m, query, key, positions + offsets, m.cos_sin_cache)
    native_q, native_k = m.forward_native(positions, query.clone(), key.clone(), offsets)
    no_offsets_q, _ = m.forward_native(positions, query.clone(), key.clone())
    m.forward_xpu(positions, query, key, offsets)
    torch.testing.assert_close(query.double(), exp_q, **TOLERANCES[dtype])
    torch.testing.assert_close(key.double(), exp_k, **TOLERANCES[dtype])
    torch.testing.assert_close(native_q.double(), exp_q, **TOLERANCES[dtype])
    torch.testing.assert_close(native_k.double(), exp_k, **TOLERANCES[dtype])
    assert not torch.allclose(query, no_offsets_q)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("head_size", [256, 96])
def test_forward_cuda_equals_forward_xpu(head_size, pos_dtype):
    assert RotaryEmbedding.forward_cuda is RotaryEmbedding.forward_xpu
    dtype = torch.float16
    m1 = make_module(head_size, head_size, False, dtype)
    m2 = make_module(head_size, head_size, False, dtype)
    query, key, _, _, positions = make_inputs(5, 3, 1, head_size, dtype, 2, pos_dtype)
    q2, k2 = query.clone(), key.clone()
    native_q, native_k = m1.forward_native(positions, query.clone(), key.clone())
    m1.forward_xpu(positions, query, key)
    m2.forward_cuda(positions, q2, k2)
    assert torch.equal(q2, query) and torch.equal(k2, key)
    torch.testing.assert_close(q2, native_q, **NATIVE_TOLERANCES[dtype])
    torch.testing.assert_close(k2, native_k, **NATIVE_TOLERANCES[dtype])


def test_forward_xpu_accepts_token_head_layout(spies):
    """query/key given as [T, H, head_size] (3-D) work too."""
    fused_spy, _ = spies
    m = make_module(128, 64, True, torch.float32)
    query, key, _, _, positions = make_inputs(4, 2, 2, 128, torch.float32, seed=3)
    q3, k3 = query.view(4, 2, 128), key.view(4, 2, 128)
    exp_q, exp_k = expected_rope(m, q3, k3, positions, m.cos_sin_cache)
    m.forward_xpu(positions, q3, k3)
    assert len(fused_spy.calls) == 1
    torch.testing.assert_close(q3.double(), exp_q, **TOLERANCES[torch.float32])
    torch.testing.assert_close(k3.double(), exp_k, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("head_size", [128, 64])
def test_forward_on_cpu_uses_native(spies, head_size):
    fused_spy, generic_spy = spies
    m = make_module(head_size, head_size, True, torch.bfloat16)
    native = Spy(m.forward_native)
    xpu = Spy(m.forward_xpu)
    m.forward_native = native
    m.forward_xpu = xpu
    query, key, _, _, positions = make_inputs(3, 2, 1, head_size, torch.bfloat16)
    q_before, k_before = query.clone(), key.clone()
    out_q, out_k = m(positions, query, key)
    assert len(native.calls) == 1 and not xpu.calls
    assert not fused_spy.calls and not generic_spy.calls
    # forward_native is out of place: the inputs are left as they were, the outputs rotated.
    assert torch.equal(query, q_before) and torch.equal(key, k_before)
    exp_q, exp_k = expected_rope(m, q_before, k_before, positions, m.cos_sin_cache)
    torch.testing.assert_close(out_q.double(), exp_q, **NATIVE_TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(out_k.double(), exp_k, **NATIVE_TOLERANCES[torch.bfloat16])
    assert m.cos_sin_cache.dtype == torch.float32


@pytest.mark.parametrize("method", ["forward_xpu", "forward_cuda", "forward"])
def test_bad_fused_set_kv_buffer_arg_raises(method):
    """Not a FusedSetKVBufferArg: a clear TypeError before anything is written."""
    m = make_module(128, 128)
    query, key, _, _, positions = make_inputs(2, 1, 1, 128, torch.bfloat16)
    before = query.clone()
    with pytest.raises(TypeError, match="FusedSetKVBufferArg"):
        getattr(m, method)(positions, query, key, None, object())
    assert torch.equal(query, before)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("head_size", [128, 64])
def test_compiled_forward_xpu_leaves_buffer_fp32(backend, head_size):
    torch._dynamo.reset()
    dtype = torch.bfloat16
    m = make_module(head_size, head_size // 2, True, dtype)
    reference = make_module(head_size, head_size // 2, True, dtype)
    query, key, _, _, positions = make_inputs(6, 2, 1, head_size, dtype, seed=4)
    q_eager, k_eager = query.clone(), key.clone()

    def f(positions, query, key):
        return m.forward_xpu(positions, query, key)

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    out_q, out_k = compiled(positions, query, key)
    assert m.cos_sin_cache.dtype == torch.float32
    compiled(positions, query.clone(), key.clone())  # and again, from the compiled code
    assert m.cos_sin_cache.dtype == torch.float32
    reference.forward_xpu(positions, q_eager, k_eager)
    # The same cos/sin values (the fp32 cache cast to bf16) as eager: the same result.
    torch.testing.assert_close(out_q, q_eager, rtol=0, atol=0)
    torch.testing.assert_close(out_k, k_eager, rtol=0, atol=0)
    torch.testing.assert_close(query, q_eager, rtol=0, atol=0)  # still in place


def test_apply_rotary_emb_matches_oracle():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 32, generator=g, dtype=torch.float64)
    cache = torch.rand(10, 32, generator=g, dtype=torch.float64)
    positions = torch.tensor([1, 9, 0, 4, 4])
    cos, sin = cache[positions].chunk(2, dim=-1)
    for is_neox in (True, False):
        torch.testing.assert_close(rope_compile.apply_rotary_emb(x, cos, sin, is_neox),
                                   rope_f64(x, positions, cache, 32, is_neox),
                                   rtol=1e-12, atol=1e-12)
