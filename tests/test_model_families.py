"""One tiny random model per RoPE family through ``backend="rope_compile"`` (CPU, forced on).

Each family spells RoPE its own way; each is rewritten into one fused call per layer through
the same proofs as the sglang form (``passes/rope_pattern.py``), or left alone with a logged
reason. Checked for every family: fused calls in the generated code, the counters (rewritten
== layers, no candidate or pass errors), and the logits against eager (float32).

* HF ``rotate_every_two`` (GPT-J pairs, cos/sin ``repeat_interleave(f, 2, -1)``): Cohere, GLM,
  GLM4 (partial rotary 0.5), GPT-J (``embed_positions`` gathered, partial rotary).
* HF Falcon, new decoder architecture with GQA: rewritten, no candidate error.
* torchtune ``RotaryPositionalEmbeddings`` (``cache[:seq_len]`` or ``cache[input_pos]``, pairs
  of (cos, sin)), and the complex ``freqs_cis`` form of Meta Llama / torchtitan
  (``view_as_real(view_as_complex(x pairs) * freqs_cis)``): GPT-J pairs, mirrored here.
* Tables whose equal halves (or pairs) are not proven are read whole (``[R, rot]`` rows, the
  tables op computes HF's formula for any cos/sin): litgpt (mirrored; cos/sin are buffers,
  graph inputs), a hand-written HF layer with deliberately unequal halves, HF Llama with
  dynamic NTK scaling (cos/sin are graph inputs after its graph break), an interleaved
  rotation with ``cat(f, f)`` tables (pairs not equal).
* HF Gemma3 in bf16 (q_norm's fp32 -> bf16 cast feeds RoPE: the cast is the RoPE input) and
  fp32.
* mRoPE: HF Qwen2-VL / Qwen2.5-VL text decoders (the table assembled from 3 position streams
  by sections is read from the streams, ``mrope_section``), a mirror of the older
  ``apply_multimodal_rotary_pos_emb`` (``mrope_section * 2`` on ``[3, B, S, D]``), and
  near-misses of it (asymmetric sections, streams out of order) read as plain full tables.
* The complex ``freqs_cis`` form reads ``view_as_real(freqs_cis)`` in place: no table built.
"""

from __future__ import annotations

import logging
import os
from unittest import mock

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: never reach the Hub
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pass_helpers import (  # noqa: E402
    CPU_OPTIONS,
    FORCE_REWRITE,
    capture_compile,
    count_fused_calls,
    cpu_pass,
    fresh_compile,
    rope_counters,
)
from rope_compile.passes.fuse_qk_rope import find_rope_matches  # noqa: E402
from rope_compile.passes.trig_sources import (  # noqa: E402
    ComplexTables,
    FullTables,
    HalfTables,
    SectionedTables,
)
from torch import nn  # noqa: E402
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
}
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _build(model_cls, config):
    torch.manual_seed(0)
    return model_cls(config).eval()


def _ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _compile_run(fn, *args, **options):
    """(output, generated codes, rope counters) of one fresh rope_compile compile of ``fn``."""
    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = torch.compile(fn, backend="rope_compile",
                            options={**CPU_OPTIONS, **options})(*args)
    return out, codes, rope_counters()


def _check_rewritten(fn, *args, layers: int = LAYERS, tol=None, **options):
    with fresh_compile():
        expected = fn(*args)
        out, codes, counts = _compile_run(fn, *args, **options)
    assert sum(count_fused_calls(c) for c in codes) == layers, counts
    assert counts.get("rewritten") == layers, counts
    assert not {k for k in counts if "error" in k}, counts
    torch.testing.assert_close(out, expected, **(tol or TOL))
    return counts


def _sources(fn, *args) -> list:
    """The trig source of every RoPE the matcher proves in the (first) post-grad graph."""
    with fresh_compile():
        _, before, _, _ = capture_compile(fn, *args, rope_pass=cpu_pass())
    return [m.trig for m in find_rope_matches(before.graphs[0])]


def _logits(model):
    return lambda ids: model(ids).logits


# --------------------------------------------------------------------------------------------
# 1. HF rotate_every_two: GPT-J pairs with pairwise-duplicated cos/sin


def _cohere():
    return _build(transformers.CohereForCausalLM,
                  transformers.CohereConfig(**COMMON, num_key_value_heads=1))


