"""rope_compile.reference against independent float64 computations.

Two oracles, neither sharing code with reference.py: explicit scalar loops over pairs with
``math.cos``/``math.sin`` (here), and complex multiplication (``conftest.rope_f64``). The loops
also check the complex oracle that the kernel tests rely on.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    TOLERANCES,
    all_cases,
    case_params,
    make_qkv,
    rope_f64,
    run_and_check,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from rope_compile import compute_cos_sin_cache, rope_reference
from rope_compile.reference import rope_reference_


def angle(position: int, pair: int, rotary_dim: int, base: float) -> float:
    return position * base ** (-2.0 * pair / rotary_dim)


def rope_loops(x, positions, cos_sin_cache, rotary_dim, is_neox) -> torch.Tensor:
    """Scalar float64 RoPE: for each token, head and pair, rotate (a, b) by the cache's angle."""
    out = x.detach().to(torch.float64).clone()
    half = rotary_dim // 2
    for t in range(x.shape[0]):
        p = int(positions[t])
        for h in range(x.shape[1]):
            for i in range(half):
                c = float(cos_sin_cache[p, i])
                s = float(cos_sin_cache[p, half + i])
                ia, ib = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
                a, b = float(x[t, h, ia]), float(x[t, h, ib])
                out[t, h, ia] = a * c - b * s
                out[t, h, ib] = b * c + a * s
    return out


@pytest.mark.parametrize("rotary_dim", [2, 8, 96, 128])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_cos_sin_cache_matches_math(rotary_dim, base):
    max_position = 33
    cache64 = compute_cos_sin_cache(rotary_dim, max_position, base, torch.float64)
    assert cache64.shape == (max_position, rotary_dim)
    half = rotary_dim // 2
    for p in range(max_position):
        for i in range(half):
            theta = angle(p, i, rotary_dim, base)
            assert cache64[p, i].item() == pytest.approx(math.cos(theta), abs=1e-12)
            assert cache64[p, half + i].item() == pytest.approx(math.sin(theta), abs=1e-12)
    cache32 = compute_cos_sin_cache(rotary_dim, max_position, base)
    assert cache32.dtype == torch.float32
    torch.testing.assert_close(cache32, cache64.float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(("head_size", "rotary_dim"), [(16, 16), (16, 8), (12, 6), (8, 2)])
def test_complex_oracle_matches_loops(is_neox, head_size, rotary_dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, head_size, generator=g, dtype=torch.float64)
    cache = torch.rand(11, rotary_dim, generator=g, dtype=torch.float64) * 2 - 1
    positions = torch.tensor([3, 0, 10, 7, 3])
    expected = rope_loops(x, positions, cache, rotary_dim, is_neox)
    torch.testing.assert_close(rope_f64(x, positions, cache, rotary_dim, is_neox), expected,
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(("head_size", "rotary_dim"), [(16, 16), (16, 8), (12, 6), (8, 2)])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_reference_float64_matches_loops(is_neox, head_size, rotary_dim, pos_dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, head_size, generator=g, dtype=torch.float64)
    cache = compute_cos_sin_cache(rotary_dim, 40, 10000.0, torch.float64)
    positions = torch.tensor([39, 0, 1, 17, 17, 5], dtype=pos_dtype)
    x_before = x.clone()
    out = rope_reference(x, positions, cache, rotary_dim, is_neox)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.equal(x, x_before), "rope_reference must not mutate its input"
    torch.testing.assert_close(out, rope_loops(x, positions, cache, rotary_dim, is_neox),
                               rtol=1e-13, atol=1e-13)
    # The tail passes through exactly.
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_reference_low_precision_returns_input_dtype(dtype, is_neox):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 64, generator=g).to(dtype)
    cache = compute_cos_sin_cache(32, 50)
    positions = torch.randint(0, 50, (7,), generator=g)
    out = rope_reference(x, positions, cache, 32, is_neox)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), rope_f64(x, positions, cache, 32, is_neox),
                               **TOLERANCES[dtype])


