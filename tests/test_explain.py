"""``rope_compile.explain``: per graph, each RoPE pair fused (with its source line and what was
fused with it), each skip with the option that would lift it, each miss with its reason; on an
HF model, an sglang-style model, a model with misses, and across a graph break. Also the log
lines the same events give (the node's source line, the option)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from pass_helpers import QKVRope, positions_for, tokens
from rope_compile.passes.events import PassEvent, option_hint, record, recording

import rope_compile
from rope_compile.demo import TinyDecoder, decode_inputs
from rope_compile.explain_report import ExplainReport
from rope_compile.reference import compute_cos_sin_cache

T, D = 5, 128
HERE = os.path.basename(__file__)


def _explain(model, *args, **kwargs) -> ExplainReport:
    with torch.no_grad():
        return rope_compile.explain(model, *args, **kwargs)


def test_hf_llama():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    report = _explain(model, torch.randint(0, 96, (1, 5)), options={"devices": ("cpu",)})

    assert len(report.graphs) == 1 and len(report.fused) == 2
    assert not report.skipped and not report.missed
    for rope in report.fused:
        assert rope.detail == "rotary_dim=128, head_size=128, neox"
        assert "modeling_llama.py" in rope.q_source and "q_embed = " in rope.q_source
        assert "k_embed = " in rope.k_source
        assert list(rope.fused_with) == ["trig_in_kernel"]  # HF's fp32 freqs: trig in kernel
    assert report.graphs[0].counters == {"pairs_found": 2, "rewritten": 2,
                                         "trig_in_kernel rewritten": 2}
    text = str(report)
    assert text.startswith('rope_compile.explain (options={"devices": ("cpu",)}): 1 graph, '
                           "2 RoPE pairs fused, 0 skipped, 0 missed")
    assert "fused with it: trig in kernel" in text


def test_sglang_style_decoder_with_qk_norm_and_kv_store():
    """rope_compile.demo's decoder: sglang's RotaryEmbedding.forward_native with per-head q/k
    RMSNorm and the KV-cache store of FusedSetKVBufferArg."""
    layers, seqs, length = 2, 4, 16
    torch.manual_seed(0)
    model = TinyDecoder(layers=layers, vocab=64).eval()
    caches = [[torch.randn(seqs * length, 2, D) for _ in range(layers)] for _ in range(2)]
    report = _explain(model, *decode_inputs(0, seqs, length, 64, "cpu"), *caches,
                      options={"devices": ("cpu",)})

    assert len(report.fused) == layers and not report.skipped and not report.missed
    for rope in report.fused:
        assert list(rope.fused_with) == ["qk_norm", "kv_store"], rope
        assert "fused_qk_norm_rope_kv_store_inplace" in rope.fused_with["kv_store"]
        # The model's line that calls the drop-in, not the drop-in's own.
        assert "demo.py" in rope.q_source and "self.rope.forward_native(" in rope.q_source
    assert "fused with it: QK-norm, KV store" in str(report)


def _rope(x, cos, sin):
    x = x.view(x.shape[0], -1, D)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(1)


def _qk_args():
    g = torch.Generator().manual_seed(0)
    cache = compute_cos_sin_cache(D, 64, 10000.0, torch.float32)
    return (positions_for(T), torch.randn(T, 2 * D, generator=g),
            torch.randn(T, D, generator=g), cache)


def test_misses_beside_a_fused_pair():
    def fn(positions, q, k, cache):
        cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
        fused = _rope(q, cos, sin), _rope(k, cos, sin)
        cos, sin = cos * 0.5, sin * 0.5  # an unrelated scale: not a RoPE the op computes
        return *fused, _rope(q, cos, sin), _rope(k, cos, sin)

    report = _explain(fn, *_qk_args(), options={"devices": ("cpu",)})
    assert len(report.fused) == 1 and len(report.missed) == 2 and not report.skipped
    for miss in report.missed:
        assert miss.fusion == "rope" and miss.option is None
        assert miss.reason.startswith("cos/sin are not plain rows of a cos_sin_cache: "
                                      "aten.mul.Tensor between the gather and the multiply")
        assert HERE in miss.source and "return torch.cat((x1 * cos" in miss.source
    text = str(report)
    assert "RoPE missed at " in text and "option: no option changes this" in text


def test_skip_names_the_option_that_lifts_it():
    model, args = QKVRope(head_size=64), (positions_for(T), tokens(T))
    report = _explain(model, *args)  # default options: head sizes (128, 256, 512), GPUs only
    (skip,) = report.skipped
    assert skip.reason == "head_size 64 not in (128, 256, 512)"
    assert skip.option == {"head_sizes": (64, 128, 256, 512), "devices": ("xpu", "cuda", "cpu")}
    assert HERE not in skip.source and "pass_helpers.py" in skip.source
    assert ('option: options={"head_sizes": (64, 128, 256, 512), '
            '"devices": ("xpu", "cuda", "cpu")}') in str(report)
    # ... and it does.
    again = _explain(model, *args, options=skip.option)
    assert len(again.fused) == 1 and not again.skipped


def test_one_report_per_graph_across_a_graph_break():
    def fn(positions, q, k, cache):
        cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
        first = _rope(q, cos, sin), _rope(k, cos, sin)
        torch._dynamo.graph_break()
        cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
        return first, (_rope(q, cos, sin), _rope(k, cos, sin))

    report = _explain(fn, *_qk_args(), options={"devices": ("cpu",)})
    assert [len(g.fused) for g in report.graphs] == [1, 1]
    assert report.graphs[0].break_reason == "Call to `torch._dynamo.graph_break()`"
    assert report.graphs[1].break_reason is None
    text = str(report)
    assert "graph break: Call to `torch._dynamo.graph_break()`\n" in text
    assert "graph 1: 1 RoPE pair fused" in text


def test_bad_option_fails_before_running():
    ran = []
    with pytest.raises(ValueError, match="`head_size`"):
        rope_compile.explain(lambda x: ran.append(x), 1, options={"head_size": (64,)})
    assert not ran


def test_log_lines_name_the_source_and_the_option(caplog):
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="rope_compile"):
        torch._dynamo.reset()
        torch.compile(QKVRope(head_size=64), backend=rope_compile.backend(
            devices=("cpu",), force_disable_caches=True))(positions_for(T), tokens(T))
        torch._dynamo.reset()
    (line,) = [r.getMessage() for r in caplog.records if "not rewriting RoPE" in r.getMessage()]
    assert "pass_helpers.py:" in line and "self.rope.forward_native(" in line
    assert line.endswith('head_size 64 not in (128, 256, 512); to rewrite it: '
                         'options={"head_sizes": (64, 128, 256, 512)}')


def test_events_only_while_recording():
    node = torch.fx.Graph().placeholder("x")
    record("skipped", "rope", (node,), "head_size 64 not in (128,)")  # nobody listens: dropped
    with recording() as outer, recording() as inner:
        record("skipped", "rope", (node,), "head_size 64 not in (128,)")
    assert outer == inner == [PassEvent("skipped", "rope", ("x",), (None,),
                                        "head_size 64 not in (128,)")]
    assert option_hint(outer[0].reason) == 'options={"head_sizes": (64, 128)}'
