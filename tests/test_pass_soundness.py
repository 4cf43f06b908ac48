"""Soundness of the rewrite on programs written as a demanding user would write them.

Each program below is a class of bug once found in the pass (wrong values, a broken compile or
a changed output layout). Every one is compiled with ``backend="rope_compile"`` and checked
against eager: the values, every output's strides, and the number of pairs rewritten (a rewrite
must still happen wherever it is provably safe). On the CPU the pass is forced on with
``devices=("cpu",)``; the ``gpu`` variants run with default options, so that the GPU lowering
is in the loop.
"""

from __future__ import annotations

import pytest
import torch
from pass_helpers import FORCE_REWRITE, fresh_compile, rope_counters
from rope_compile.passes import fuse_qk_rope
from rope_compile.passes.layout_copy_rule import COPY_ONLY_REASON

from rope_compile.reference import compute_cos_sin_cache

T, H, D = 5, 2, 128
MAX_POS = 64


def _rope(x, cache, positions):
    """sglang's forward_native RoPE (neox) of x [T, H, rot], from a [max_pos, rot] cache."""
    cos, sin = cache.index_select(0, positions).chunk(2, -1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hf_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    cache = compute_cos_sin_cache(D, MAX_POS, 10000.0, torch.float32).to(device)
    positions = torch.randint(0, MAX_POS, (T,), generator=g).to(device)
    return g, cache, positions


def _randn(g, *shape, device):
    return torch.randn(*shape, generator=g).to(device)


# Each program: (fn, args, pairs rewritten). ---------------------------------------------------


def transposed_input(device):
    """Class 1: the RoPE input's last stride is not 1 (a transposed graph input)."""
    g, cache, positions = _inputs(device)
    a, b = _randn(g, T, D, H, device=device), _randn(g, T, D, H, device=device)

    def fn(a, b, cache, positions):
        q, k = a.transpose(1, 2), b.transpose(1, 2)
        return _rope(q, cache, positions) + 0, _rope(k, cache, positions) + 0

    return fn, (a, b, cache, positions), 0


def interleaved_qk_unbind(device):
    """Class 1: q and k interleaved in one projection (last stride 2)."""
    g, cache, positions = _inputs(device)
    qk = _randn(g, T, H * D * 2, device=device)

    def fn(qk, cache, positions):
        q, k = qk.view(T, H, D, 2).unbind(-1)
        return _rope(q, cache, positions) * 1, _rope(k, cache, positions) * 1

    return fn, (qk, cache, positions), 0


def pointwise_root_of_transposed(device):
    """Class 2: q/k's storage root is a computed buffer whose layout Inductor chooses, and the
    rotated result is returned."""
    g, cache, positions = _inputs(device)
    a, b = _randn(g, H, T, D, device=device), _randn(g, H, T, D, device=device)

    def fn(a, b, cache, positions):
        q, k = a.transpose(0, 1) * 2.0, b.transpose(0, 1) * 3.0
        return _rope(q, cache, positions), _rope(k, cache, positions)

    return fn, (a, b, cache, positions), 1


def pointwise_root_consumed(device):
    """Class 2, the rotated q/k consumed in the graph (the in-place call is kept)."""
    g, cache, positions = _inputs(device)
    a, b = _randn(g, H, T, D, device=device), _randn(g, H, T, D, device=device)

    def fn(a, b, cache, positions):
        q, k = a.transpose(0, 1) * 2.0, b.transpose(0, 1) + 1.0
        return (_rope(q, cache, positions) * _rope(k, cache, positions)).sum(-1)

    return fn, (a, b, cache, positions), 1


def _unequal_halves_program(device, duplicate):
    g = torch.Generator().manual_seed(3)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)).to(device)
    q, k = _randn(g, 1, H, 2 * T, D, device=device), _randn(g, 1, H, 2 * T, D, device=device)

    def fn(q, k, inv_freq):
        t = torch.arange(T, device=inv_freq.device).float()
        freqs = torch.outer(t, inv_freq)
        angles = torch.cat((freqs, freqs * 1.5), -1)[None]  # [1, T, D]: unequal halves
        angles = duplicate(angles)  # [1, 2T, D]: duplicated along the sequence
        return _hf_rope(q, k, angles.cos(), angles.sin())

    return fn, (q, k, inv_freq), 1


