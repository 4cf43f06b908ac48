"""Graphs the pass must leave alone, and the reason it gives (counter and DEBUG log).

Every function here is written with the gather/chunk/``apply_rotary_emb`` spelling of
``RotaryEmbedding.forward_native`` (see :func:`rope_heads`), changed in one respect. Each is
compiled with ``backend="rope_compile"`` (pass forced on for CPU, strict), and checked for: no
rewrite (``rewritten`` counter absent, no fused op in the generated code), the expected
``skipped: <reason>`` counter and DEBUG log line on logger ``rope_compile``, and the same results
as eager. The head-size option is checked both ways (rewrites and leaves alone).
"""

from __future__ import annotations

import logging

import pytest
import torch
from pass_helpers import (
    CPU_OPTIONS,
    count_fused_calls,
    fresh_compile,
    positions_for,
    rope_counters,
)
from torch._inductor.utils import run_and_get_code

from rope_compile import RotaryEmbedding, compute_cos_sin_cache
from rope_compile.module import apply_rotary_emb

T, HQ, HK = 5, 4, 2
MAX_POS = 64


def gather(cache: torch.Tensor, positions: torch.Tensor):
    """cos, sin ``[T, rot/2]`` (as forward_native: index_select + chunk)."""
    cos_sin = cache.index_select(0, positions.flatten())
    return cos_sin.chunk(2, dim=-1)


def rope_heads(x, cos, sin, head_size, rotary_dim, is_neox, rotate=apply_rotary_emb):
    """forward_native's per-tensor part: view as heads, rotate [..., :rot], cat the tail."""
    shape = x.shape
    x = x.view(x.shape[0], -1, head_size)
    rotated = rotate(x[..., :rotary_dim], cos, sin, is_neox)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1).reshape(shape)


def _cache(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return compute_cos_sin_cache(rotary_dim, MAX_POS, base, torch.float32)


def _qk(head_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, HQ * head_size, generator=g),
            torch.randn(T, HK * head_size, generator=g))


def _messages(caplog) -> list[str]:
    """The DEBUG records of logger ``rope_compile`` (where skip reasons are logged)."""
    return [r.getMessage() for r in caplog.records
            if r.name == "rope_compile" and r.levelno == logging.DEBUG]


def compile_and_check(fn, args, caplog, *, rewritten: bool, tol: float = 1e-5):
    """Compile ``fn`` with the rope_compile backend, compare with eager; returns
    (rope counters, DEBUG messages of logger rope_compile)."""
    expected = fn(*args)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rope_compile"), fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(fn, backend="rope_compile", options=CPU_OPTIONS), *args)
        counts = rope_counters()
    messages = _messages(caplog)
    code = "\n".join(codes)
    if rewritten:
        assert count_fused_calls(code) >= 1
        assert counts.get("rewritten", 0) >= 1, counts
    else:
        assert count_fused_calls(code) == 0, "graph was rewritten"
        assert "rewritten" not in counts, counts
        assert "pass_errors" not in counts, counts
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    return counts, messages


def assert_skipped(counts: dict, messages: list[str], reason: str, times: int = 1) -> None:
    """A ``skipped: ...`` counter containing ``reason`` (``times`` candidates) and the log line."""
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped: ")}
    hits = {k: v for k, v in skipped.items() if reason in k}
    assert hits, f"no 'skipped: ...{reason}...' counter in {counts}"
    assert sum(hits.values()) == times, counts
    assert any(reason in m for m in messages), messages


# --------------------------------------------------------------------------------------------
# pairs found but not rewritten, or no pair


def test_head_size_64_not_in_defaults(caplog):
    rope = RotaryEmbedding(64, 64, MAX_POS, 10000.0, True, torch.float32)
    counts, messages = compile_and_check(rope.forward_native, (positions_for(T), *_qk(64)),
                                         caplog, rewritten=False)
    assert counts["pairs_found"] == 1
    assert_skipped(counts, messages, "head_size 64 not in (128, 256, 512)")


