"""Property-based fuzzing of the fused Q+K RoPE pass (``passes.fuse_qk_rope``).

Programs come from ``fuzz_programs``: real q/k RoPE pairs (neox / GPT-J, head sizes 64..512,
partial rotary, GQA, fp16/bf16/fp32, fp32 or model-dtype caches, offsets, strided positions,
transposed caches, q/k as inputs or views of a qkv projection, extra users of the pre-RoPE
values) and near misses that are not a fusable pair (sign swaps, cos for sin, wrong split,
swapped halves, cos and sin from different positions, different positions / caches / styles for
q and k, lone q).

Properties:

* ``test_matcher_agrees_with_oracle`` (fast, no compile; a few hundred examples): on the graph
  Inductor would hand the pass (``fp.post_grad_graph``), the matcher finds exactly the RoPE
  applications and pairs the drawn parameters imply; the pass rewrites exactly the real pairs
  with a fused head size; the rewritten graph, run eagerly, computes the program's values
  (within a few ulps of a float64 run of the same program) without modifying its inputs.
* ``test_harness_graph_is_inductors``: that fast graph has the same ops, matches and pairs as
  the one captured inside a real compile.
* ``test_compiled_matches_eager`` (slow, each example compiles): the program compiled with
  ``backend="rope_compile"`` (strict, CPU enabled) gives the eager values, twice, does not
  modify its inputs, and ``counters["rope_compile"]["rewritten"]`` is 1 exactly for real fusable
  pairs; a quarter mark the tokens dim dynamic and rerun with more tokens.
* ``test_regression_*``: bugs these fuzzers found (fixed in 8b2713f); the fuzzers draw such
  programs too (shared / overlapping q and k, mixed dtypes, chained RoPE).
* ``test_pass_error_is_contained``: a fault injected into the matcher leaves the compile working
  (warning, ``pass_errors`` counted), and ``strict=True`` raises it. (``test_backend.py``
  injects faults into ``plan_pair`` / ``rewrite_pair``.)

Example counts follow ``ROPE_FUZZ_PROFILE`` (see ``fuzz_programs``).
"""

from __future__ import annotations

import collections
import logging
import random

import fuzz_programs as fp
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rope_compile.passes import fuse_qk_rope, rope_pattern
from rope_compile.passes.fuse_qk_rope import FuseQKRopePass, find_rope_matches, pair_matches
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

OPTIONS = {"devices": ("cpu",), "strict": True}


@pytest.fixture(scope="module", autouse=True)
def _report_stats(request):
    fp.report_stats_at_exit(request.config)


def _no_compile_cache():
    """FX-graph and AOTAutograd cache hits skip the post-grad passes (and so the pass's
    counters): every example must really run the pass."""
    return (torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False))


def _check_outputs(p: fp.RopeProgram, outs, eager, ref64, what: str) -> None:
    assert len(outs) == len(eager) == len(ref64), what
    for i, (out, e, r) in enumerate(zip(outs, eager, ref64, strict=True)):
        # The float64 twin is the same program (harness sanity; eager rounds every op).
        tol = p.tolerance_dtype
        fp.check_close(e, r, e.dtype, f"{what}: eager output {i} vs float64", ulps=8,
                       tol_dtype=tol)
        fp.check_close(out, r, e.dtype, f"{what}: output {i} vs float64", tol_dtype=tol)
        if e.dtype == torch.float32 and tol is None:
            torch.testing.assert_close(out, e, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, i=i: f"{what}: output {i} vs eager: {m}")


def _check_unmodified(args, snapshot, what: str) -> None:
    for i, (a, s) in enumerate(zip(args, snapshot, strict=True)):
        assert torch.equal(a, s), f"{what}: input {i} was modified"


# --------------------------------------------------------------------------------------------
# fast: matcher and rewrite on post-grad-like graphs, no Inductor codegen


def check_matcher(p: fp.RopeProgram, prop: str = "pass.matcher") -> None:
    what = p.describe()
    fn, args = fp.build_program(p)
    snapshot = [a.clone() for a in args]
    eager = fn(*args)
    ref64 = fn(*fp.to_float64(args))
    gm = fp.post_grad_graph(fn, args)

    matches = find_rope_matches(gm.graph)
    pairs, unpaired = pair_matches(matches)
    counters.clear()
    rewritten = FuseQKRopePass(devices=("cpu",), strict=True).apply(gm.graph)
    counters.clear()
    _record(prop, p, rewritten)
    if p.expected_matches is not None:
        assert len(matches) == p.expected_matches, (
            f"{what}: {len(matches)} RoPE matches, expected {p.expected_matches}")
    if p.expected_pairs is not None:
        assert len(pairs) == p.expected_pairs, (
            f"{what}: {len(pairs)} pairs, expected {p.expected_pairs}; unpaired: "
            f"{[reason for _, reason in unpaired]}")

    # As Inductor does right after the custom post-grad passes (the pass relies on it).
    stable_topological_sort(gm.graph)
    gm.graph.lint()
    gm.recompile()
    outs = gm(*args)
    _check_unmodified(args, snapshot, what)
    _check_outputs(p, outs, eager, ref64, what)
    fp.record(prop, numerically_checked=1)
    _check_rewrites(p, rewritten, what)


