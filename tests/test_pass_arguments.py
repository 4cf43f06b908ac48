"""Every argument of every op a matcher accepts is proven or makes the match fail
(``passes/accepted_ops.py``, ``docs/accepted_ops.md``).

* The table: each schema argument of each accepted op is read, pinned or value-neutral, and
  each op the matchers name is in it; ``argument_miss`` / ``op_of`` on hand-built nodes.
* Spellings, compiled with ``backend="rope_compile"`` (CPU options, strict), each checked
  against eager: the default spelling (or alpha=1 written out) fuses, the other one is left to
  Inductor with its counted reason. QK-norm: ``add`` alpha in eps and in Gemma's ``1 + w``,
  ``mean(dtype=)``, ``pow`` exponents, ``rsqrt`` as ``pow(-0.5)``, ``x.to(float64)``. RoPE:
  ``sub``/``add`` alpha in the rotation sums (sglang and HF forms); gpt-fast's (cos, sin) picks
  for k on another dim (``select``'s dim) or of another view (``view``'s size) of q's rows. KV
  store: ``index_put`` accumulate, ``index_copy`` dim, a ``div`` with a rounding mode or a
  ``mul`` for the scale.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from pass_helpers import (
    CPU_OPTIONS,
    FORCE_REWRITE,
    count_fused_calls,
    fresh_compile,
    positions_for,
    rope_counters,
)
from rope_compile.passes import fuse_kv_store, rope_pattern
from rope_compile.passes.accepted_ops import ACCEPTED, argument_miss, op_of
from rope_compile.passes.fx_surgery import VIEW_OPS
from test_gpt_fast import apply_rotary_emb as gpt_fast_rope
from test_gpt_fast import precompute_freqs_cis
from test_pass_kv_store import HandWrittenLayer, _clone, _inputs, compile_and_run
from test_pass_negative import _cache, _qk, gather, rope_heads
from test_pass_qk_norm import Qwen3StyleLayer, _run
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.fx import Graph

aten = torch.ops.aten
prims = torch.ops.prims
PASSES = Path(__file__).resolve().parents[1] / "passes"

# --------------------------------------------------------------------------------------------
# the table


@pytest.mark.parametrize("op", list(ACCEPTED), ids=str)
def test_every_argument_is_read_pinned_or_neutral(op):
    entry = ACCEPTED[op]
    classified = [*entry.read, *entry.pinned, *entry.neutral]
    assert len(classified) == len(set(classified)), f"{op}: an argument in two classes"
    if isinstance(op, torch._ops.OpOverload):
        names = [a.name for a in op._schema.arguments]
    else:  # operator.getitem
        names = ["a", "b"]
    assert sorted(classified) == sorted(names), f"{op}: schema {names}, table {classified}"


def _ops_named_in(source: str) -> set:
    found = set()
    for ns, name, overload in re.findall(r"\b(aten|prims)\.(\w+)\.(\w+)\b", source):
        found.add(getattr(getattr(getattr(torch.ops, ns), name), overload))
    return found


def test_every_op_the_matchers_name_is_in_the_table():
    """The matcher modules name no op outside the table (a new op comes with its audit); the
    view chains (``fx_surgery.VIEW_OPS``) and the KV store's size-1 views are in it too."""
    refused = {aten.stack.default}  # named only to refuse it with its own reason
    # Eager ops named for a node's meta["original_aten"] (what the traced op was), not matched.
    eager = {op for op in _ops_named_in((PASSES / "rope_pattern.py").read_text())
             if str(op) in getattr(rope_pattern, "_WRAPPING_EAGER_OPS", ())}
    for module in ("rope_pattern.py", "fuse_qk_norm.py"):
        named = _ops_named_in((PASSES / module).read_text()) - refused - eager
        assert named <= set(ACCEPTED), f"{module}: {named - set(ACCEPTED)}"
    for group in (VIEW_OPS, fuse_kv_store._SIZE1_VIEWS, rope_pattern._GATHERS,
                  rope_pattern._SPLITS, rope_pattern._VIEW_TARGETS):
        assert set(group) <= set(ACCEPTED), set(group) - set(ACCEPTED)


