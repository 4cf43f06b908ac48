"""RoPE spellings from the field: each is rewritten once per layer with eager's values, or its
miss is counted (``missed: <reason>``) and logged on ``rope_compile`` at DEBUG.

* HF ``q * cos + rotate_half(q) * sin`` with cos/sin already shaped ``[1, 1, S, D]``: graph
  inputs, module buffers (whole or sliced) and module globals (no ``unsqueeze`` in the graph;
  read in place by the tables op as ``[S, D]`` rows).
* litgpt's ``apply_rope``: older releases and nanoGPT forks broadcast ``cos[:T]`` (or
  ``cos.index_select(0, input_pos)``) as a 2-D ``[T, D]`` table; litgpt 0.5.x reaches it through
  ``cos[:T].unsqueeze(0)`` (or ``index_select(...).unsqueeze(0)``) and ``.view(1, 1, T, n)``.

The miss report covers every one of these forms: with a broken rotation (halves swapped) each is
a counted miss with one DEBUG line, never silent.
"""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn.functional as F
from pass_helpers import (
    CPU_OPTIONS,
    check_fused,
    check_missed,
    compile_with_misses,
    with_call_count,
)
from torch import nn

B, T, HIDDEN, HQ, HK, D = 1, 6, 64, 4, 2, 128
MAX_POS = 16
LAYERS = 2
# Misses on graph-input tables may raise inside the matcher (a candidate error, counted apart);
# these compile without strict, and the miss is reported either way.
LENIENT = {"devices": ("cpu",)}


def _angles(seq: int, dim: int = D) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)


def _tables(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF / litgpt ``[seq, D]`` tables: ``cat(f, f)`` of the angles, cos and sin."""
    emb = torch.cat((_angles(seq),) * 2, dim=-1)
    return emb.cos(), emb.sin()


def _compile(model, args, caplog, options=CPU_OPTIONS):
    """(counters, ``missed:`` counters, DEBUG miss lines, fused calls): ``compile_with_misses``
    (candidate errors allowed: see ``LENIENT``)."""
    return with_call_count(compile_with_misses(model, args, caplog, options))


def assert_fused(model, args, caplog, layers: int = LAYERS) -> dict:
    return check_fused(_compile(model, args, caplog), layers)


def assert_missed(model, args, caplog, layers: int = LAYERS) -> dict:
    """Not rewritten, and each layer's two RoPEs are counted misses with a DEBUG line each."""
    return check_missed(_compile(model, args, caplog, LENIENT), layers)


# --------------------------------------------------------------------------------------------
# the model: a stack of attention layers over one qkv projection each


def _rotate_half(x, swapped=False):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x1, x2), dim=-1) if swapped else torch.cat((-x2, x1), dim=-1)


def hf_rope(x, cos, sin, swapped=False):
    """HF's ``apply_rotary_pos_emb`` body with cos/sin already broadcastable (no unsqueeze)."""
    return (x * cos) + (_rotate_half(x, swapped) * sin)