def unequal_halves_repeat_interleave(device):
    """Class 3: the table is duplicated along the sequence, not along its last dim: its halves
    differ. Once a wrong rewrite, then refused; now read as full ``[R, rot]`` tables (HF's
    formula for any cos/sin), which must give eager's values."""
    return _unequal_halves_program(device, lambda a: a.repeat_interleave(2, dim=1))


def unequal_halves_expand_flatten(device):
    """Class 3: the same with ``unsqueeze(2).expand(...).flatten(1, 2)``."""
    return _unequal_halves_program(
        device, lambda a: a.unsqueeze(2).expand(1, T, 2, D).flatten(1, 2))


def equal_halves_hf(device):
    """The HF form with truly duplicated halves is still rewritten."""
    g = torch.Generator().manual_seed(4)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)).to(device)
    q, k = _randn(g, 1, H, T, D, device=device), _randn(g, 1, H, T, D, device=device)

    def fn(q, k, inv_freq):
        t = torch.arange(T, device=inv_freq.device).float()
        freqs = torch.outer(t, inv_freq)
        angles = torch.cat((freqs, freqs), -1)[None]
        out_q, out_k = _hf_rope(q, k, angles.cos(), angles.sin())
        return out_q * 1, out_k * 1

    return fn, (q, k, inv_freq), 1


def axial_rope(device):
    """Class 4: axial 2-D RoPE, one table on the first half of each head, another on the
    second half, on the same q/k roots."""
    g, _, positions = _inputs(device)
    rows = compute_cos_sin_cache(D // 2, MAX_POS, 100.0, torch.float32).to(device)
    cols = compute_cos_sin_cache(D // 2, MAX_POS, 1000.0, torch.float32).to(device)
    col_positions = torch.randint(0, MAX_POS, (T,), generator=g).to(device)
    qkv = _randn(g, T, 3 * H * D, device=device)

    def fn(qkv, rows, cols, positions, col_positions):
        q, k, v = qkv.split([H * D] * 3, -1)
        q, k = q.view(T, H, D), k.view(T, H, D)
        half = D // 2
        q = torch.cat((_rope(q[..., :half], rows, positions),
                       _rope(q[..., half:], cols, col_positions)), -1)
        k = torch.cat((_rope(k[..., :half], rows, positions),
                       _rope(k[..., half:], cols, col_positions)), -1)
        return (q * k).sum(-1), v * 1

    return fn, (qkv, rows, cols, positions, col_positions), 2


# Each half's rotated q and k are read only by the cat that joins the halves: a layout copy, so
# by default both pairs are left to Inductor (passes/layout_copy_rule.py; see
# test_axial_rope_left_to_inductor_by_default). Forced here: what is checked is the rewrite of
# two pairs on one root.
axial_rope.options = FORCE_REWRITE


def two_pairs_one_projection(device):
    """Class 4: two q/k pairs split from one projection."""
    g, cache, positions = _inputs(device)
    qkv = _randn(g, T, 4 * H * D, device=device)

    def fn(qkv, cache, positions):
        q, k, q2, k2 = (x.view(T, H, D) for x in qkv.split([H * D] * 4, -1))
        first = (_rope(q, cache, positions) * _rope(k, cache, positions)).sum(-1)
        second = (_rope(q2, cache, positions) * _rope(k2, cache, positions)).sum(-1)
        return first, second

    return fn, (qkv, cache, positions), 2


def rotated_graph_outputs(device):
    """Class 5: the rotated q/k are graph outputs, beside v of the same projection."""
    g, cache, positions = _inputs(device)
    qkv = _randn(g, T, 3 * H * D, device=device)

    def fn(qkv, cache, positions):
        q, k, v = qkv.split([H * D] * 3, -1)
        q, k = q.view(T, H, D), k.view(T, H, D)
        return _rope(q, cache, positions), _rope(k, cache, positions), v

    return fn, (qkv, cache, positions), 1


def zero_d_beside_a_pair(device):
    """Class 6: a 0-d tensor in an unrelated expression beside a real pair."""
    g, cache, positions = _inputs(device)
    qkv = _randn(g, T, 3 * H * D, device=device)
    scale = torch.tensor(3.0, device=device)
    table = _randn(g, 4, device=device)

    def fn(qkv, cache, positions, scale, table):
        q, k, v = qkv.split([H * D] * 3, -1)
        q, k = q.view(T, H, D), k.view(T, H, D)
        odd = scale * table.unsqueeze(0) + scale * table.unsqueeze(0)  # 0-d times a table
        empty = qkv[:0].sum() + torch.zeros(0, device=qkv.device).sum()
        rotated = (_rope(q, cache, positions) * _rope(k, cache, positions)).sum(-1)
        return rotated * odd.sum() + empty, v * 1

    return fn, (qkv, cache, positions, scale, table), 1


PROGRAMS = [transposed_input, interleaved_qk_unbind, pointwise_root_of_transposed,
            pointwise_root_consumed, unequal_halves_repeat_interleave,
            unequal_halves_expand_flatten, equal_halves_hf, axial_rope,
            two_pairs_one_projection, rotated_graph_outputs, zero_d_beside_a_pair]


def check_program(program, device: str, options: dict) -> dict:
    fn, args, expected_rewrites = program(device)
    options = {**options, **getattr(program, "options", {})}
    with fresh_compile():
        eager = fn(*[a.clone() for a in args])
        ref64 = fn(*[a.double() if a.is_floating_point() else a for a in args])
        compiled = torch.compile(fn, backend="rope_compile", options=options)
        outs = compiled(*[a.clone() for a in args])
        seen = rope_counters()
    for index, (out, ref, want) in enumerate(zip(outs, eager, ref64, strict=True)):
        torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, i=index: f"output {i}: {m}")
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert out.stride() == ref.stride(), (index, out.stride(), ref.stride())
        if ref.is_contiguous():
            out.view(-1)  # a view eager allows must be allowed
    assert seen.get("rewritten", 0) == expected_rewrites, seen
    assert "pass_errors" not in seen and "candidate_errors" not in seen, seen
    return seen


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("strict", [False, True])
def test_cpu(program, strict):
    check_program(program, "cpu", {"devices": ("cpu",), "strict": strict})


@pytest.mark.gpu
@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.__name__)
def test_cuda_default_options(program):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    check_program(program, "cuda", {})