def test_the_doc_lists_every_op():
    doc = (PASSES.parent / "docs" / "accepted_ops.md").read_text()
    for op in ACCEPTED:
        name = str(op) if isinstance(op, torch._ops.OpOverload) else f"operator.{op.__name__}"
        assert f"`{name}`" in doc, name


def _node(target, args, kwargs=None, val=None):
    """A call of ``target`` on a placeholder whose fake value is ``val`` (a meta tensor)."""
    graph = Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3, device="meta") if val is None else val
    return graph.call_function(target, (x, *args), kwargs or {})


@pytest.mark.parametrize("target, args, kwargs, why", [
    (aten.add.Tensor, (1e-6,), {}, None),
    (aten.add.Tensor, (1e-6,), {"alpha": 1.0}, None),
    (aten.add.Tensor, (1e-6,), {"alpha": 100.0},
     "aten.add.Tensor with alpha=100.0 (the proof holds for alpha=1 only)"),
    (aten.sub.Tensor, (1.0,), {"alpha": 2}, "aten.sub.Tensor with alpha=2 (the proof holds "
                                            "for alpha=1 only)"),
    (aten.mean.dim, ([-1], True), {"dtype": torch.float32}, None),
    (aten.mean.dim, ([-1], True), {"dtype": torch.float64},
     "aten.mean.dim with dtype=torch.float64 (the proof holds for dtype=None or the input's "
     "dtype only)"),
    (aten._to_copy.default, (), {"dtype": torch.float16, "layout": torch.strided,
                                 "device": torch.device("meta"), "non_blocking": True,
                                 "memory_format": torch.channels_last}, None),
    (aten._to_copy.default, (), {"dtype": torch.float16, "device": torch.device("cpu")},
     "aten._to_copy.default with device=device(type='cpu') (the proof holds for device=None "
     "or the input's device only)"),
    (aten._to_copy.default, (), {"layout": torch.sparse_coo},
     "aten._to_copy.default with layout=torch.sparse_coo (the proof holds for layout=None or "
     "torch.strided only)"),
    (aten._to_copy.default, (), {"pin_memory": True},
     "aten._to_copy.default with pin_memory=True (the proof holds for pin_memory=None or False "
     "only)"),
    (aten.div.Tensor_mode, (2.0,), {"rounding_mode": "floor"},
     "aten.div.Tensor_mode is not an op the matcher accepts"),
    (aten.mul.Scalar, (2.0,), {}, "aten.mul.Scalar is not an op the matcher accepts"),
    (aten.add.out, (1.0,), {}, "aten.add.out is not an op the matcher accepts"),
])
def test_argument_miss(target, args, kwargs, why):
    node = _node(target, args, kwargs)
    assert argument_miss(node) == why
    assert op_of(node) is (target if why is None else None)


def test_a_traced_alpha_is_not_proven_one():
    graph = Graph()
    x, alpha = graph.placeholder("x"), graph.placeholder("alpha")
    node = graph.call_function(aten.add.Tensor, (x, x), {"alpha": alpha})
    assert "alpha=alpha" in argument_miss(node) and op_of(node) is None


# --------------------------------------------------------------------------------------------
# QK-norm: eps, Gemma's 1 + w, the variance, rsqrt, the float32 cast