class Layer(nn.Module):
    """qkv projection, q/k ``[B, H, T, D]`` views of it (``token_first``: ``[B, T, H, D]``),
    ``rope(x, cos, sin)`` on q and k, SDPA, output projection."""

    def __init__(self, rope, token_first: bool = False) -> None:
        super().__init__()
        self.rope, self.token_first = rope, token_first
        self.qkv = nn.Linear(HIDDEN, (HQ + 2 * HK) * D, bias=False)
        self.out = nn.Linear(HQ * D, HIDDEN, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split((HQ * D, HK * D, HK * D), dim=-1)
        q, k, v = q.view(b, t, HQ, D), k.view(b, t, HK, D), v.view(b, t, HK, D)
        if not self.token_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if self.token_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class Stack(nn.Module):
    """``LAYERS`` layers; ``tables(self, x, *extra)`` gives each layer's (cos, sin)."""

    def __init__(self, rope, tables, token_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Layer(rope, token_first) for _ in range(LAYERS))
        self.tables = tables

    def forward(self, x, *extra):
        cos, sin = self.tables(self, x, *extra)
        for layer in self.layers:
            x = x + layer(x, cos, sin)
        return x


def _hidden(batch: int = B, seq: int = T) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# 1. HF rotate_half with cos/sin already shaped [1, 1, S, D]

COS_4D, SIN_4D = (t[None, None] for t in _tables(T))  # module globals


def _from_inputs(model, x, cos, sin):
    return cos, sin


def _from_buffers(model, x):
    return model.cos, model.sin


def _from_sliced_buffers(model, x):
    t = x.shape[1]
    return model.cos_max[:, :, :t], model.sin_max[:, :, :t]


def _from_globals(model, x):
    return COS_4D, SIN_4D


def _preshaped(source: str, rope=hf_rope) -> tuple[nn.Module, tuple]:
    """A stack whose [1, 1, S, D] tables come from ``source``, and its arguments."""
    tables = {"input": _from_inputs, "buffer": _from_buffers,
              "sliced buffer": _from_sliced_buffers, "global": _from_globals}[source]
    model = Stack(rope, tables).eval()
    model.register_buffer("cos", COS_4D.clone(), persistent=False)
    model.register_buffer("sin", SIN_4D.clone(), persistent=False)
    cos_max, sin_max = (t[None, None] for t in _tables(MAX_POS))
    model.register_buffer("cos_max", cos_max, persistent=False)
    model.register_buffer("sin_max", sin_max, persistent=False)
    args = (_hidden(), COS_4D, SIN_4D) if source == "input" else (_hidden(),)
    return model, args


PRESHAPED = ("input", "buffer", "sliced buffer", "global")


@pytest.mark.parametrize("source", PRESHAPED)
def test_preshaped_tables_fused(source, caplog):
    assert_fused(*_preshaped(source), caplog)


def test_preshaped_tables_batch_two(caplog):
    """Batch 2, the [1, 1, S, D] tables broadcast over batch and heads: rows t % S."""
    model, _ = _preshaped("input")
    assert_fused(model, (_hidden(2), COS_4D, SIN_4D), caplog)


# --------------------------------------------------------------------------------------------
# 2. litgpt apply_rope: 2-D [T, D] tables, index_select, and 0.5.x's view(1, 1, T, n)


def litgpt_old_apply_rope(x, cos, sin):
    """litgpt before 0.5 (and nanoGPT forks): ``cos`` ``[T, n]`` broadcast as it is."""
    head_size = x.size(-1)
    x1 = x[..., : head_size // 2]
    x2 = x[..., head_size // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    roped = (x * cos) + (rotated * sin)
    return roped.to(dtype=x.dtype)


def litgpt_apply_rope(x, cos, sin):
    """litgpt 0.5.x ``apply_rope``: ``cos`` ``(1, T, n)`` viewed as ``(1, 1, T, n)``."""
    if cos.dim() != 3:
        raise ValueError(f"cos must be three-dimensional, but shape is {cos.shape}")
    head_size_half = x.size(-1) // 2
    x1 = x[..., :head_size_half]
    x2 = x[..., head_size_half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    dims_diff = x.dim() - cos.dim()
    if dims_diff > 0:
        new_shape = cos.shape[0:1] + (1,) * dims_diff + cos.shape[1:]
        cos = cos.view(*new_shape)
        sin = sin.view(*new_shape)
    roped = (x * cos) + (rotated * sin)
    return roped.to(dtype=x.dtype)


def _litgpt_slice(model, x):
    t = x.size(1)
    return model.cos[:t], model.sin[:t]


def _litgpt_index_select(model, x, input_pos):
    return model.cos.index_select(0, input_pos), model.sin.index_select(0, input_pos)


def _litgpt_slice_unsqueezed(model, x):
    t = x.size(1)
    return model.cos[:t].unsqueeze(0), model.sin[:t].unsqueeze(0)


def _litgpt_index_select_unsqueezed(model, x, input_pos):
    # litgpt's batched_index_select with 1-D input_pos is torch.index_select.
    cos = torch.index_select(model.cos, 0, input_pos).unsqueeze(0)
    sin = torch.index_select(model.sin, 0, input_pos).unsqueeze(0)
    return cos, sin


LITGPT = {
    "2-D cos[:T]": (litgpt_old_apply_rope, _litgpt_slice),
    "2-D index_select": (litgpt_old_apply_rope, _litgpt_index_select),
    "0.5 view(1, 1, T, n)": (litgpt_apply_rope, _litgpt_slice_unsqueezed),
    "0.5 index_select view": (litgpt_apply_rope, _litgpt_index_select_unsqueezed),
}


def _litgpt(name: str, batch: int = 2, rope=None) -> tuple[nn.Module, tuple]:
    apply, tables = LITGPT[name]
    model = Stack(rope or apply, tables).eval()
    cos, sin = _tables(MAX_POS)
    model.register_buffer("cos", cos, persistent=False)
    model.register_buffer("sin", sin, persistent=False)
    args = (_hidden(batch),)
    if "index_select" in name:
        args += (torch.arange(3, 3 + T),)
    return model, args


@pytest.mark.parametrize("name", list(LITGPT))
def test_litgpt_tables_fused(name, caplog):
    assert_fused(*_litgpt(name), caplog)


# --------------------------------------------------------------------------------------------
# the miss report covers each form: a broken rotation is counted, never silent


def _swapped(apply):
    """``apply`` with rotate_half's halves swapped: ``cat(-x1, x2)``, not RoPE."""
    def rope(x, cos, sin):
        if cos.dim() < x.dim() and apply is litgpt_apply_rope:
            cos = cos.view(cos.shape[0:1] + (1,) * (x.dim() - cos.dim()) + cos.shape[1:])
            sin = sin.view(sin.shape[0:1] + (1,) * (x.dim() - sin.dim()) + sin.shape[1:])
        return hf_rope(x, cos, sin, swapped=True)
    return rope


MISS_REASON = ("rotate_half(x) does not rotate the x that multiplies cos (halves swapped, or "
               "another tensor)")


@pytest.mark.parametrize("source", PRESHAPED)
def test_preshaped_tables_miss_reported(source, caplog):
    missed = assert_missed(*_preshaped(source, _swapped(hf_rope)), caplog)
    assert missed == {f"missed: {MISS_REASON}": 2 * LAYERS}, missed


@pytest.mark.parametrize("name", ["2-D cos[:T]", "0.5 view(1, 1, T, n)"])
def test_litgpt_tables_miss_reported(name, caplog):
    missed = assert_missed(*_litgpt(name, rope=_swapped(LITGPT[name][0])), caplog)
    assert missed == {f"missed: {MISS_REASON}": 2 * LAYERS}, missed


# --------------------------------------------------------------------------------------------
# 3. nanochat: half-width [1, T, 1, D/2] tables and the rotation by -θ


def nanochat_apply_rotary_emb(x, cos, sin):
    """nanochat's ``apply_rotary_emb`` (gpt.py): the other sign convention, a rotation by -θ."""
    assert x.ndim == 4  # multihead attention
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]  # split up last time into two halves
    y1 = x1 * cos + x2 * sin  # rotate pairs of dims
    y2 = x1 * (-sin) + x2 * cos
    out = torch.cat([y1, y2], 3)  # re-assemble
    out = out.to(x.dtype)  # ensure input/output dtypes match
    return out


def negated_x1_rotary_emb(x, cos, sin):
    """The same rotation by -θ spelled ``y2 = -x1 * sin + x2 * cos``."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], 3).to(x.dtype)


def theta_rotary_emb(x, cos, sin):
    """The usual convention (a rotation by θ) on the same half-width tables."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], 3).to(x.dtype)


def _nanochat_tables(model, x):
    t = x.size(1)
    return model.cos[:, :t], model.sin[:, :t]


def _nanochat(rope, batch: int = 2) -> tuple[nn.Module, tuple]:
    """nanochat's layout: q/k ``[B, T, H, D]``, buffers ``cos[None, :, None, :]`` of the
    ``[seq, D/2]`` angles, sliced ``[:, T0:T0 + T]``."""
    model = Stack(rope, _nanochat_tables, token_first=True).eval()
    angles = _angles(MAX_POS)
    model.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
    model.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
    return model, (_hidden(batch),)


SIGNS = {"nanochat -θ": nanochat_apply_rotary_emb, "-θ, -x1 * sin": negated_x1_rotary_emb,
         "θ": theta_rotary_emb}


@pytest.mark.parametrize("name", list(SIGNS))
def test_half_width_tables_both_signs_fused(name, caplog):
    assert_fused(*_nanochat(SIGNS[name]), caplog)


def _no_rotation(x, cos, sin):
    """Not a rotation: ``x1*cos + x2*sin``, ``x2*cos + x1*sin``."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos + x1 * sin], 3)


def _both_minus(x, cos, sin):
    """Not a rotation: ``x1*cos - x2*sin``, ``x2*cos - x1*sin``."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos - x1 * sin], 3)


SIGN_REASON = ("second half is not x2 * cos + x1 * sin (signs, halves or cos and sin swapped; "
               "the rotation by -θ is x1 * cos + x2 * sin, x2 * cos - x1 * sin)")


@pytest.mark.parametrize("rope", [_no_rotation, _both_minus], ids=["-θ broken", "θ broken"])
def test_half_width_tables_miss_reported(rope, caplog):
    missed = assert_missed(*_nanochat(rope), caplog)
    assert missed == {f"missed: {SIGN_REASON}": 2 * LAYERS}, missed


# --------------------------------------------------------------------------------------------
# 4. sglang's MRotaryEmbedding.forward_native (multimodal RoPE, Qwen2-VL / Qwen3-VL)
#
# A copy of sgl-project/sglang at commit 020d83a06417a70561ce329ee6ae58eaa47dd2ff:
# python/sglang/srt/layers/rotary_embedding/mrope.py (apply_interleaved_rope,
# MRotaryEmbedding.forward_native) and .../rotary_embedding/utils.py (apply_rotary_emb); the
# cache is RotaryEmbedding's (cat(cos, sin) of positions x inv_freq). Not installed here.


def sglang_apply_interleaved_rope(x: torch.Tensor, mrope_section: list) -> torch.Tensor:
    x_t = x[0].clone()
    x_t[..., 1 : mrope_section[1] * 3 : 3] = x[1, ..., 1 : mrope_section[1] * 3 : 3]
    x_t[..., 2 : mrope_section[2] * 3 : 3] = x[2, ..., 2 : mrope_section[2] * 3 : 3]
    return x_t


def sglang_apply_rotary_emb(x, cos, sin, is_neox_style):
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox_style:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox_style:
        return torch.cat((o1, o2), dim=-1)
    else:
        return torch.stack((o1, o2), dim=-1).flatten(-2)


class SglangMRotaryEmbedding(nn.Module):
    """sglang's ``MRotaryEmbedding`` (its ``forward_native``; the cache as ``RotaryEmbedding``
    builds it)."""

    def __init__(self, head_size, rotary_dim, max_position_embeddings, base, is_neox_style,
                 dtype, mrope_section=None, mrope_interleaved=False) -> None:
        super().__init__()
        self.head_size, self.rotary_dim = head_size, rotary_dim
        self.is_neox_style = is_neox_style
        self.mrope_section, self.mrope_interleaved = mrope_section, mrope_interleaved
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float)
                                   / rotary_dim))
        t = torch.arange(max_position_embeddings, dtype=torch.float)
        freqs = torch.einsum("i,j -> ij", t, inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward_native(self, positions, query, key, fused_set_kv_buffer_arg=None):
        assert (
            fused_set_kv_buffer_arg is None
        ), "save kv cache is not supported for MRotaryEmbedding."
        assert positions.ndim == 1 or positions.ndim == 2

        cos_sin = self.cos_sin_cache[positions]
        cos, sin = cos_sin.chunk(2, dim=-1)
        if positions.ndim == 2:
            assert self.mrope_section
            if self.mrope_interleaved:
                cos = sglang_apply_interleaved_rope(cos, self.mrope_section)
                sin = sglang_apply_interleaved_rope(sin, self.mrope_section)
            else:
                cos = torch.cat(
                    [m[i] for i, m in enumerate(cos.split(self.mrope_section, dim=-1))],
                    dim=-1,
                )
                sin = torch.cat(
                    [m[i] for i, m in enumerate(sin.split(self.mrope_section, dim=-1))],
                    dim=-1,
                )

        seq_len_q = query.shape[0]
        query_shape = query.shape
        query = query.view(seq_len_q, -1, self.head_size)
        query_rot = query[..., : self.rotary_dim]
        query_pass = query[..., self.rotary_dim :]
        query_rot = sglang_apply_rotary_emb(query_rot, cos, sin, self.is_neox_style)
        query = torch.cat((query_rot, query_pass), dim=-1).reshape(query_shape)

        seq_len_k = key.shape[0]
        key_shape = key.shape
        key = key.view(seq_len_k, -1, self.head_size)
        key_rot = key[..., : self.rotary_dim]
        key_pass = key[..., self.rotary_dim :]
        key_rot = sglang_apply_rotary_emb(key_rot, cos, sin, self.is_neox_style)
        key = torch.cat((key_rot, key_pass), dim=-1).reshape(key_shape)
        return query, key


class SglangLayer(nn.Module):
    """sglang's attention layout: tokens ``[T, hidden]``, q/k/v split from one projection."""

    def __init__(self, rope) -> None:
        super().__init__()
        self.rope = rope
        self.qkv = nn.Linear(HIDDEN, (HQ + 2 * HK) * D, bias=False)
        self.out = nn.Linear(HQ * D, HIDDEN, bias=False)

    def forward(self, positions, x):
        q, k, v = self.qkv(x).split((HQ * D, HK * D, HK * D), dim=-1)
        q, k = self.rope.forward_native(positions, q, k)
        t = x.shape[0]
        q, k, v = (z.view(t, -1, D).transpose(0, 1) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(0, 1).reshape(t, -1))


class SglangStack(nn.Module):
    def __init__(self, interleaved: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rope = SglangMRotaryEmbedding(D, D, 64, 10000, True, torch.float32,
                                           mrope_section=[16, 24, 24],
                                           mrope_interleaved=interleaved)
        self.layers = nn.ModuleList(SglangLayer(self.rope) for _ in range(LAYERS))

    def forward(self, positions, x):
        for layer in self.layers:
            x = x + layer(positions, x)
        return x


def _mrope_args(tokens: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.randint(0, 64, (3, tokens), generator=torch.Generator().manual_seed(2))
    return positions, torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))


def test_sglang_mrope_sections_fused(caplog):
    """``cos_sin_cache[positions]`` with ``[3, T]`` positions, sections concatenated: the
    mRoPE op reads the cache at the positions (the gather is gone)."""
    counts, missed, lines, calls = _compile(SglangStack(False).eval(), _mrope_args(), caplog)
    assert counts.get("rewritten") == LAYERS and calls == LAYERS, counts
    assert not missed and not lines, (missed, lines)


def test_sglang_mrope_sections_call_is_the_mrope_op():
    from pass_helpers import capture_compile, cpu_pass

    model = SglangStack(False).eval()
    with torch.no_grad():
        _, _, after, counts = capture_compile(model, *_mrope_args(), rope_pass=cpu_pass())
    assert counts.get("rewritten") == LAYERS, counts
    text = after.renders[0]
    assert text.count("rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace") == LAYERS, text
    assert "mrope_section=[16, 24, 24]" in text and "aten.index.Tensor" not in text, text


def test_sglang_mrope_interleaved_fused(caplog):
    """Qwen3-VL's interleaved streams (``mrope_interleaved=True``): the mRoPE op with
    ``mrope_interleaved``, once per layer, eager's values."""
    counts, missed, lines, calls = _compile(SglangStack(True).eval(), _mrope_args(), caplog)
    assert counts.get("rewritten") == LAYERS and calls == LAYERS, counts
    assert not missed and not lines, (missed, lines)


@pytest.mark.parametrize("sections", [[24, 20, 20], [16, 24, 24], [32, 32, 0], [64, 0, 0]],
                         ids=lambda s: "-".join(map(str, s)))
def test_sglang_mrope_interleaved_call(sections):
    """The call reads the cache at the positions, streams by column: Qwen3-VL's own sections;
    ``3 * s`` past the 64 pair columns (sglang's slices stop at the end: 21 columns each);
    stream 2 empty; no stream but 0 (the scatters write nothing)."""
    from pass_helpers import capture_compile, cpu_pass

    model = SglangStack(True).eval()
    model.rope.mrope_section = sections
    args = _mrope_args()
    with torch.no_grad():
        expected = model(*args)
        out, _, after, counts = capture_compile(model, *args, rope_pass=cpu_pass())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert counts.get("rewritten") == LAYERS, counts
    text = after.renders[0]
    s1, s2 = (min(n, len(range(first, 64, 3))) for n, first in ((sections[1], 1),
                                                                 (sections[2], 2)))
    assert text.count("mrope_interleaved=True") == LAYERS, text
    assert f"mrope_section=[{64 - s1 - s2}, {s1}, {s2}]" in text, text
    assert "slice_scatter" not in text and "aten.index.Tensor" not in text, text


def _broken_interleave(kind: str):
    def apply(x: torch.Tensor, mrope_section: list) -> torch.Tensor:
        x_t = x[0].clone()
        if kind == "stream swapped":  # columns 1::3 from stream 2
            x_t[..., 1 : mrope_section[1] * 3 : 3] = x[2, ..., 1 : mrope_section[1] * 3 : 3]
        elif kind == "step 2":
            x_t[..., 1 : mrope_section[1] * 2 : 2] = x[1, ..., 1 : mrope_section[1] * 2 : 2]
        elif kind == "shifted":  # columns 1::3 read stream 1's columns 0::3
            x_t[..., 1 : mrope_section[1] * 3 : 3] = x[1, ..., 0 : x.shape[-1] - 1 : 3]
        elif kind == "scaled":  # a value the op does not compute
            x_t[..., 1 : mrope_section[1] * 3 : 3] = 2 * x[1, ..., 1 : mrope_section[1] * 3 : 3]
        x_t[..., 2 : mrope_section[2] * 3 : 3] = x[2, ..., 2 : mrope_section[2] * 3 : 3]
        return x_t

    return apply


BROKEN_INTERLEAVE = {
    "stream swapped": "columns 1::3 of interleaved mRoPE tables are not read from stream 1",
    "step 2": "cos/sin columns are scattered other than every third column of the last dim",
    "shifted": "interleaved mRoPE columns are not read from the same columns of their stream",
    "scaled": "interleaved mRoPE columns are not read from the same columns of their stream",
}


@pytest.mark.parametrize("kind", list(BROKEN_INTERLEAVE))
def test_sglang_mrope_interleaved_broken_is_a_miss(kind, caplog, monkeypatch):
    """An interleave that is not sglang's (another stream, step or column, a scaled column):
    each RoPE is a counted miss with the proof step that failed, and eager's values."""
    monkeypatch.setattr(__import__(__name__), "sglang_apply_interleaved_rope",
                        _broken_interleave(kind))
    counts, missed, lines, calls = _compile(SglangStack(True).eval(), _mrope_args(), caplog,
                                            LENIENT)
    assert calls == 0 and "rewritten" not in counts, counts
    assert missed == {f"missed: {BROKEN_INTERLEAVE[kind]}": 2 * LAYERS}, missed
    assert len(lines) == 2 * LAYERS, lines


class TestInterleavedMropeGraph(expecttest.TestCase):
    def test_one_layer(self):
        """One sglang layer with Qwen3-VL's streams: the gather, chunks and both scatters of
        cos and of sin are gone; one mRoPE call rotates q and k of the projection in place."""
        from pass_helpers import capture_compile, cpu_pass, render_node

        torch.manual_seed(0)
        rope = SglangMRotaryEmbedding(D, D, 64, 10000, True, torch.float32,
                                      mrope_section=[24, 20, 20], mrope_interleaved=True)
        with torch.no_grad():
            _, _, after, counts = capture_compile(SglangLayer(rope).eval(), *_mrope_args(),
                                                  rope_pass=cpu_pass())
        assert counts.get("rewritten") == 1, counts
        region = [render_node(n) for n in after.graphs[0].nodes
                  if n.op not in ("placeholder", "output")]
        call = next(i for i, text in enumerate(region) if "auto_functionalized" in text)
        end = call + 2  # the call and its projection
        self.assertExpectedInline("\n".join(region[:end]) + "\n", """\
permute: f32[64, 1024] = aten.permute.default(arg0_1, [1, 0])
mm: f32[6, 1024] = aten.mm.default(arg1_1, permute)
auto_functionalized_v2 = auto_functionalized_v2(
    rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace.default,
    cos_sin_cache=arg3_1,
    positions=arg2_1,
    rotary_dim=128,
    is_neox=True,
    _q_base_index=0,
    _q_size=(6, 4, 128),
    _q_stride=(1024, 128, 1),
    _q_storage_offset=0,
    _k_base_index=0,
    _k_size=(6, 2, 128),
    _k_stride=(1024, 128, 1),
    _k_storage_offset=512,
    _all_bases=[mm],
    mrope_section=[24, 20, 20],
    mrope_interleaved=True,
    wrap_negative_positions=True)
getitem_9: f32[6, 1024] = auto_functionalized_v2[1]
""")