def test_axial_rope_left_to_inductor_by_default():
    """Both axial pairs are read only by the cats that join each head's halves: skipped by the
    layout-copy rule, the results eager's."""
    fn, args, _ = axial_rope("cpu")
    with fresh_compile():
        outs = torch.compile(fn, backend="rope_compile",
                             options={"devices": ("cpu",), "strict": True})(*args)
        assert rope_counters() == {"pairs_found": 2, f"skipped: {COPY_ONLY_REASON}": 2}
    for out, ref in zip(outs, fn(*args), strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rotated_output_does_not_alias_v():
    fn, args, _ = rotated_graph_outputs("cpu")
    with fresh_compile():
        q, k, v = torch.compile(fn, backend="rope_compile",
                                options={"devices": ("cpu",)})(*args)
        assert rope_counters()["rewritten"] == 1
    assert q.is_contiguous() and k.is_contiguous()
    assert q.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()


# Isolation and transactions ----------------------------------------------------------------


def _two_layers(device="cpu"):
    g, cache, positions = _inputs(device)
    x = _randn(g, T, 3 * H * D, device=device)
    y = _randn(g, T, 3 * H * D, device=device)

    def fn(x, y, cache, positions):
        outs = []
        for qkv in (x, y * 2):
            q, k, v = qkv.split([H * D] * 3, -1)
            q, k = q.view(T, H, D), k.view(T, H, D)
            outs.append((_rope(q, cache, positions) * _rope(k, cache, positions)).sum(-1) + v[
                :, :H])
        return tuple(outs)

    return fn, (x, y, cache, positions)


def _compile(fn, args, strict):
    compiled = torch.compile(fn, backend="rope_compile",
                             options={"devices": ("cpu",), "strict": strict})
    return compiled(*args)


def test_matcher_error_costs_only_its_candidate(monkeypatch):
    """An exception while matching one candidate skips that candidate only; strict raises."""
    real = fuse_qk_rope.match_rope
    failed = []

    def flaky(node):
        if not failed and node.target is torch.ops.aten.add.Tensor:
            failed.append(node)
            raise ZeroDivisionError("injected")
        return real(node)

    monkeypatch.setattr(fuse_qk_rope, "match_rope", flaky)
    fn, args = _two_layers()
    with fresh_compile():
        outs = _compile(fn, args, strict=False)
        seen = rope_counters()
    assert failed and seen["candidate_errors"] == 1 and seen["rewritten"] == 2, seen
    for out, ref in zip(outs, fn(*args), strict=True):
        torch.testing.assert_close(out, ref)
    failed.clear()
    with fresh_compile(), pytest.raises(Exception, match="injected"):
        _compile(fn, args, strict=True)


def test_failed_rewrite_is_rolled_back_and_others_commit(monkeypatch):
    """A rewrite that fails half way leaves the graph exactly as it was for that pair; the
    other pair is still rewritten, and the result is eager's."""
    real = fuse_qk_rope._redirect_disjoint_views
    calls = []

    def fail_first(tx, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected half way through a rewrite")
        return real(tx, *args, **kwargs)

    monkeypatch.setattr(fuse_qk_rope, "_redirect_disjoint_views", fail_first)
    fn, args = _two_layers()
    with fresh_compile():
        outs = _compile(fn, args, strict=False)
        seen = rope_counters()
    assert seen["rewritten"] == 1 and seen["candidate_errors"] == 1, seen
    assert "pass_errors" not in seen
    for out, ref in zip(outs, fn(*args), strict=True):
        torch.testing.assert_close(out, ref)


def test_rollback_restores_the_graph_exactly():
    from fuzz_programs import post_grad_graph
    from pass_helpers import render_graph

    fn, args = _two_layers()
    graph = post_grad_graph(fn, args).graph
    before = render_graph(graph)
    rope_pass = fuse_qk_rope.FuseQKRopePass(devices=("cpu",))
    plans, _, _ = rope_pass._plan_round(graph, set(), set())
    assert len(plans) == 2
    tx = fuse_qk_rope.GraphTransaction(graph)
    fuse_qk_rope.rewrite_pair(tx, plans[0], {})
    assert render_graph(graph) != before
    tx.rollback()
    assert render_graph(graph) == before
    graph.lint()


def test_pass_output_lints_and_rewrites_both_pairs_of_one_root():
    from fuzz_programs import post_grad_graph

    fn, args, _ = two_pairs_one_projection("cpu")
    graph = post_grad_graph(fn, args).graph
    assert fuse_qk_rope.FuseQKRopePass(devices=("cpu",), strict=True).apply(graph) == 2
    graph.lint()


def test_near_misses_are_logged(caplog):
    """A candidate with RoPE's arithmetic that a later proof step rejects says why at DEBUG:
    cos from one gather, sin from a gather at other positions."""
    import logging

    g, cache, positions = _inputs("cpu")
    other = (positions + 1) % MAX_POS
    q, k = _randn(g, T, H, D, device="cpu"), _randn(g, T, H, D, device="cpu")

    def rope(x, positions, other):
        cos = cache.index_select(0, positions).chunk(2, -1)[0].unsqueeze(-2)
        sin = cache.index_select(0, other).chunk(2, -1)[1].unsqueeze(-2)
        x1, x2 = x.chunk(2, -1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    def fn(q, k, positions, other):
        return rope(q, positions, other), rope(k, positions, other)

    with fresh_compile(), caplog.at_level(logging.DEBUG, logger="rope_compile"):
        torch.compile(fn, backend="rope_compile", options={"devices": ("cpu",)})(
            q, k, positions, other)
    messages = [r.getMessage() for r in caplog.records if r.name == "rope_compile"]
    assert any("not rewriting RoPE-like" in m and "different positions" in m
               for m in messages), messages