class SpelledNorm(nn.Module):
    """HF ``Qwen3RMSNorm`` / ``Gemma3RMSNorm`` with one spelling changed: ``eps_alpha`` /
    ``one_alpha`` (``torch.add(.., alpha=)`` for ``var + eps`` / Gemma's ``1 + w``),
    ``mean_dtype`` (``mean(dtype=)``), ``mean_dim`` (``mean(dim)``, keepdim), ``exponent``
    (``pow(x, exponent)`` for the square),
    ``rsqrt_pow`` (``pow(var + eps, -0.5)``), ``upcast`` (the dtype x is normalised in)."""

    def __init__(self, weight: torch.Tensor, gemma: bool, eps_alpha=None, one_alpha=None,
                 mean_dtype=None, mean_dim=-1, exponent=2, rsqrt_pow=False,
                 upcast=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.gemma, self.eps = gemma, 1e-6
        self.eps_alpha, self.one_alpha, self.mean_dtype = eps_alpha, one_alpha, mean_dtype
        self.mean_dim, self.exponent = mean_dim, exponent
        self.rsqrt_pow, self.upcast = rsqrt_pow, upcast

    def forward(self, hidden):
        dtype = hidden.dtype
        x = hidden.to(self.upcast)
        square = x.pow(self.exponent)
        variance = (square.mean(self.mean_dim, keepdim=True) if self.mean_dtype is None
                    else square.mean(self.mean_dim, keepdim=True, dtype=self.mean_dtype))
        shifted = (variance + self.eps if self.eps_alpha is None
                   else torch.add(variance, self.eps, alpha=self.eps_alpha))
        x = x * (torch.pow(shifted, -0.5) if self.rsqrt_pow else torch.rsqrt(shifted))
        if self.gemma:
            factor = (1.0 + self.weight.float() if self.one_alpha is None
                      else torch.add(self.weight.float(), 1.0, alpha=self.one_alpha))
            return (x * factor).type_as(hidden)
        return self.weight * x.to(dtype)


def _norm_layer(gemma=False, **spelling) -> Qwen3StyleLayer:
    layer = Qwen3StyleLayer(gemma=gemma)
    layer.q_norm = SpelledNorm(layer.q_norm.weight, gemma, **spelling)
    layer.k_norm = SpelledNorm(layer.k_norm.weight, gemma, **spelling)
    return layer


FUSED = {"pairs_found": 1, "rewritten": 1, "qk_norm rewritten": 1}


def _norm_skipped(reason: str) -> dict:
    return {"pairs_found": 1, "rewritten": 1, f"qk_norm skipped: q: {reason}": 1}


@pytest.mark.parametrize("gemma, spelling, want", [
    (False, {"eps_alpha": 1.0}, FUSED),
    (False, {"eps_alpha": 100.0}, _norm_skipped(
        "the norm's mean(x^2) + eps: aten.add.Tensor with alpha=100.0 (the proof holds for "
        "alpha=1 only)")),
    (True, {"one_alpha": 1.0}, FUSED),
    (True, {"one_alpha": 3.0}, _norm_skipped(
        "the Gemma norm's factor 1 + float(weight): aten.add.Tensor with alpha=3.0 (the proof "
        "holds for alpha=1 only)")),
    (False, {"mean_dtype": torch.float32}, FUSED),  # the input's dtype: the same mean
    (False, {"mean_dtype": torch.float64}, _norm_skipped(
        "the norm's variance: aten.mean.dim with dtype=torch.float64 (the proof holds for "
        "dtype=None or the input's dtype only)")),
    (False, {"mean_dim": None}, _norm_skipped(  # the mean of every element
        "the norm's variance is not mean(x^2) over the last dim")),
    (False, {"exponent": 4}, _norm_skipped(
        "the norm's variance is not mean(x^2) of the normalised x")),
    (False, {"upcast": torch.float64}, _norm_skipped("the norm is not computed in float32")),
    # No rsqrt: not a norm candidate at all (the RoPE is fused, the norm left to Inductor).
    (False, {"rsqrt_pow": True}, {"pairs_found": 1, "rewritten": 1}),
], ids=["eps-alpha-1", "eps-alpha-100", "gemma-alpha-1", "gemma-alpha-3", "mean-dtype-input",
        "mean-dtype-f64", "mean-all-dims", "pow-4", "to-f64", "rsqrt-as-pow"])
def test_norm_spelling(gemma, spelling, want):
    out, expected, *_, code, counts = _run(_norm_layer(gemma, **spelling))
    assert counts == want
    for got, ref in zip(out, expected, strict=True):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# RoPE: the rotation sums, gpt-fast's (cos, sin) picks


def _rotate(alpha_sub=None, alpha_add=None):
    """forward_native's neox rotation with ``o1``/``o2`` spelled ``torch.sub``/``torch.add``
    with the given alpha (None: the operators)."""
    def rotate(x, cos, sin, is_neox):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        x1, x2 = torch.chunk(x, 2, dim=-1)
        o1 = (x1 * cos - x2 * sin if alpha_sub is None
              else torch.sub(x1 * cos, x2 * sin, alpha=alpha_sub))
        o2 = (x2 * cos + x1 * sin if alpha_add is None
              else torch.add(x2 * cos, x1 * sin, alpha=alpha_add))
        return torch.cat((o1, o2), dim=-1)
    return rotate


def _rotate_half(alpha):
    """HF's ``x * cos + rotate_half(x) * sin`` (cos/sin ``[T, 1, rot]``, equal halves) with
    the sum spelled ``torch.add(alpha=)``."""
    def rotate(x, cos, sin, is_neox):
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.add(x * cos, torch.cat((-x2, x1), -1) * sin, alpha=alpha)
    return rotate


def _compile(fn, args, caplog):
    """(rope counters, DEBUG messages of logger rope_compile, generated code); the results
    are checked against eager."""
    expected = fn(*args)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rope_compile"), fresh_compile():
        out, codes = run_and_get_code(torch.compile(
            fn, backend="rope_compile", options={**CPU_OPTIONS, **FORCE_REWRITE}), *args)
        counts = rope_counters()
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    messages = [r.getMessage() for r in caplog.records if r.name == "rope_compile"]
    return counts, messages, "\n".join(codes)


ALPHA_1 = "(the proof holds for alpha=1 only)"


@pytest.mark.parametrize("rotate, reason", [
    (_rotate(alpha_sub=1), None),
    (_rotate(alpha_sub=2), f"aten.sub.Tensor with alpha=2 {ALPHA_1}"),
    (_rotate(alpha_add=0.5), f"aten.add.Tensor with alpha=0.5 {ALPHA_1}"),
    (_rotate_half(1), None),
    (_rotate_half(-1), f"aten.add.Tensor with alpha=-1 {ALPHA_1}"),
], ids=["sub-alpha-1", "sub-alpha-2", "add-alpha-0.5", "rotate-half-alpha-1",
        "rotate-half-alpha--1"])
def test_rotation_sum_alpha(rotate, reason, caplog):
    hf = rotate.__qualname__.startswith("_rotate_half")

    def fn(positions, q, k, cache):
        cos, sin = gather(cache, positions)
        if hf:  # HF's [T, 1, rot] tables, built once for q and k
            cos = torch.cat((cos, cos), -1).unsqueeze(-2)
            sin = torch.cat((sin, sin), -1).unsqueeze(-2)
        return (rope_heads(q, cos, sin, 128, 128, True, rotate),
                rope_heads(k, cos, sin, 128, 128, True, rotate))

    counts, messages, code = _compile(fn, (positions_for(5), *_qk(128), _cache(128)), caplog)
    if reason is None:
        assert counts.get("rewritten") == 1 and count_fused_calls(code) == 1, counts
        return
    assert "rewritten" not in counts and count_fused_calls(code) == 0, counts
    assert sum(v for k, v in counts.items() if k.startswith("missed: ")) == 2, counts
    assert any(reason in m for m in messages), messages


def _gpt_fast(view_size, pick_dim=-1):
    """gpt-fast's rotation with the (cos, sin) pair rows viewed as ``view_size(xshaped)`` and
    cos/sin picked as ``select(pick_dim, 0 / 1)`` (gpt-fast: ``(1, S, 1, rot/2, 2)``, -1)."""
    def rope(x, freqs_cis):
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
        freqs = freqs_cis.view(*view_size(xshaped))
        cos, sin = freqs.select(pick_dim, 0), freqs.select(pick_dim, 1)
        out = torch.stack([xshaped[..., 0] * cos - xshaped[..., 1] * sin,
                           xshaped[..., 1] * cos + xshaped[..., 0] * sin], -1)
        return out.flatten(3).type_as(x)
    return rope


@pytest.mark.parametrize("k_rope, reason", [
    (gpt_fast_rope, None),
    # (.., 2, rot/2) picked on dim 3: a pair's cos and sin, then the next pair's.
    (_gpt_fast(lambda x: (1, x.size(1), 1, 2, x.size(3)), pick_dim=3), ""),
    # The rows broadcast over the batch (B = S), not the sequence.
    (_gpt_fast(lambda x: (x.size(0), 1, 1, x.size(3), 2)),
     "q and k pick cos/sin from the same freqs_cis rows differently"),
], ids=["gpt-fast", "pick-on-dim-3", "rows-over-batch"])
def test_gpt_fast_picks(k_rope, reason, caplog):
    """q rotated by gpt-fast's picks; k by the same picks (fused), or by other picks of the
    same rows, which must not pair with q's: the call would rotate k by q's cos/sin."""
    freqs = precompute_freqs_cis(16, 128)

    def fn(q, k, positions):
        rows = freqs[positions]
        return gpt_fast_rope(q, rows), k_rope(k, rows)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 5, 4, 128, generator=g), torch.randn(5, 5, 2, 128, generator=g),
            torch.arange(5))
    counts, messages, code = _compile(fn, args, caplog)
    if reason is None:
        assert counts.get("rewritten") == 1, counts
        return
    assert "rewritten" not in counts and count_fused_calls(code) == 0, counts
    if reason:
        assert counts.get(f"skipped: {reason}") == 2, counts


