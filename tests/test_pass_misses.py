"""Every RoPE-like subgraph the pass does not rewrite says why: one ``missed: <reason>`` counter
and one DEBUG line on logger ``rope_compile`` per RoPE (``passes/miss_report.py``).

* Rejected by the matcher: an unrelated scale on cos/sin, a rotate_half with its halves swapped,
  cos and sin swapped: one miss per RoPE, with the reason, once however many rounds the pass
  runs.
* Not RoPE (an MLP, attention without RoPE, an ``x * sin(x)`` activation): no miss.
* Rewritten (AttnStack, ``forward_native``; HF cos/sin passed in as graph inputs and HF Llama
  with dynamic NTK scaling, whose data-dependent branch breaks the graph so cos/sin arrive as
  graph inputs: their halves cannot be proven equal, so the op reads them whole): no miss.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import (
    CPU_OPTIONS,
    AttnStack,
    compile_with_misses,
    count_fused_calls,
    positions_for,
    tokens,
)
from rope_compile.passes.miss_report import looks_like_rope

from rope_compile import RotaryEmbedding, compute_cos_sin_cache

T, HQ, HK, D = 5, 4, 2, 128
MAX_POS = 64
# Graph-input cos/sin: the matcher may raise on them (a candidate error, counted apart), so these
# compile without strict; the miss is reported either way.
LENIENT = {"devices": ("cpu",)}


def _compile(fn, args, caplog, options=CPU_OPTIONS):
    """Compile ``fn`` with the rope_compile backend and compare with eager. Returns (counters,
    the ``missed:`` counters, the DEBUG lines about RoPE-like misses, generated code)."""
    return compile_with_misses(fn, args, caplog, options)


def assert_missed(missed: dict, lines: list[str], reason: str, times: int) -> None:
    """Exactly ``times`` misses, every one with ``reason``, and one DEBUG line each."""
    assert missed == {f"missed: {reason}": times}, missed
    assert len(lines) == times and all(reason in line for line in lines), lines


# --------------------------------------------------------------------------------------------
# sglang / vLLM form: cos/sin gathered from a cos_sin_cache


def _gather(cache, positions):
    return cache.index_select(0, positions).chunk(2, dim=-1)


def _rope(x, cos, sin, swap=False):
    """forward_native's neox RoPE of x ``[T, H*D]``; ``swap`` multiplies x1 by sin, x2 by cos."""
    x = x.view(x.shape[0], -1, D)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if swap:
        cos, sin = sin, cos
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(1)


def _qk_args():
    g = torch.Generator().manual_seed(0)
    cache = compute_cos_sin_cache(D, MAX_POS, 10000.0, torch.float32)
    return (positions_for(T), torch.randn(T, HQ * D, generator=g),
            torch.randn(T, HK * D, generator=g), cache)


def test_unrelated_scale_on_cos_sin(caplog):
    def fn(positions, q, k, cache):
        cos, sin = _gather(cache, positions)
        cos, sin = cos * 0.5, sin * 0.5  # not what the op computes
        return _rope(q, cos, sin), _rope(k, cos, sin)

    counts, missed, lines, code = _compile(fn, _qk_args(), caplog)
    assert count_fused_calls(code) == 0
    assert_missed(missed, lines, "cos/sin are not plain rows of a cos_sin_cache: aten.mul.Tensor "
                  "between the gather and the multiply is not followed (an unrelated scale?)", 2)
    assert not any(k.startswith("skipped: ") for k in counts), counts


def test_cos_and_sin_swapped(caplog):
    def fn(positions, q, k, cache):
        cos, sin = _gather(cache, positions)
        return _rope(q, cos, sin, swap=True), _rope(k, cos, sin, swap=True)

    _, missed, lines, _ = _compile(fn, _qk_args(), caplog)
    assert_missed(missed, lines, "cos and sin are not the first and second halves of the "
                  "cos_sin_cache rows (cos and sin swapped?)", 2)
    # The matcher's own words are in the log line too.
    assert all("[matcher: cos/sin are not the two halves" in line for line in lines), lines


def test_one_miss_beside_a_rewritten_pair_is_counted_once(caplog):
    """The pass runs a second round after rewriting; the miss is reported in the final one."""
    def fn(positions, q, k, q2, cache):
        cos, sin = _gather(cache, positions)
        return _rope(q, cos, sin), _rope(k, cos, sin), _rope(q2, cos * 0.5, sin)

    g = torch.Generator().manual_seed(1)
    positions, q, k, cache = _qk_args()
    args = (positions, q, k, torch.randn(T, HQ * D, generator=g), cache)
    counts, missed, lines, code = _compile(fn, args, caplog)
    assert counts["rewritten"] == 1 and count_fused_calls(code) == 1
    assert len(lines) == 1 and sum(missed.values()) == 1, (missed, lines)
    assert "aten.mul.Tensor between the gather and the multiply" in lines[0]


# --------------------------------------------------------------------------------------------
# HF form: x * cos + rotate_half(x) * sin, x [B, H, S, D]


def _rotate_half(x, swapped=False):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x1, x2), dim=-1) if swapped else torch.cat((-x2, x1), dim=-1)