def _glm():
    return _build(transformers.GlmForCausalLM, transformers.GlmConfig(
        **COMMON, num_key_value_heads=1, head_dim=128, pad_token_id=0))


def _glm4():
    return _build(transformers.Glm4ForCausalLM, transformers.Glm4Config(
        **COMMON, num_key_value_heads=1, head_dim=128, pad_token_id=0))


def _gptj():
    return _build(transformers.GPTJForCausalLM, transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=256, n_layer=LAYERS, n_head=2, rotary_dim=64,
        n_positions=256))


@pytest.mark.parametrize("make", [
    pytest.param(_cohere, id="cohere"),
    pytest.param(_glm, id="glm"),
    pytest.param(_glm4, id="glm4"),
    pytest.param(_gptj, id="gptj"),
])
def test_hf_rotate_every_two(make, caplog):
    model = make()
    with caplog.at_level(logging.INFO, logger="rope_compile"):
        _check_rewritten(_logits(model), _ids())
    fused = [r.getMessage() for r in caplog.records if "fused the RoPE" in r.getMessage()]
    assert len(fused) == LAYERS and all("GPT-J" in m for m in fused), fused


def test_falcon_new_decoder_gqa():
    """Falcon's new decoder architecture with GQA (k from a grouped qkv): rewritten, no
    candidate error (the op never sees an expanded k)."""
    model = _build(transformers.FalconForCausalLM, transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=512, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True))
    _check_rewritten(_logits(model), _ids())


# --------------------------------------------------------------------------------------------
# 2. mirrors of torchtune, the complex freqs_cis form and litgpt (not installed here)


class _TorchtuneRope(nn.Module):
    """torchtune ``RotaryPositionalEmbeddings`` (x ``[b, s, n_h, h_d]``)."""

    def __init__(self, dim: int, max_seq_len: int = 64, base: float = 10_000.0) -> None:
        super().__init__()
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        seq_idx = torch.arange(max_seq_len, dtype=theta.dtype)
        idx_theta = torch.einsum("i, j -> ij", seq_idx, theta).float()
        cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
        self.register_buffer("cache", cache, persistent=False)

    def forward(self, x, *, input_pos=None):
        seq_len = x.size(1)
        rope_cache = self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
        rope_cache = rope_cache.view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out = torch.stack([
            xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
            xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
        ], -1)
        return x_out.flatten(3).type_as(x)