def _record(prop: str, p: fp.RopeProgram, rewritten: int) -> None:
    """Figures: examples, real pairs, dynamic ones; where the rewrite count is specified, the
    rewrites expected and done and the wrong decisions; elsewhere (q/k sharing memory, chained
    real pairs) the examples and the rewrites done."""
    expected = p.expected_rewrites
    if expected is None:
        fp.record(prop, examples=1, real_pairs=int(p.is_real_pair), dynamic=int(p.dynamic),
                  count_unspecified=1, rewrites_where_unspecified=rewritten)
        return
    fp.record(prop, examples=1, real_pairs=int(p.is_real_pair), dynamic=int(p.dynamic),
              expected_rewrites=expected, rewrites=rewritten,
              wrong_rewrite_decisions=int(rewritten != expected))


def _check_rewrites(p: fp.RopeProgram, rewritten: int, what: str) -> None:
    if p.expected_rewrites is not None:
        assert rewritten == p.expected_rewrites, (
            f"{what}: {rewritten} pairs rewritten, expected {p.expected_rewrites}")


class _CaptureGraph(CustomGraphPass):
    """Records what the RoPE pass will see: the backend chains configured post-grad passes
    before its own."""

    def __init__(self) -> None:
        self.ops = None
        self.matches = None

    def __call__(self, graph) -> None:
        self.ops = _op_counts(graph)
        self.matches = _match_summary(graph)

    def uuid(self):
        return None


def _op_counts(graph) -> collections.Counter:
    return collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


def _match_summary(graph):
    matches = find_rope_matches(graph)
    pairs, _ = pair_matches(matches)
    return sorted((m.rotary_dim, m.head_size, m.is_neox) for m in matches), len(pairs)


@pytest.mark.parametrize("changes", [
    {},
    {"is_neox": False, "rotary_dim": 128, "source": "flat", "library_spelling": True},
    {"defect": "swap_sign", "source": "strided", "dtype": torch.float16},
    {"defect": "diff_positions", "strided_positions": True, "transposed_cache": True},
], ids=["neox-qkv-partial", "gptj-flat-full", "swap-sign-strided", "diff-positions"])
def test_harness_graph_is_inductors(changes):
    """The fast harness (``fp.post_grad_graph``) gives the graph a real compile hands the pass:
    the same ops, the same matches and pairs."""
    p = fp.RopeProgram(**{
        "is_neox": True, "head_size": 128, "rotary_dim": 64, "num_q_heads": 4,
        "num_kv_heads": 2, "dtype": torch.bfloat16, "cache_mode": "cast",
        "pos_dtype": torch.int64, "offsets": True, "source": "qkv", "extra_users": "scaled",
        "library_spelling": False, "defect": None, "defect_side": "q", "num_tokens": 5,
        "seed": 3, **changes})
    fn, args = fp.build_program(p)
    fast = fp.post_grad_graph(fn, args).graph
    capture = _CaptureGraph()
    torch._dynamo.reset()
    graph_cache, autograd_cache = _no_compile_cache()
    try:
        with graph_cache, autograd_cache, torch._inductor.config.patch(
                post_grad_custom_post_pass=capture):
            torch.compile(fn, backend="rope_compile", options=OPTIONS)(*args)
    finally:
        torch._dynamo.reset()
        counters.clear()
    assert capture.ops is not None, "the capturing pass did not run"
    assert _op_counts(fast) == capture.ops
    assert _match_summary(fast) == capture.matches
    assert "aten.index.Tensor" in capture.ops and "aten.cat.default" in capture.ops


@fp.fuzz_settings(ci=300, long=5000)
@given(st.one_of(fp.rope_programs(), fp.uniform_rope_programs()))
def test_matcher_agrees_with_oracle(p: fp.RopeProgram):
    check_matcher(p)


# --------------------------------------------------------------------------------------------
# slow: full torch.compile with the backend


def _token_inputs(p: fp.RopeProgram, args) -> list[torch.Tensor]:
    """The inputs whose dim 0 is the tokens dim."""
    positions, offsets, a, b, _, positions2, _ = args
    tokens = [positions, offsets, positions2, a]
    if p.source in ("flat", "3d", "strided"):
        tokens.append(b)
    return tokens


