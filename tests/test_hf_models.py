"""Hugging Face models (random init, no downloads) through the ``rope_compile`` backend on CPU.

The rewrite is forced on for CPU graphs (``options={"devices": ("cpu",), "strict": True}``).
HF spells RoPE as ``q * cos + rotate_half(q) * sin`` on ``[B, H, S, D]`` views, with per-token
cos/sin tables (duplicated halves, broadcast over the batch) computed by the model's rotary
module; the pass turns each layer's Q/K pair into one fused in-place call.

* Llama (head_dim 128, GQA 2:1): one fused call per layer, logits equal to eager, and neither
  graph breaks, graphs nor copy kernels beyond plain Inductor's.
* Partial rotary (``q[..., :rot]`` rotated, ``q[..., rot:]`` concatenated back): Phi and StableLM
  are rewritten (rotary_dim 64 of 128), and so is GPT-NeoX, whose q/k/v are split per head
  from one projection (``chunk(3, -1)``).
* head_dim 64: left alone, the reason counted and logged.
* Dynamic sequence length (seq 5, 9, 17): rewritten with automatic dynamic shapes (one
  recompile) and with ``dynamic=True``, with or without ``specialize_float`` (no recompile).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from unittest import mock

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: never reach the Hub
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from pass_helpers import (  # noqa: E402
    CPU_OPTIONS,
    copy_kinds,
    count_fused_calls,
    fresh_compile,
    rope_counters,
)
from torch._dynamo.utils import counters  # noqa: E402
from torch._inductor.graph import GraphLowering  # noqa: E402

VOCAB = 96
LAYERS = 2
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "max_position_embeddings": 256,
    "attn_implementation": "sdpa",
}
LOGITS_TOL = {"atol": 1e-4, "rtol": 1e-4}


def _llama(**overrides):
    config = transformers.LlamaConfig(
        **{**COMMON, "num_key_value_heads": 1, "head_dim": 128, **overrides})
    return _build(transformers.LlamaForCausalLM, config)


def _build(model_cls, config):
    torch.manual_seed(0)
    return model_cls(config).eval()


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


@dataclass
class Run:
    logits: torch.Tensor
    codes: list[str]
    rope: dict[str, int]
    graph_breaks: int
    graphs: int

    @property
    def fused_calls(self) -> int:
        return sum(count_fused_calls(code) for code in self.codes)

    @property
    def copies(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for code in self.codes:
            for kind, n in copy_kinds(code).items():
                total[kind] = total.get(kind, 0) + n
        return total


class _Codes:
    """Collects the wrapper code of every graph Inductor compiles (without a dynamo reset, unlike
    ``run_and_get_code``)."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    def __enter__(self) -> list[str]:
        self._patch = mock.patch.object(GraphLowering, "save_output_code", self.codes.append)
        self._patch.start()
        return self.codes

    def __exit__(self, *exc) -> None:
        self._patch.stop()


def _compiled(model, backend: str, **compile_kwargs):
    if backend == "rope_compile":
        return torch.compile(model, backend="rope_compile", options=dict(CPU_OPTIONS),
                             **compile_kwargs)
    return torch.compile(model, **compile_kwargs)


def _run(model, ids: torch.Tensor, backend: str) -> Run:
    """One fresh compile of ``model`` with ``backend``, run on ``ids`` (inside fresh_compile)."""
    torch._dynamo.reset()
    counters.clear()
    with _Codes() as codes:
        logits = _compiled(model, backend)(ids).logits
    return Run(logits, codes, rope_counters(), sum(counters["graph_break"].values()),
               counters["stats"]["unique_graphs"])


def _check_rewritten(model, ids: torch.Tensor, rope_log: str, caplog) -> None:
    """One fused call per layer, logits equal eager, nothing worse than plain Inductor."""
    with fresh_compile():
        expected = model(ids).logits
        with caplog.at_level(logging.INFO, logger="rope_compile"):
            rope = _run(model, ids, "rope_compile")
        assert rope.fused_calls == LAYERS, rope.rope
        # HF's rotary chain is then computed in the kernel from the angles (the last pass), or,
        # where the scale is a traced tensor (dynamic=True), left as tables with its reason.
        trig = {k: v for k, v in rope.rope.items() if k.startswith("trig_in_kernel")}
        assert list(trig.values()) == [LAYERS], rope.rope
        assert {k: v for k, v in rope.rope.items() if k not in trig} == {
            "pairs_found": LAYERS, "rewritten": LAYERS}, rope.rope
        fused = [r.getMessage() for r in caplog.records if r.name == "rope_compile"
                 and "fused the RoPE" in r.getMessage()]
        assert len(fused) == LAYERS and all(rope_log in m for m in fused), fused
        torch.testing.assert_close(rope.logits, expected, **LOGITS_TOL)
        plain = _run(model, ids, "inductor")
    torch.testing.assert_close(plain.logits, expected, **LOGITS_TOL)
    assert plain.fused_calls == 0 and plain.rope == {}
    # The backend sees Dynamo's graphs: same graph breaks, same number of graphs.
    assert (rope.graph_breaks, rope.graphs) == (plain.graph_breaks, plain.graphs) == (0, 1)
    # No clone/copy kernel (e.g. as_strided_clone from a failed reinplace) beyond Inductor's own.
    assert all(rope.copies[k] <= plain.copies[k] for k in rope.copies), (rope.copies,
                                                                        plain.copies)