def test_different_positions(caplog):
    def fn(pos_q, pos_k, q, k, cache):
        cq, sq = gather(cache, pos_q)
        ck, sk = gather(cache, pos_k)
        return rope_heads(q, cq, sq, 128, 128, True), rope_heads(k, ck, sk, 128, 128, True)

    args = (positions_for(T, seed=0), positions_for(T, seed=1), *_qk(128), _cache(128))
    counts, messages = compile_and_check(fn, args, caplog, rewritten=False)
    assert "pairs_found" not in counts
    assert_skipped(counts, messages, "q and k use different positions", times=2)


def test_different_caches(caplog):
    def fn(positions, q, k, cache_q, cache_k):
        cq, sq = gather(cache_q, positions)
        ck, sk = gather(cache_k, positions)
        return rope_heads(q, cq, sq, 128, 128, True), rope_heads(k, ck, sk, 128, 128, True)

    args = (positions_for(T), *_qk(128), _cache(128), _cache(128, base=500000.0))
    counts, messages = compile_and_check(fn, args, caplog, rewritten=False)
    assert "pairs_found" not in counts
    assert_skipped(counts, messages, "q and k use different cos_sin_caches", times=2)


def test_different_rotary_dim(caplog):
    """rotary_dim 128 for q and 64 for k. The cache width is rotary_dim, so the caches differ too
    (as with two RotaryEmbedding modules); the pass may report either difference."""
    def fn(positions, q, k, cache_128, cache_64):
        cq, sq = gather(cache_128, positions)
        ck, sk = gather(cache_64, positions)
        return rope_heads(q, cq, sq, 128, 128, True), rope_heads(k, ck, sk, 128, 64, True)

    args = (positions_for(T), *_qk(128), _cache(128), _cache(64))
    counts, messages = compile_and_check(fn, args, caplog, rewritten=False)
    assert "pairs_found" not in counts
    assert_skipped(counts, messages, "q and k use different", times=2)
    assert any("cos_sin_caches" in k or "rotary_dim" in k for k in counts), counts


def test_neox_q_gptj_k(caplog):
    def fn(positions, q, k, cache):
        cos, sin = gather(cache, positions)
        return rope_heads(q, cos, sin, 128, 128, True), rope_heads(k, cos, sin, 128, 128, False)

    args = (positions_for(T), *_qk(128), _cache(128))
    counts, messages = compile_and_check(fn, args, caplog, rewritten=False)
    assert "pairs_found" not in counts
    assert_skipped(counts, messages, "q and k use different styles (neox vs GPT-J)", times=2)


def test_lone_q_rope(caplog):
    def fn(positions, q, k, cache):
        cos, sin = gather(cache, positions)
        return rope_heads(q, cos, sin, 128, 128, True), k * 2

    args = (positions_for(T), *_qk(128), _cache(128))
    counts, messages = compile_and_check(fn, args, caplog, rewritten=False)
    assert "pairs_found" not in counts
    assert_skipped(counts, messages, "lone RoPE")


# --------------------------------------------------------------------------------------------
# arithmetic that is not RoPE (q); k is proper RoPE and is then left alone as a lone RoPE


def _halves(x, is_neox):
    if is_neox:
        return torch.chunk(x, 2, dim=-1)
    return x[..., ::2], x[..., 1::2]


def _join(o1, o2, is_neox):
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def _not_rope(kind: str):
    def rotate(x, cos, sin, is_neox):
        cos = cos.unsqueeze(-2).to(x.dtype)
        sin = sin.unsqueeze(-2).to(x.dtype)
        x1, x2 = _halves(x, is_neox)
        if kind == "plus_minus_swapped":  # x1*cos + x2*sin, x2*cos - x1*sin
            return _join(x1 * cos + x2 * sin, x2 * cos - x1 * sin, is_neox)
        if kind == "sin_cos_swapped":
            return _join(x1 * sin - x2 * cos, x2 * sin + x1 * cos, is_neox)
        if kind == "halves_swapped_in_cat":
            return _join(x2 * cos + x1 * sin, x1 * cos - x2 * sin, is_neox)
        if kind == "wrong_operand":  # second half uses x2 twice
            return _join(x1 * cos - x2 * sin, x2 * cos + x2 * sin, is_neox)
        if kind == "cos_twice":
            return _join(x1 * cos - x2 * cos, x2 * cos + x1 * cos, is_neox)
        if kind == "pairs_swapped":  # GPT-J pairs read as (x[1::2], x[::2])
            x1, x2 = x2, x1
            return _join(x1 * cos - x2 * sin, x2 * cos + x1 * sin, is_neox)
        if kind == "one_half_scaled":  # (x1*cos - x2*sin) * 2
            return _join((x1 * cos - x2 * sin) * 2, x2 * cos + x1 * sin, is_neox)
        raise ValueError(kind)

    return rotate