# --------------------------------------------------------------------------------------------
# KV store: the write's accumulate and dim, the scale's division


class ScaledStoreLayer(HandWrittenLayer):
    """``k_cache[loc] = (k.float() <op> scale).to(cache dtype)`` (and v alike), ``how``:
    "div" (``/ scale``, the op's scale), "div-floor" (``torch.div(rounding_mode="floor")``),
    "mul" (``* (1 / scale)``, another rounding than the op's division), "index_copy-1"
    (``index_copy_`` along the heads dim of ``[S, Hk, D]``: not the rows)."""

    SCALE = 0.37

    def forward(self, positions, x, k_cache, v_cache, loc):
        t, hk, d = loc.shape[0], k_cache.shape[1], k_cache.shape[2]
        q, k, v = self.qkv(x).split([self.qkv.out_features - 2 * hk * d, hk * d, hk * d], -1)
        q, k = self.rope.forward_native(positions, q, k)
        k, v = k.view(t, hk, d), v.view(t, hk, d)
        if self.how == "index_copy-1":
            heads = torch.arange(hk)
            k_cache[:t].index_copy_(1, heads, k)
            v_cache[:t].index_copy_(1, heads, v)
            return q, k_cache.sum(-1)
        for cache, value in ((k_cache, k), (v_cache, v)):
            value = value.float()
            if self.how == "div":
                value = value / self.SCALE
            elif self.how == "div-floor":
                value = torch.div(value, self.SCALE, rounding_mode="floor")
            else:
                value = value * (1.0 / self.SCALE)
            cache[loc] = value.to(cache.dtype)
        return q, k_cache[loc].sum(-1)