# --------------------------------------------------------------------------------------------
# 1. Llama, full rotary


@pytest.mark.parametrize("batch,seq", [(1, 5), (2, 7)], ids=["b1s5", "b2s7"])
def test_llama(batch, seq, caplog):
    _check_rewritten(_llama(), _ids(batch, seq), "rotary_dim=128, head_size=128, neox", caplog)


# --------------------------------------------------------------------------------------------
# 2. partial rotary: q[..., :rot] rotated with rotate_half, cat((q_embed, q[..., rot:]), -1)


def _phi():
    config = transformers.PhiConfig(**COMMON, num_key_value_heads=1, partial_rotary_factor=0.5)
    return _build(transformers.PhiForCausalLM, config)


def _stablelm():
    config = transformers.StableLmConfig(**COMMON, num_key_value_heads=1,
                                         partial_rotary_factor=0.5)
    return _build(transformers.StableLmForCausalLM, config)


def _gpt_neox():
    # rotate_half spelling with q_rot / q_pass inside apply_rotary_pos_emb.
    return _build(transformers.GPTNeoXForCausalLM,
                  transformers.GPTNeoXConfig(**COMMON, rotary_pct=0.5))


@pytest.mark.parametrize("make", [
    pytest.param(_phi, id="phi"),
    pytest.param(_stablelm, id="stablelm"),
    pytest.param(_gpt_neox, id="gpt_neox"),
])
def test_partial_rotary(make, caplog):
    _check_rewritten(make(), _ids(2, 7), "rotary_dim=64, head_size=128, neox", caplog)


# --------------------------------------------------------------------------------------------
# 3. head_dim 64: not a head size the pass rewrites by default


def test_llama_head_dim_64_left_alone(caplog):
    model = _llama(num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ids = _ids(1, 5)
    with fresh_compile(), caplog.at_level(logging.DEBUG, logger="rope_compile"):
        expected = model(ids).logits
        run = _run(model, ids, "rope_compile")
    assert run.fused_calls == 0
    assert run.rope == {"pairs_found": LAYERS,
                        "skipped: head_size 64 not in (128, 256, 512)": LAYERS}
    skips = [r.getMessage() for r in caplog.records if r.name == "rope_compile"
             and r.levelno == logging.DEBUG and "not rewriting RoPE" in r.getMessage()]
    assert len(skips) == LAYERS and all("head_size 64 not in" in m for m in skips), skips
    torch.testing.assert_close(run.logits, expected, **LOGITS_TOL)


# --------------------------------------------------------------------------------------------
# 4. dynamic sequence length


@pytest.mark.parametrize("dynamic,specialize_float,graphs", [
    # dynamic=True traces the rotary module's float scale as a 0-d tensor input: still matched.
    pytest.param(True, False, 1, id="dynamic-true"),
    pytest.param(True, True, 1, id="dynamic-true-specialize-float"),
    # Automatic dynamic: the first graph is static (seq 5); seq 9 recompiles once with a
    # symbolic seq, which seq 17 reuses.
    pytest.param(None, False, 2, id="automatic-dynamic"),
])
def test_llama_dynamic_seq(dynamic, specialize_float, graphs):
    """Seq 5, 9, 17 (batch 1): equal to eager each time, ``graphs`` Dynamo graphs in all (no
    recompile with dynamic=True), every graph rewritten (one fused call per layer)."""
    model = _llama()
    with fresh_compile(), torch._dynamo.config.patch(specialize_float=specialize_float):
        compiled = _compiled(model, "rope_compile", dynamic=dynamic)
        with _Codes() as codes:
            for seq in (5, 9, 17):
                ids = _ids(1, seq, seed=seq)
                torch.testing.assert_close(compiled(ids).logits, model(ids).logits,
                                           **LOGITS_TOL)
                # Every graph compiled so far is rewritten.
                assert [count_fused_calls(code) for code in codes] == [LAYERS] * len(codes), (
                    seq, rope_counters())
        assert counters["stats"]["unique_graphs"] == len(codes) == graphs
        counts = rope_counters()
        # The cos/sin chain is computed in the kernel where its scale is a number; under
        # dynamic=True without specialize_float the scale is a traced tensor (a counted skip).
        trig = {k: v for k, v in counts.items() if k.startswith("trig_in_kernel")}
        assert sum(trig.values()) == LAYERS * graphs, counts
        assert {k: v for k, v in counts.items() if k not in trig} == {
            "pairs_found": LAYERS * graphs, "rewritten": LAYERS * graphs}, counts