def _polar_freqs_cis(dim: int, end: int, theta: float = 10_000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    freqs = torch.outer(torch.arange(end), freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def _complex_rope(xq, xk, freqs_cis):
    """Meta Llama's ``apply_rotary_emb`` (``reshape_for_broadcast`` included)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    shape = [d if i in (1, xq_.ndim - 1) else 1 for i, d in enumerate(xq_.shape)]
    freqs_cis = freqs_cis.view(*shape)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class _Attn(nn.Module):
    """q/k/v projections ``[b, s, h, d]``, RoPE by ``style``, GQA SDPA, o projection."""

    def __init__(self, style: str, hidden: int = 256, heads: int = 2, kv_heads: int = 1,
                 head_dim: int = 128) -> None:
        super().__init__()
        self.style, self.h, self.hk, self.d = style, heads, kv_heads, head_dim
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        if style == "torchtune":
            self.pos = _TorchtuneRope(head_dim)

    def forward(self, x, rope_arg):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d)
        k = self.k(x).view(b, s, self.hk, self.d)
        v = self.v(x).view(b, s, self.hk, self.d)
        if self.style == "torchtune":
            q, k = self.pos(q, input_pos=rope_arg), self.pos(k, input_pos=rope_arg)
        else:
            q, k = _complex_rope(q, k, rope_arg)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class _Mirror(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.style = style
        self.layers = nn.ModuleList(_Attn(style) for _ in range(LAYERS))
        self.register_buffer("freqs_cis", _polar_freqs_cis(128, 64), persistent=False)

    def forward(self, x, input_pos=None, start_pos: int = 0):
        if self.style == "complex":
            rope_arg = self.freqs_cis[start_pos:start_pos + x.shape[1]]
        else:
            rope_arg = input_pos
        for layer in self.layers:
            x = x + layer(x, rope_arg)
        return x


def _hidden(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 7, 256, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("input_pos", [None, torch.tensor([3, 1, 4, 1, 5, 9, 2])],
                         ids=["slice", "input_pos"])
def test_torchtune(input_pos):
    _check_rewritten(_Mirror("torchtune").eval(), _hidden(), input_pos)


def test_complex_freqs_cis():
    """cos/sin = real/imag of ``view_as_real(freqs_cis)``, read in place (column stride 2):
    no ``[T, rot]`` table is built."""
    counts = _check_rewritten(_Mirror("complex").eval(), _hidden(), None, 3)
    assert "tables built" not in counts, counts
    assert all(isinstance(t, ComplexTables) for t in _sources(_Mirror("complex").eval(),
                                                               _hidden(), None, 3))


# litgpt: cos/sin from build_rope_cache, kept as buffers and sliced [:T] in forward.


def _litgpt_cache(seq_len: int, n_elem: int, base: float = 10_000.0):
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2).float() / n_elem))
    idx_theta = torch.outer(torch.arange(seq_len).float(), theta)
    idx_theta = torch.cat([idx_theta, idx_theta], dim=-1)
    return torch.cos(idx_theta), torch.sin(idx_theta)


def _litgpt_apply_rope(x, cos, sin):
    head_size = x.size(-1)
    x1 = x[..., : head_size // 2]
    x2 = x[..., head_size // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    if cos.dim() > 1:
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    roped = (x * cos) + (rotated * sin)
    return roped.to(dtype=x.dtype)


class _LitgptAttention(nn.Module):
    def __init__(self, hidden=256, heads=2, groups=1, head_size=128, n_elem=64) -> None:
        super().__init__()
        self.h, self.g, self.hs, self.n_elem = heads, groups, head_size, n_elem
        self.attn = nn.Linear(hidden, (heads + 2 * groups) * head_size, bias=False)
        self.proj = nn.Linear(heads * head_size, hidden, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q_per_kv = self.h // self.g
        qkv = self.attn(x).view(b, t, self.g, q_per_kv + 2, self.hs).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=2)
        q, k, v = (z.reshape(b, -1, t, self.hs) for z in (q, k, v))
        q_roped = _litgpt_apply_rope(q[..., : self.n_elem], cos, sin)
        k_roped = _litgpt_apply_rope(k[..., : self.n_elem], cos, sin)
        q = torch.cat((q_roped, q[..., self.n_elem:]), dim=-1)
        k = torch.cat((k_roped, k[..., self.n_elem:]), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class _Litgpt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_LitgptAttention() for _ in range(LAYERS))
        cos, sin = _litgpt_cache(64, 64)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        t = x.size(1)
        cos, sin = self.cos[:t], self.sin[:t]
        for layer in self.layers:
            x = x + layer(x, cos, sin)
        return x


def test_litgpt_buffers_read_as_full_tables(caplog):
    """litgpt's cos/sin are buffers (graph inputs): their equal halves cannot be proven, so
    the op reads all rot columns of them in place (``[T, rot]`` rows of ``cos[:T]``)."""
    with caplog.at_level(logging.DEBUG, logger="rope_compile"):
        counts = _check_rewritten(_Litgpt().eval(), _hidden())
    assert "tables built" not in counts, counts
    full = [r.getMessage() for r in caplog.records if "reads full cos/sin tables" in
            r.getMessage()]
    assert len(full) == LAYERS and all("graph input" in m for m in full), full
    sources = _sources(_Litgpt().eval(), _hidden())
    assert len(sources) == 2 * LAYERS and all(isinstance(t, FullTables) for t in sources)


# --------------------------------------------------------------------------------------------
# unequal halves: HF's formula for any cos/sin, read as full tables


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _UnequalHalvesLayer(nn.Module):
    """An HF-style attention layer whose cos/sin halves differ on purpose (angles
    ``cat(f, 1.5 f)``): ``q * cos + rotate_half(q) * sin`` is then not one-table RoPE, but the
    tables op computes exactly that from full ``[R, rot]`` rows."""

    def __init__(self, hidden: int = 256, heads: int = 2, head_dim: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.h, self.d = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        inv_freq = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        freqs = torch.arange(s, device=x.device).float()[:, None] * self.inv_freq
        angles = torch.cat((freqs, 1.5 * freqs), dim=-1)[None]  # [1, S, D], unequal halves
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        q, k, v = (t.view(b, s, self.h, self.d).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def test_hf_layer_with_unequal_halves_rewritten_exactly():
    layer = _UnequalHalvesLayer().eval()
    _check_rewritten(layer, _hidden(), layers=1)
    sources = _sources(layer, _hidden())
    assert len(sources) == 2 and all(isinstance(t, FullTables) for t in sources), sources
    assert "cat((f, f), -1)" in sources[0].why, sources[0].why


def test_hf_llama_dynamic_ntk_rewritten():
    """HF's dynamic NTK update branches on the positions' maximum: the graph breaks there,
    and the layers' graph takes cos/sin as inputs, read as full tables."""
    model = _build(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **COMMON, num_key_value_heads=1, head_dim=128, attn_implementation="sdpa",
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    _check_rewritten(_logits(model), _ids())


# --------------------------------------------------------------------------------------------
# HF Gemma3: q_norm's fp32 -> bf16 cast feeds RoPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemma3(dtype):
    """In bf16, Gemma3's RMSNorm computes in fp32 and casts back: the cast (bf16, what eager
    rotates) is the RoPE input. Rewritten in both dtypes; bf16 within bf16 rounding of eager
    (what plain Inductor shows too)."""
    model = _build(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **COMMON, num_key_value_heads=1, head_dim=128, sliding_window=4)).to(dtype)
    tol = TOL if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    _check_rewritten(_logits(model), _ids(), tol=tol)
    if dtype == torch.bfloat16:  # the rewrite is as close to eager as plain Inductor
        with fresh_compile():
            expected = _logits(model)(_ids())
            plain = torch.compile(_logits(model))(_ids())
            ours, _, _ = _compile_run(_logits(model), _ids())
        plain_err = (plain.float() - expected.float()).abs().max()
        ours_err = (ours.float() - expected.float()).abs().max()
        assert ours_err <= 2 * plain_err + 1e-2, (ours_err, plain_err)


# --------------------------------------------------------------------------------------------
# mRoPE


def _mrope_positions(batch: int = 2, seq: int = 7) -> torch.Tensor:
    """``[3, B, S]`` position streams that differ (temporal, height, width of a grid)."""
    t = torch.arange(seq)
    return torch.stack([t, t // 2, t % 3])[:, None].expand(3, batch, seq).contiguous()


@pytest.mark.parametrize("name", ["Qwen2VL", "Qwen2_5_VL"])
def test_hf_qwen_vl_text_mrope(name):
    """The text decoder of HF Qwen2-VL / Qwen2.5-VL: cos/sin assembled from 3 position streams
    by ``mrope_section`` (then duplicated): read from the ``[3, B, S, rot/2]`` streams with
    ``mrope_section`` (pair tables), equal to eager."""
    config = getattr(transformers, f"{name}TextConfig")(
        **COMMON, num_key_value_heads=1, rope_scaling={
            "rope_type": "default", "mrope_section": [16, 24, 24]})
    model = _build(getattr(transformers, f"{name}TextModel"), config)

    def fn(ids, positions):
        return model(input_ids=ids, position_ids=positions).last_hidden_state

    _check_rewritten(fn, _ids(), _mrope_positions())
    sources = _sources(fn, _ids(), _mrope_positions())
    assert len(sources) == 2 * LAYERS and all(
        isinstance(t, SectionedTables) and t.sections == (16, 24, 24) and not t.full_width
        for t in sources), sources


def _assembled(t, sizes, order=lambda i: i % 3):
    """``apply_multimodal_rotary_pos_emb``'s table: chunk i of the split picks stream
    ``order(i)``."""
    return torch.cat([m[order(i)] for i, m in enumerate(t.split(sizes, dim=-1))], dim=-1)


class _MropeLayer(nn.Module):
    """The older HF ``apply_multimodal_rotary_pos_emb``: cos/sin ``[3, B, S, D]`` split by
    ``mrope_section * 2`` on the last dim, chunk i from stream i % 3, concatenated.
    ``angles``: ``"duplicated"`` (``cat(f, f)``: per-stream halves equal) or ``"unequal"``;
    ``sizes`` / ``order``: the split and the stream picks (near-misses)."""

    def __init__(self, sizes=(16, 24, 24, 16, 24, 24), order=lambda i: i % 3,
                 angles: str = "duplicated", hidden: int = 256, heads: int = 2,
                 head_dim: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sizes, self.order, self.angles = list(sizes), order, angles
        self.h, self.d = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        inv_freq = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, positions):
        b, s, _ = x.shape
        freqs = positions[..., None].float() * self.inv_freq  # [3, B, S, D/2]
        second = freqs if self.angles == "duplicated" else 1.5 * freqs
        emb = torch.cat((freqs, second), dim=-1)  # [3, B, S, D]
        cos = _assembled(emb.cos(), self.sizes, self.order).unsqueeze(1)
        sin = _assembled(emb.sin(), self.sizes, self.order).unsqueeze(1)
        q, k, v = (t.view(b, s, self.h, self.d).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("angles,full", [("duplicated", False), ("unequal", True)])
def test_mrope_sections_times_two(angles, full):
    """Sections proven (split sizes ``sections * 2``, stream i % 3, in order): the op reads
    the ``[3, B, S, D]`` streams with ``mrope_section``, rot/2 columns when every stream's
    halves are proven equal, all rot columns otherwise. Equal to eager either way."""
    layer = _MropeLayer(angles=angles).eval()
    _check_rewritten(layer, _hidden(), _mrope_positions(), layers=1)
    sources = _sources(layer, _hidden(), _mrope_positions())
    assert len(sources) == 2 and all(
        isinstance(t, SectionedTables) and t.sections == (16, 24, 24) and t.full_width == full
        for t in sources), sources


@pytest.mark.parametrize("sizes,order", [
    pytest.param((16, 24, 24, 24, 16, 24), lambda i: i % 3, id="asymmetric-sections"),
    pytest.param((16, 24, 24, 16, 24, 24), lambda i: (i + 1) % 3, id="streams-rotated"),
    pytest.param((16, 24, 24, 16, 24, 24), lambda i: 0 if i < 3 else i % 3,
                 id="streams-mixed"),
])
def test_mrope_near_misses_read_as_plain_full_tables(sizes, order):
    """Sections that do not repeat symmetrically, or chunks that do not pick stream i % 3:
    never read as mRoPE streams (a wrong section would be read); the assembled table itself
    is read as a plain full table, exactly."""
    layer = _MropeLayer(sizes, order).eval()
    _check_rewritten(layer, _hidden(), _mrope_positions(), layers=1)
    sources = _sources(layer, _hidden(), _mrope_positions())
    assert len(sources) == 2 and all(isinstance(t, FullTables) for t in sources), sources


# --------------------------------------------------------------------------------------------
# 3. interleaved tables


def _every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _interleaved_with(duplicate):
    """q/k ``[B, H, S, D]`` rotated with ``rotate_every_two``, cos/sin from ``duplicate(f)``."""

    def fn(q, k, inv_freq):
        freqs = torch.arange(q.shape[2]).float()[:, None] * inv_freq
        emb = duplicate(freqs)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        return q * cos + _every_two(q) * sin, k * cos + _every_two(k) * sin

    return fn


def _qk_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, 5, 128, generator=g), torch.randn(1, 1, 5, 128, generator=g),
            torch.rand(64, generator=g))


def test_interleaved_rewritten_with_repeat_interleave():
    fn = _interleaved_with(lambda f: torch.repeat_interleave(f, 2, dim=-1))
    _check_rewritten(fn, *_qk_inputs(), layers=1)


def test_interleaved_with_cat_tables_read_as_full_tables():
    """``cat(f, f)`` tables have equal halves, not equal pairs: not one-table GPT-J RoPE, but
    exactly what the tables op computes from full ``[R, rot]`` rows (GPT-J columns)."""
    fn = _interleaved_with(lambda f: torch.cat((f, f), dim=-1))
    _check_rewritten(fn, *_qk_inputs(), layers=1)
    sources = _sources(fn, *_qk_inputs())
    assert len(sources) == 2 and all(isinstance(t, FullTables) for t in sources), sources
    assert "columns 2i and 2i+1 are not proven equal" in sources[0].why


def test_equal_halves_keep_pair_tables():
    """Proven equal halves keep reading rot/2 columns (half the table reads)."""
    model = _build(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **COMMON, num_key_value_heads=1, head_dim=128, attn_implementation="sdpa"))
    sources = _sources(_logits(model), _ids())
    assert len(sources) == 2 * LAYERS and all(isinstance(t, HalfTables) for t in sources)


# --------------------------------------------------------------------------------------------
# every family on the GPU, default options (the Inductor lowering launches the kernels)


def _falcon_gqa():
    return _build(transformers.FalconForCausalLM, transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=512, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True))


def _hf(make, dtype=torch.float32):
    """An HF causal LM from ``make`` as (module, its logits function, inputs)."""
    def case():
        model = make().to(dtype)
        return model, _logits(model), (_ids(),)
    return case


def _module(make, *args):
    def case():
        model = make().eval()
        return model, model, (_hidden(), *args)
    return case


def _qwen_vl(name):
    def case():
        config = getattr(transformers, f"{name}TextConfig")(
            **COMMON, num_key_value_heads=1, rope_scaling={
                "rope_type": "default", "mrope_section": [16, 24, 24]})
        model = _build(getattr(transformers, f"{name}TextModel"), config)

        def fn(ids, positions):
            return model(input_ids=ids, position_ids=positions).last_hidden_state
        return model, fn, (_ids(), _mrope_positions())
    return case


def _gemma3():
    return _build(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **COMMON, num_key_value_heads=1, head_dim=128, sliding_window=4))