def check_compiled(p: fp.RopeProgram, prop: str = "pass.compiled") -> None:
    what = p.describe()
    fn, args = fp.build_program(p)
    snapshot = [a.clone() for a in args]
    eager = fn(*args)
    ref64 = fn(*fp.to_float64(args))

    torch._dynamo.reset()
    counters.clear()
    graph_cache, autograd_cache = _no_compile_cache()
    try:
        with graph_cache, autograd_cache:
            if p.dynamic:
                for t in _token_inputs(p, args):
                    torch._dynamo.mark_dynamic(t, 0)
            compiled = torch.compile(fn, backend="rope_compile", options=OPTIONS)
            outs = compiled(*args)
            rewritten = counters["rope_compile"]["rewritten"]
            again = compiled(*args)
            if p.dynamic:  # more tokens, same compiled graph (tokens are symbolic)
                more = fp.make_inputs(p, num_tokens=p.num_tokens + 3)
                more_snapshot = [a.clone() for a in more]
                more_outs = compiled(*more)
    finally:
        torch._dynamo.reset()
        counters.clear()

    _record(prop, p, rewritten)
    _check_unmodified(args, snapshot, what)
    _check_outputs(p, outs, eager, ref64, what)
    for i, (a, b) in enumerate(zip(outs, again, strict=True)):
        assert torch.equal(a, b), f"{what}: output {i} differs between two calls"
    if p.dynamic:
        _check_unmodified(more, more_snapshot, f"{what} (rerun)")
        _check_outputs(p, more_outs, fn(*more), fn(*fp.to_float64(more)), f"{what} (rerun)")
    _check_rewrites(p, rewritten, what)


@fp.fuzz_settings(ci=40, long=400, shrink=False)
@given(fp.uniform_rope_programs(dynamic=True))
def test_compiled_matches_eager(p: fp.RopeProgram):
    check_compiled(p)


# --------------------------------------------------------------------------------------------
# regressions for bugs these fuzzers found (all fixed in 8b2713f)


def _regression_program(**changes) -> fp.RopeProgram:
    base = {
        "is_neox": True, "head_size": 128, "rotary_dim": 128, "num_q_heads": 2,
        "num_kv_heads": 1, "dtype": torch.float32, "cache_mode": "f32",
        "pos_dtype": torch.int64, "offsets": False, "source": "flat", "extra_users": "none",
        "library_spelling": True, "defect": None, "defect_side": "q", "num_tokens": 3,
        "seed": 0,
    }
    return fp.RopeProgram(**{**base, **changes})


def _module_problem():
    """A 128/128 neox RotaryEmbedding (fp32) and positions, q [3, 2*128], k [3, 128]."""
    from rope_compile.module import RotaryEmbedding

    rope = RotaryEmbedding(128, 128, 32, 10000.0, True, torch.float32)
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 32, (3,), generator=g)
    q = torch.rand(3, 256, generator=g) * 2 - 1
    k = torch.rand(3, 128, generator=g) * 2 - 1
    return rope, positions, q, k


def _compile_and_compare(fn, args, strict: bool, tol_dtype=None) -> dict:
    """Compile ``fn`` (CPU enabled) and compare with a float64 run (few ulps of each output's
    dtype; see ``fp.check_close``). Returns the pass's counters."""
    eager = fn(*args)
    ref64 = fn(*fp.to_float64(args))
    torch._dynamo.reset()
    counters.clear()
    graph_cache, autograd_cache = _no_compile_cache()
    try:
        with graph_cache, autograd_cache:
            out = torch.compile(fn, backend="rope_compile",
                                options={"devices": ("cpu",), "strict": strict})(*args)
        counts = dict(counters["rope_compile"])
    finally:
        torch._dynamo.reset()
        counters.clear()
    assert len(out) == len(eager)
    for i, (o, e, r) in enumerate(zip(out, eager, ref64, strict=True)):
        fp.check_close(o, r, e.dtype, f"compiled output {i}", tol_dtype=tol_dtype)
    return counts


def test_regression_shared_qk_module():
    """Was: q and k that are the same tensor (shared-QK, ``forward_native(positions, q, q)``)
    were fused into one in-place call that rotated the shared elements twice (wrong values)."""
    rope, positions, q, _ = _module_problem()

    def fn(positions, q):
        return rope.forward_native(positions, q, q)

    _compile_and_compare(fn, (positions, q), strict=False)


def test_regression_overlapping_qk():
    """Was: q and k that overlap (k a view of q's first heads) were fused; the in-place op
    rotated the overlap twice (wrong values)."""
    check_matcher(_regression_program(source="overlap"), prop="pass.regressions")