def _hf_rope(x, cos, sin, swapped=False):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x, swapped) * sin


def _hf_tables(seq):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(seq, dtype=torch.float32)[None, :, None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _hf_args(seq=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, HQ, seq, D, generator=g), torch.randn(1, HK, seq, D, generator=g)


def test_rotate_half_with_swapped_halves(caplog):
    def fn(q, k):
        cos, sin = _hf_tables(q.shape[2])
        return _hf_rope(q, cos, sin, swapped=True), _hf_rope(k, cos, sin, swapped=True)

    _, missed, lines, code = _compile(fn, _hf_args(), caplog)
    assert count_fused_calls(code) == 0
    assert_missed(missed, lines, "rotate_half(x) does not rotate the x that multiplies cos "
                  "(halves swapped, or another tensor)", 2)


def test_hf_tables_rewritten_without_miss(caplog):
    """The same program with a correct rotate_half: rewritten, nothing missed."""
    def fn(q, k):
        cos, sin = _hf_tables(q.shape[2])
        return _hf_rope(q, cos, sin), _hf_rope(k, cos, sin)

    counts, missed, lines, _ = _compile(fn, _hf_args(), caplog)
    assert counts.get("rewritten") == 1 and not missed and not lines, counts


def test_cos_sin_graph_inputs(caplog):
    def fn(q, k, cos, sin):
        return _hf_rope(q, cos, sin), _hf_rope(k, cos, sin)

    counts, missed, lines, code = _compile(fn, (*_hf_args(), *_hf_tables(6)), caplog, LENIENT)
    assert count_fused_calls(code) == 1 and counts.get("rewritten") == 1, counts
    assert not missed and not lines, missed


def test_hf_llama_dynamic_ntk(caplog):
    """HF's dynamic NTK update branches on the positions' maximum: the graph breaks there, and
    the layers' graph takes cos/sin as inputs: read whole, one fused call per layer, no miss."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=256,
        attn_implementation="sdpa", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))

    def fn(ids):
        return model(ids).logits

    counts, missed, lines, code = _compile(fn, (ids,), caplog, LENIENT)
    assert count_fused_calls(code) == 2 and counts.get("rewritten") == 2, counts
    assert not missed and not lines, missed


# --------------------------------------------------------------------------------------------
# not RoPE: nothing reported


def _mlp(x, w1, w2, w3):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _attention(x, wq, wk, wv):
    def heads(t):
        return t.view(1, t.shape[0], 4, 32).transpose(1, 2)

    q, k, v = heads(x @ wq), heads(x @ wk), heads(x @ wv)
    o = torch.softmax(q @ k.transpose(-1, -2) * 32**-0.5, dim=-1) @ v
    return F.layer_norm(o.transpose(1, 2).reshape(x.shape[0], -1), (128,))


def _sin_activation(x, w):
    h = x @ w
    return h * torch.sin(h) + torch.cos(h) * 0.5


def _weights(*shapes):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=g) / s[0] ** 0.5 for s in shapes)


NOT_ROPE = {
    "mlp": (_mlp, (tokens(T, 128), *_weights((128, 256), (256, 128), (128, 256)))),
    "attention": (_attention, (tokens(T, 128), *_weights((128, 128), (128, 128), (128, 128)))),
    "sin_activation": (_sin_activation, (tokens(T, 128), *_weights((128, 128)))),
}


@pytest.mark.parametrize("name", list(NOT_ROPE))
def test_not_rope_reports_nothing(name, caplog):
    fn, args = NOT_ROPE[name]
    counts, missed, lines, _ = _compile(fn, args, caplog)
    assert counts == {}, counts
    assert not missed and not lines


def test_detector_ignores_x_times_sin_x():
    """``x * sin(x) + x * cos(x)``: cos/sin products, but of the same x, not of two parts."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda x: x * torch.sin(x) + x * torch.cos(x))(torch.randn(4, 8)).graph
    assert not any(looks_like_rope(node) for node in graph.nodes)
    # ...while a RoPE's two halves are each found (one sub, one add).
    cache = compute_cos_sin_cache(D, MAX_POS, 10000.0, torch.float32)
    graph = make_fx(lambda p, q: _rope(q, *_gather(cache, p)))(positions_for(T),
                                                                 torch.randn(T, D)).graph
    assert sum(1 for node in graph.nodes if looks_like_rope(node)) == 2


# --------------------------------------------------------------------------------------------
# rewritten: nothing missed


def test_rewritten_attn_stack_has_no_miss(caplog):
    model = AttnStack(num_layers=2)
    counts, missed, lines, _ = _compile(model, (positions_for(T, 512), tokens(T)), caplog)
    assert counts.get("rewritten") == 2 and not missed and not lines, counts


def test_rewritten_forward_native_has_no_miss(caplog):
    rope = RotaryEmbedding(D, D, MAX_POS, 10000.0, True, torch.float32)
    positions, q, k, _ = _qk_args()
    counts, missed, lines, _ = _compile(rope.forward_native, (positions, q, k), caplog)
    assert counts == {"pairs_found": 1, "rewritten": 1}, counts
    assert not lines