NOT_ROPE = [
    ("plus_minus_swapped", True),
    ("sin_cos_swapped", True),
    ("halves_swapped_in_cat", True),
    ("wrong_operand", False),
    ("cos_twice", True),
    ("pairs_swapped", False),
    ("one_half_scaled", True),
]


@pytest.mark.parametrize(("kind", "is_neox"), NOT_ROPE, ids=[k for k, _ in NOT_ROPE])
def test_not_rope_arithmetic(kind, is_neox, caplog):
    def fn(positions, q, k, cache):
        cos, sin = gather(cache, positions)
        return (rope_heads(q, cos, sin, 128, 128, is_neox, rotate=_not_rope(kind)),
                rope_heads(k, cos, sin, 128, 128, is_neox))

    args = (positions_for(T), *_qk(128), _cache(128))
    counts, messages = compile_and_check(fn, args, caplog, rewritten=False)
    assert "pairs_found" not in counts
    assert_skipped(counts, messages, "lone RoPE")


def test_not_rope_anywhere_counts_nothing(caplog):
    """No candidate proves to be RoPE: nothing is paired, skipped or rewritten; each RoPE-like
    candidate is a ``missed: <reason>`` (tests/test_pass_misses.py)."""
    rotate = _not_rope("sin_cos_swapped")

    def fn(positions, q, k, cache):
        cos, sin = gather(cache, positions)
        return (rope_heads(q, cos, sin, 128, 128, True, rotate=rotate),
                rope_heads(k, cos, sin, 128, 128, True, rotate=rotate))

    args = (positions_for(T), *_qk(128), _cache(128))
    counts, _ = compile_and_check(fn, args, caplog, rewritten=False)
    assert counts == {"missed: cos and sin are not the first and second halves of the "
                      "cos_sin_cache rows (cos and sin swapped?)": 2}


# --------------------------------------------------------------------------------------------
# head_sizes option


def _rope_fn(head_size: int):
    rope = RotaryEmbedding(head_size, head_size, MAX_POS, 10000.0, True, torch.float32)
    return rope.forward_native, (positions_for(T), *_qk(head_size))


def _compile_with(fn, args, caplog, rewritten, **pass_options):
    expected = fn(*args)
    with caplog.at_level(logging.DEBUG, logger="rope_compile"), fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(fn, backend="rope_compile", options={**CPU_OPTIONS, **pass_options}),
            *args)
        counts = rope_counters()
    assert count_fused_calls("\n".join(codes)) == (1 if rewritten else 0)
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return counts, _messages(caplog)


@pytest.mark.parametrize("head_sizes", [None, (256,)], ids=["default", "only-256"])
def test_head_size_256_rewritten(head_sizes, caplog):
    fn, args = _rope_fn(256)
    options = {} if head_sizes is None else {"head_sizes": head_sizes}
    counts, _ = _compile_with(fn, args, caplog, True, **options)
    assert counts == {"pairs_found": 1, "rewritten": 1}


def test_head_sizes_128_leaves_256_alone(caplog):
    fn, args = _rope_fn(256)
    counts, messages = _compile_with(fn, args, caplog, False, head_sizes=(128,))
    assert counts["pairs_found"] == 1
    assert "rewritten" not in counts
    assert_skipped(counts, messages, "head_size 256 not in (128,)")


def test_head_sizes_option_can_add_64(caplog):
    fn, args = _rope_fn(64)
    counts, _ = _compile_with(fn, args, caplog, True, head_sizes=(64, 128))
    assert counts == {"pairs_found": 1, "rewritten": 1}