def test_regression_mixed_dtype_pair():
    """Was: q and k of different dtypes were paired (the pair key ignored dtype); the fused
    op's fake impl then raised inside the pass: strict=True failed the compile, strict=False
    dropped every rewrite of the graph."""
    p = _regression_program(defect="mixed_dtype", dtype=torch.float16)
    counts = _compile_and_compare(fp.make_fn(p), fp.make_inputs(p), strict=True,
                                  tol_dtype=p.tolerance_dtype)
    assert counts.get("rewritten", 0) == 0 and counts.get("pass_errors", 0) == 0, counts


def test_regression_chained_rope_crashes():
    """Was: RoPE of a RoPE output (chained): the dependency check missed k.base being q.output
    itself, the pair was rewritten into a cyclic graph and Inductor's stable_topological_sort
    asserted, even with strict=False."""
    rope, positions, q, k = _module_problem()

    def fn(positions, q, k):
        q1, _ = rope.forward_native(positions, q, k)
        q2, _ = rope.forward_native(positions, q1, k)
        return (q2,)

    _compile_and_compare(fn, (positions, q, k), strict=False)


def test_regression_chained_rope_pairs():
    """Was: two chained RoPE pairs: the second pair's plan named nodes the first rewrite had
    erased (KeyError in rewrite_pair); strict compile failed, strict=False kept a half-rewritten
    graph."""
    rope, positions, q, k = _module_problem()

    def fn(positions, q, k):
        q1, k1 = rope.forward_native(positions, q, k)
        return rope.forward_native(positions, q1, k1)

    counts = _compile_and_compare(fn, (positions, q, k), strict=True)
    assert counts.get("rewritten") == 2, counts


# --------------------------------------------------------------------------------------------
# faults inside the pass


def _fault_program() -> fp.RopeProgram:
    return fp.RopeProgram(
        is_neox=True, head_size=128, rotary_dim=64, num_q_heads=4, num_kv_heads=2,
        dtype=torch.float32, cache_mode="f32", pos_dtype=torch.int64, offsets=False,
        source="qkv", extra_users="none", library_spelling=False, defect=None, defect_side="q",
        num_tokens=5, seed=7)


def _faulty_matcher(monkeypatch, fail_at: int) -> list[int]:
    """Make the ``fail_at``-th call of ``match_rope`` (0-based) raise RuntimeError."""
    calls = [0]
    real = rope_pattern.match_rope

    def faulty(node):
        calls[0] += 1
        if calls[0] - 1 == fail_at:
            raise RuntimeError("injected fault in match_rope")
        return real(node)

    # fuse_qk_rope binds the name at import time: patch both bindings.
    monkeypatch.setattr(rope_pattern, "match_rope", faulty)
    monkeypatch.setattr(fuse_qk_rope, "match_rope", faulty)
    return calls


def test_pass_error_is_contained(monkeypatch, caplog):
    p = _fault_program()
    fn, args = fp.build_program(p)
    eager = fn(*args)
    ref64 = fn(*fp.to_float64(args))
    # The graph has more than 4 candidate nodes (casts, views, cats); pick one at random
    # (seeded: the test is deterministic).
    fail_at = random.Random(20240607).randrange(4)
    calls = _faulty_matcher(monkeypatch, fail_at)

    torch._dynamo.reset()
    counters.clear()
    graph_cache, autograd_cache = _no_compile_cache()
    with graph_cache, autograd_cache, caplog.at_level(logging.WARNING, logger="rope_compile"):
        compiled = torch.compile(fn, backend="rope_compile",
                                 options={"devices": ("cpu",), "strict": False})
        outs = compiled(*args)
        assert calls[0] > fail_at, "the fault was not reached"
        # The failing candidate is skipped alone: counted, and the pass itself goes on.
        assert counters["rope_compile"]["candidate_errors"] == 1
        assert counters["rope_compile"]["pass_errors"] == 0
        assert counters["rope_compile"]["rewritten"] <= 1
    _check_outputs(p, outs, eager, ref64, "pass with an injected fault")
    warnings = [r for r in caplog.records
                if r.name == "rope_compile" and r.levelno == logging.WARNING]
    assert warnings and "injected fault" in warnings[0].getMessage()

    calls[0] = 0
    torch._dynamo.reset()
    counters.clear()
    graph_cache, autograd_cache = _no_compile_cache()
    with graph_cache, autograd_cache, pytest.raises(Exception) as info:
        torch.compile(fn, backend="rope_compile", options=OPTIONS)(*args)
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("injected fault in match_rope" in m for m in chain), chain
    torch._dynamo.reset()
    counters.clear()