@pytest.mark.parametrize("case", case_params(all_cases()))
def test_reference_inplace_matrix(case):
    """rope_reference_ (the CPU kernel) over the full matrix, with the poison checks."""
    run_and_check(
        case,
        lambda p: rope_reference_(p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions,
                                  p.rotary_dim, p.is_neox),
    )


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotation_properties(is_neox):
    """With a real cache: position 0 is the identity, pair norms are preserved and rotations
    compose additively (rotating by p1 then p2 equals rotating by p1 + p2)."""
    rot, max_position = 32, 64
    cache = compute_cos_sin_cache(rot, max_position, 10000.0, torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, rot, generator=g, dtype=torch.float64)
    zeros = torch.zeros(5, dtype=torch.int64)
    torch.testing.assert_close(rope_reference(x, zeros, cache, rot, is_neox), x,
                               rtol=0, atol=0)
    p1 = torch.tensor([1, 5, 20, 0, 31])
    p2 = torch.tensor([2, 30, 11, 7, 32])
    once = rope_reference(x, p1, cache, rot, is_neox)
    assert not torch.allclose(once, x)
    twice = rope_reference(once, p2, cache, rot, is_neox)
    torch.testing.assert_close(twice, rope_reference(x, p1 + p2, cache, rot, is_neox),
                               rtol=1e-12, atol=1e-12)
    half = rot // 2
    if is_neox:
        norms = lambda y: y[..., :half] ** 2 + y[..., half:] ** 2
    else:
        norms = lambda y: y[..., 0::2] ** 2 + y[..., 1::2] ** 2
    torch.testing.assert_close(norms(once), norms(x), rtol=1e-12, atol=1e-12)


def test_gptj_is_neox_on_interleaved_features():
    rot = 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, rot, generator=g, dtype=torch.float64)
    cache = torch.rand(9, rot, generator=g, dtype=torch.float64)
    positions = torch.tensor([8, 1, 4, 0])
    # GPT-J pair i = (x[2i], x[2i+1]); de-interleave so it becomes neox pair (y[i], y[i+rot/2]).
    perm = torch.cat((torch.arange(0, rot, 2), torch.arange(1, rot, 2)))
    gptj = rope_reference(x, positions, cache, rot, False)
    neox = rope_reference(x[..., perm], positions, cache, rot, True)
    torch.testing.assert_close(gptj[..., perm], neox, rtol=1e-14, atol=1e-14)


def test_reference_on_qkv_views_leaves_v_alone():
    q, k, v, qkv = make_qkv(7, 4, 2, 64, torch.float32, generator=torch.Generator().manual_seed(6))
    before = qkv.clone()
    cache = compute_cos_sin_cache(64, 16)
    positions = torch.arange(7) + 3
    rope_reference_(q, k, cache, positions, 64, True)
    assert torch.equal(v, before[:, 6 * 64 :].view(7, 2, 64))
    torch.testing.assert_close(q.double(),
                               rope_f64(before[:, : 4 * 64].view(7, 4, 64), positions, cache, 64,
                                        True), **TOLERANCES[torch.float32])


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    num_tokens=st.integers(0, 9),
    num_heads=st.integers(1, 4),
    half=st.integers(1, 12),
    extra=st.integers(0, 5),
    is_neox=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_hypothesis(num_tokens, num_heads, half, extra, is_neox, seed):
    rot = 2 * half
    head_size = rot + extra
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, num_heads, head_size, generator=g, dtype=torch.float64)
    cache = torch.rand(13, rot, generator=g, dtype=torch.float64) * 2 - 1
    positions = torch.randint(0, 13, (num_tokens,), generator=g)
    out = rope_reference(x, positions, cache, rot, is_neox)
    torch.testing.assert_close(out, rope_loops(x, positions, cache, rot, is_neox),
                               rtol=1e-13, atol=1e-13)