def _dynamic_ntk_llama():
    return _build(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **COMMON, num_key_value_heads=1, head_dim=128, attn_implementation="sdpa",
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


GPU_CASES = {
    "cohere": (_hf(_cohere), LAYERS), "glm": (_hf(_glm), LAYERS),
    "glm4": (_hf(_glm4), LAYERS), "gptj": (_hf(_gptj), LAYERS),
    "falcon_gqa": (_hf(_falcon_gqa), LAYERS),
    "torchtune_slice": (_module(lambda: _Mirror("torchtune"), None), LAYERS),
    "torchtune_input_pos": (_module(lambda: _Mirror("torchtune"),
                                    torch.tensor([3, 1, 4, 1, 5, 9, 2])), LAYERS),
    "complex_freqs_cis": (_module(lambda: _Mirror("complex"), None, 3), LAYERS),
    "litgpt": (_module(_Litgpt), LAYERS),
    "unequal_halves": (_module(_UnequalHalvesLayer), 1),
    "llama_dynamic_ntk": (_hf(_dynamic_ntk_llama), LAYERS),
    "gemma3_fp32": (_hf(_gemma3), LAYERS),
    "gemma3_bf16": (_hf(_gemma3, torch.bfloat16), LAYERS),
    "qwen2_vl": (_qwen_vl("Qwen2VL"), LAYERS), "qwen2_5_vl": (_qwen_vl("Qwen2_5_VL"), LAYERS),
}


# The rewrite forced (FORCE_REWRITE) where the layout-copy rule would leave a pair to Inductor
# (GPT-J's partial rotary on CUDA: its rotated halves are read only by the cat that rejoins the
# heads): this checks the rewrite itself on the GPU.
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_family_on_gpu(case, gpu_device):
    """Each family compiled on the GPU (default options, the rewrite forced): rewritten once
    per layer, no candidate or pass errors, equal to eager (fp32; bf16 Gemma3 within bf16
    rounding, as close as plain Inductor)."""
    make, layers = GPU_CASES[case]
    model, fn, args = make()
    model.to(gpu_device)
    args = tuple(a.to(gpu_device) if isinstance(a, torch.Tensor) else a for a in args)
    with fresh_compile(), torch.no_grad():
        expected = fn(*args)
        out = torch.compile(fn, backend="rope_compile", options=FORCE_REWRITE)(*args)
        counts = rope_counters()
        plain = torch.compile(fn)(*args) if case.endswith("bf16") else None
    assert counts.get("rewritten") == layers, counts
    assert not {k for k in counts if "error" in k}, counts
    if plain is None:
        torch.testing.assert_close(out, expected, **TOL)
    else:
        plain_err = (plain.float() - expected.float()).abs().max()
        ours_err = (out.float() - expected.float()).abs().max()
        assert ours_err <= 2 * plain_err + 1e-2, (ours_err, plain_err)