ROPE_ONLY = {"pairs_found": 1, "rewritten": 1}
STORE_FUSED = {**ROPE_ONLY, "kv_store rewritten": 1}


def _store_skipped(reason: str) -> dict:
    return {**ROPE_ONLY, f"kv_store skipped: {reason}": 1}


@pytest.mark.parametrize("layer, want", [
    (HandWrittenLayer("index_put_"), STORE_FUSED),
    (HandWrittenLayer("accumulate"), _store_skipped(
        "the k write accumulates (index_put accumulate=True), the op overwrites")),
    (ScaledStoreLayer("div"), STORE_FUSED),
    # Not the op's division: the stored value is not read from the rotated k (no candidate).
    (ScaledStoreLayer("div-floor"), ROPE_ONLY),
    (ScaledStoreLayer("mul"), ROPE_ONLY),
    (ScaledStoreLayer("index_copy-1"), _store_skipped(
        "the k write does not address dim 0 of a [S, Hk, D] buffer or the sequence dim of a "
        "[B, Hk, L, D] one")),
], ids=["index_put", "index_put-accumulate", "div", "div-floor", "mul", "index_copy-dim-1"])
def test_store_spelling(layer, want):
    inputs = _inputs()
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = layer(*eager_inputs)
    out, code, counts = compile_and_run(layer, inputs)
    assert counts == want
    for got, ref in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
