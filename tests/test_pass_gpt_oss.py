"""GPT-OSS's RoPE, and DeepSeek MLA's de-interleaving RoPE, through ``backend="rope_compile"``.

* **GPT-OSS** (HF ``modeling_gpt_oss``, transformers 5.25): half-width tables ``[B, 1, S, D/2]``
  (cos/sin of the angles, not ``cat(f, f)``, unsqueezed on the heads dim) against heads-first
  ``[B, H, S, D]`` q/k, ``chunk`` into halves, ``x1 * cos - x2 * sin``, ``x2 * cos + x1 * sin``,
  ``cat``. Rewritten to the tables op, one call per layer, the tables read in place as ``[B*S,
  D/2]`` rows (``HalfWidthTables``, heads dim 1). Tested on a copy of its attention and rotary
  code (below) and on the real ``GptOssForCausalLM`` (MoE, eager attention: transformers has
  no SDPA path for it), prefill and a one-token decode step with its ``DynamicCache``.
* Near-misses of it (a sum where the rotation subtracts; the rotated halves written back
  swapped) stay counted misses, each with its reason; the rotation by -θ in its layout is
  fused.
* **DeepSeek-V3's MLA** ``apply_rotary_pos_emb_interleave`` (transformers 5.25: GPT-J pairs
  ``x[..., 0::2]``, ``x[..., 1::2]`` rotated, written back as neox halves ``cat(o1, o2)``) is not
  fused (the in-place ops write each pair where they read it): a counted miss naming the
  de-interleave, never the generic product message. The older spelling
  (``x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)`` then ``rotate_half``)
  is a proven RoPE of the de-interleaved copy.

Run: ``python -m pytest -q tests/test_pass_gpt_oss.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import expecttest
import pytest
import torch
import torch.nn.functional as F
from pass_helpers import (
    CPU_OPTIONS,
    FORCE_REWRITE,
    capture_compile,
    check_fused,
    check_missed,
    compile_with_misses,
    cpu_pass,
    fresh_compile,
    fused_nodes,
    rope_counters,
    with_call_count,
)
from rope_compile.passes.fuse_qk_rope import find_rope_matches
from rope_compile.passes.rope_pattern import DEINTERLEAVE_REASON
from rope_compile.passes.trig_sources import HalfWidthTables
from torch import nn

B, S, HIDDEN, HQ, HK, D = 2, 7, 64, 4, 2, 128
LAYERS = 2
TOL = {"atol": 1e-4, "rtol": 1e-4}
LENIENT = {"devices": ("cpu",), **FORCE_REWRITE}


def _compile(model, args, caplog, options=None):
    """(counters, ``missed:`` counters, DEBUG miss lines, fused calls): ``compile_with_misses``
    with the CPU forced, strict unless ``options``, and no error counter at all."""
    return with_call_count(compile_with_misses(
        model, args, caplog, options or {**CPU_OPTIONS, **FORCE_REWRITE}, no_errors=True))


def assert_fused(model, args, caplog, layers: int = LAYERS, options=None) -> dict:
    return check_fused(_compile(model, args, caplog, options), layers)


def assert_missed(model, args, caplog, layers: int = LAYERS) -> dict:
    """Not rewritten; each layer's two RoPEs are counted misses with a DEBUG line each."""
    return check_missed(_compile(model, args, caplog, LENIENT), layers)


# --------------------------------------------------------------------------------------------
# a copy of GPT-OSS's rotary and attention code: huggingface/transformers 5.25.0,
# src/transformers/models/gpt_oss/modeling_gpt_oss.py (GptOssRotaryEmbedding.forward with the
# default rope type, _apply_rotary_emb, apply_rotary_pos_emb, repeat_kv,
# eager_attention_forward with its sinks, GptOssAttention.forward without a cache)


def _apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    first_ = first_half * cos - second_half * sin
    second_ = second_half * cos + first_half * sin
    return torch.cat((first_, second_), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, rotate=_apply_rotary_emb):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = rotate(q, cos, sin)
    k_embed = rotate(k, cos, sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep,
                                                           slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
    combined_logits = torch.cat([attn_weights, sinks], dim=-1)
    combined_logits = combined_logits - combined_logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined_logits, dim=-1, dtype=combined_logits.dtype)
    scores = probs[..., :-1]  # we drop the sink here
    attn_output = torch.matmul(scores.to(value_states.dtype), value_states)
    return attn_output.transpose(1, 2).contiguous()


class GptOssRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 150000.0, attention_scaling: float = 1.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device,
                                                                    dtype=torch.float)
        emb = freqs
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class GptOssAttention(nn.Module):
    def __init__(self, head_dim: int = D, rotate=_apply_rotary_emb) -> None:
        super().__init__()
        self.head_dim, self.rotate = head_dim, rotate
        self.num_key_value_groups = HQ // HK
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(HIDDEN, HQ * head_dim, bias=True)
        self.k_proj = nn.Linear(HIDDEN, HK * head_dim, bias=True)
        self.v_proj = nn.Linear(HIDDEN, HK * head_dim, bias=True)
        self.o_proj = nn.Linear(HQ * head_dim, HIDDEN, bias=True)
        self.sinks = nn.Parameter(torch.randn(HQ) * 0.1)

    def forward(self, hidden_states, position_embeddings, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin,
                                                        rotate=self.rotate)
        attn_output = eager_attention_forward(self, query_states, key_states, value_states,
                                              attention_mask, self.scaling)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class GptOssStack(nn.Module):
    """``LAYERS`` GPT-OSS attention layers (residual, no MLP) sharing one rotary module, a
    causal mask; ``forward(hidden_states, position_ids)``."""

    def __init__(self, head_dim: int = D, rotate=_apply_rotary_emb,
                 attention_scaling: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rotary_emb = GptOssRotaryEmbedding(head_dim, attention_scaling=attention_scaling)
        self.layers = nn.ModuleList(GptOssAttention(head_dim, rotate) for _ in range(LAYERS))

    def forward(self, x, position_ids):
        s = x.shape[1]
        mask = torch.full((s, s), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        position_embeddings = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = x + layer(x, position_embeddings, mask[None, None])
        return x


def _inputs(batch: int = B, seq: int = S, offsets=(0, 5), dtype=torch.float32):
    """Hidden states and ``[batch, seq]`` position ids, each row its own (as with left padding
    or packed decoding): a wrong row of the ``[B, 1, S, D/2]`` tables must show."""
    x = torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    pos = torch.stack([torch.arange(o, o + seq) for o in offsets[:batch]])
    return x, pos


@pytest.mark.parametrize("shape", [(B, S), (1, S), (B, 1)], ids=["batch 2", "batch 1",
                                                                  "one token"])
def test_gpt_oss_copy_fused(shape, caplog):
    assert_fused(GptOssStack().eval(), _inputs(*shape), caplog)


def test_gpt_oss_copy_shared_positions_fused(caplog):
    """Position ids ``[1, S]`` (the model's default): ``[1, 1, S, D/2]`` tables broadcast over
    the batch, read as ``[S, D/2]`` rows ``t % S``."""
    x, pos = _inputs()
    assert_fused(GptOssStack().eval(), (x, pos[:1]), caplog)


def test_gpt_oss_copy_scaled_tables_fused(caplog):
    """YaRN's ``attention_scaling`` (GPT-OSS's checkpoints: cos/sin scaled after cos()/sin())."""
    assert_fused(GptOssStack(attention_scaling=1.3466).eval(), _inputs(), caplog)


def test_gpt_oss_copy_bf16_fused(caplog):
    model = GptOssStack().eval().to(torch.bfloat16)
    args = _inputs(dtype=torch.bfloat16)
    expected = model(*args)
    with fresh_compile():
        inductor = torch.compile(model)(*args)
        out = torch.compile(model, backend="rope_compile",
                            options={**CPU_OPTIONS, **FORCE_REWRITE})(*args)
        counts = rope_counters()
    assert counts.get("rewritten") == LAYERS, counts
    # No further from eager than plain Inductor is (bf16: both round differently from eager).
    err, inductor_err = ((t.float() - expected.float()).abs().max() for t in (out, inductor))
    assert err <= max(2 * inductor_err, 1e-2), (err, inductor_err)


def test_gpt_oss_copy_source_is_half_width_tables():
    """q's and k's cos/sin are the ``[B, 1, S, D/2]`` tables themselves, heads dim 1."""
    model = GptOssStack().eval()
    with fresh_compile():
        _, before, _, _ = capture_compile(model, *_inputs(), rope_pass=cpu_pass())
    trigs = [m.trig for m in find_rope_matches(before.graphs[0])]
    assert len(trigs) == 2 * LAYERS, trigs
    for trig in trigs:
        assert isinstance(trig, HalfWidthTables) and trig.heads_dim == 1, trig
        assert not trig.negate_sin
        assert list(trig.cos.meta["val"].shape) == [B, 1, S, D // 2]


def test_gpt_oss_head_dim_64(caplog):
    """GPT-OSS's own head size, 64: a counted skip with the default ``head_sizes``, rewritten
    where the option allows it."""
    model, args = GptOssStack(head_dim=64).eval(), _inputs()
    counts, missed, _, calls = _compile(model, args, caplog)
    assert calls == 0 and not missed, counts
    assert counts.get("skipped: head_size 64 not in (128, 256, 512)") == LAYERS, counts
    assert_fused(model, args, caplog,
                 options={**CPU_OPTIONS, **FORCE_REWRITE, "head_sizes": (64, 128)})


# --------------------------------------------------------------------------------------------
# near-misses: the same layout with a broken rotation stays a counted miss with its reason


def _sum_not_difference(x, cos, sin):
    """Not a rotation: ``x1*cos + x2*sin``, ``x2*cos + x1*sin``."""
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    return torch.cat((first_half * cos + second_half * sin,
                      second_half * cos + first_half * sin), dim=-1)


def _halves_swapped(x, cos, sin):
    """The rotated halves written back swapped: ``cat(x2*cos + x1*sin, x1*cos - x2*sin)``.
    (cos and sin swapped, ``x1*sin - x2*cos``, is fused: the op reads any two tables.)"""
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    return torch.cat((second_half * cos + first_half * sin,
                      first_half * cos - second_half * sin), dim=-1)


def _minus_theta(x, cos, sin):
    """The rotation by -θ (nanochat's convention) in GPT-OSS's layout: fused, sin negated."""
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    return torch.cat((first_half * cos + second_half * sin,
                      second_half * cos - first_half * sin), dim=-1)


SIGN_REASON = ("second half is not x2 * cos + x1 * sin (signs, halves or cos and sin swapped; "
               "the rotation by -θ is x1 * cos + x2 * sin, x2 * cos - x1 * sin)")


HALVES_REASON = "neox halves are not x[..., :rot/2] and x[..., rot/2:rot]"


@pytest.mark.parametrize("rotate, reason", [(_sum_not_difference, SIGN_REASON),
                                            (_halves_swapped, HALVES_REASON)],
                         ids=["signs", "halves swapped"])
def test_gpt_oss_near_miss_reported(rotate, reason, caplog):
    missed = assert_missed(GptOssStack(rotate=rotate).eval(), _inputs(), caplog)
    assert missed == {f"missed: {reason}": 2 * LAYERS}, missed


def test_gpt_oss_minus_theta_fused(caplog):
    assert_fused(GptOssStack(rotate=_minus_theta).eval(), _inputs(), caplog)


# --------------------------------------------------------------------------------------------
# the graph before and after the pass, inline


class GptOssQK(nn.Module):
    """GPT-OSS's q/k projections, rotary tables and ``apply_rotary_pos_emb``: (q, k)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rotary_emb = GptOssRotaryEmbedding(D)
        self.q_proj = nn.Linear(HIDDEN, HQ * D, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HK * D, bias=False)

    def forward(self, x, position_ids):
        hidden_shape = (*x.shape[:-1], -1, D)
        q = self.q_proj(x).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(x).view(hidden_shape).transpose(1, 2)
        cos, sin = self.rotary_emb(x, position_ids)
        return apply_rotary_pos_emb(q, k, cos, sin)


class TestGptOssRewrite(expecttest.TestCase):
    def test_graph_after_pass(self):
        model = GptOssQK().eval()
        args = _inputs(seq=5)
        out, before, after, counts = capture_compile(model, *args, rope_pass=cpu_pass())
        with torch.no_grad():
            expected = model(*args)
        for got, want in zip(out, expected, strict=True):
            torch.testing.assert_close(got, want, **TOL)
        self.assertEqual(counts, {"pairs_found": 1, "rewritten": 1})
        self.assertEqual(len(fused_nodes(after.graphs[0])), 1)
        ops = {str(n.target) for n in after.graphs[0].nodes if n.op == "call_function"}
        for gone in ("aten.sub.Tensor", "aten.add.Tensor", "aten.cat.default"):
            self.assertNotIn(gone, ops)
        self.assertExpectedInline(after.renders[0], """\
arg0_1: f32[2, 5, 64]
arg1_1: f32[512, 64]
arg2_1: f32[256, 64]
arg3_1: i64[2, 5]
arg4_1: f32[64]
view: f32[10, 64] = aten.reshape.default(arg0_1, [10, 64])
permute: f32[64, 512] = aten.permute.default(arg1_1, [1, 0])
mm: f32[10, 512] = aten.mm.default(view, permute)
view_3: f32[10, 64] = aten.reshape.default(arg0_1, [10, 64])
permute_2: f32[64, 256] = aten.permute.default(arg2_1, [1, 0])
mm_1: f32[10, 256] = aten.mm.default(view_3, permute_2)
unsqueeze: i64[2, 5, 1] = aten.unsqueeze.default(arg3_1, 2)
convert_element_type: f32[2, 5, 1] = prims.convert_element_type.default(unsqueeze, f32)
mul: f32[2, 5, 64] = aten.mul.Tensor(convert_element_type, arg4_1)
cos: f32[2, 5, 64] = aten.cos.default(mul)
mul_1: f32[2, 5, 64] = aten.mul.Tensor(cos, 1.0)
unsqueeze_1: f32[2, 1, 5, 64] = aten.unsqueeze.default(mul_1, 1)
sin: f32[2, 5, 64] = aten.sin.default(mul)
mul_2: f32[2, 5, 64] = aten.mul.Tensor(sin, 1.0)
unsqueeze_2: f32[2, 1, 5, 64] = aten.unsqueeze.default(mul_2, 1)
squeeze_dim: f32[2, 5, 64] = aten.squeeze.dim(unsqueeze_1, 1)
slice_tensor: f32[2, 5, 64] = aten.slice.Tensor(squeeze_dim, -1, 0, 64, 1)
reshape_default: f32[10, 64] = aten.reshape.default(slice_tensor, [-1, 64])
squeeze_dim_1: f32[2, 5, 64] = aten.squeeze.dim(unsqueeze_2, 1)
slice_tensor_1: f32[2, 5, 64] = aten.slice.Tensor(squeeze_dim_1, -1, 0, 64, 1)
reshape_default_1: f32[10, 64] = aten.reshape.default(slice_tensor_1, [-1, 64])
auto_functionalized_v2 = auto_functionalized_v2(
    rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default,
    cos=reshape_default,
    sin=reshape_default_1,
    rotary_dim=128,
    is_neox=True,
    _q_base_index=0,
    _q_size=(10, 4, 128),
    _q_stride=(512, 128, 1),
    _q_storage_offset=0,
    _k_base_index=1,
    _k_size=(10, 2, 128),
    _k_stride=(256, 128, 1),
    _k_storage_offset=0,
    _all_bases=[mm, mm_1])
getitem_4: f32[10, 512] = auto_functionalized_v2[1]
view_6: f32[2, 5, 512] = aten.reshape.default(getitem_4, [2, 5, 512])
view_7: f32[2, 5, 4, 128] = aten.reshape.default(view_6, [2, 5, -1, 128])
permute_4: f32[2, 4, 5, 128] = aten.permute.default(view_7, [0, 2, 1, 3])
clone_default: f32[2, 4, 5, 128] = aten.clone.default(
    permute_4,
    memory_format=torch.contiguous_format)
getitem_5: f32[10, 256] = auto_functionalized_v2[2]
view_8: f32[2, 5, 256] = aten.reshape.default(getitem_5, [2, 5, 256])
view_9: f32[2, 5, 2, 128] = aten.reshape.default(view_8, [2, 5, -1, 128])
permute_5: f32[2, 2, 5, 128] = aten.permute.default(view_9, [0, 2, 1, 3])
clone_default_1: f32[2, 2, 5, 128] = aten.clone.default(
    permute_5,
    memory_format=torch.contiguous_format)
return (clone_default, clone_default_1)
""")


# --------------------------------------------------------------------------------------------
# the real model: transformers' GptOssForCausalLM, built tiny from its config

def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: never reach the Hub
    return pytest.importorskip("transformers")


def _gpt_oss_model():
    transformers = _transformers()
    config = transformers.GptOssConfig(
        vocab_size=96, hidden_size=256, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        # GPT-OSS's YaRN (attention_scaling != 1), the factor consistent with the lengths
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 8})
    config._attn_implementation = "eager"  # transformers has no SDPA path for GPT-OSS
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 0.1)
    return model


def _ids(batch: int = B, seq: int = S, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_gpt_oss_model_prefill(caplog):
    """Prefill with each row's own position ids; default options apart from the CPU."""
    model = _gpt_oss_model()
    _, pos = _inputs()

    def logits(ids, position_ids):
        return model(ids, position_ids=position_ids).logits

    assert_fused(logits, (_ids(), pos), caplog, options={**CPU_OPTIONS})


def test_gpt_oss_model_decode_step(caplog):
    """One token after a 7-token prefill, through the model's ``DynamicCache``."""
    transformers, model = _transformers(), _gpt_oss_model()
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(_ids(), cache=cache, use_cache=True)

    def step(ids):
        # a copy of the prefilled cache per call: eager and the compiled step see the same
        layer_cache = transformers.DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            layer_cache.update(layer.keys.clone(), layer.values.clone(), i)
        return model(ids, cache=layer_cache, use_cache=True).logits

    assert_fused(step, (_ids(seq=1, seed=2),), caplog, options={**CPU_OPTIONS})


# --------------------------------------------------------------------------------------------
# DeepSeek MLA: the de-interleaving RoPE is a counted miss naming it


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_interleave(q, k, cos, sin, unsqueeze_dim=1):
    """transformers 5.25's ``modeling_deepseek_v3.apply_rotary_pos_emb_interleave``."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return q_embed, k_embed


def apply_rotary_pos_emb_interleave_view(q, k, cos, sin, unsqueeze_dim=1):
    """The older spelling (DeepSeek's own ``modeling_deepseek.py``, transformers before the
    slices): de-interleave by a view, a transpose and a reshape, then ``rotate_half``."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    b, h, s, d = q.shape
    q = q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    b, h, s, d = k.shape
    k = k.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


NOPE, ROPE, LORA, V = 128, 64, 128, 128


class MLA(nn.Module):
    """DeepSeek-V3's attention prologue (``DeepseekV3Attention.forward`` without q LoRA or a
    cache): q heads ``NOPE + ROPE`` wide, ``q_rot`` their last ``ROPE`` columns; ``k_rot`` one
    head shared by all q heads, split from the latent projection; SDPA."""

    def __init__(self, apply: Callable) -> None:
        super().__init__()
        self.apply_rope = apply
        self.q_proj = nn.Linear(HIDDEN, HQ * (NOPE + ROPE), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(HIDDEN, LORA + ROPE, bias=False)
        self.kv_b_proj = nn.Linear(LORA, HQ * (NOPE + V), bias=False)
        self.o_proj = nn.Linear(HQ * V, HIDDEN, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, NOPE + ROPE).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [NOPE, ROPE], dim=-1)
        kv_nope, k_rot = torch.split(self.kv_a_proj_with_mqa(x), [LORA, ROPE], dim=-1)
        k_rot = k_rot.view(b, 1, s, ROPE)
        q_rot, k_rot = self.apply_rope(q_rot, k_rot, cos, sin)
        kv = self.kv_b_proj(kv_nope).view(b, s, -1, NOPE + V).transpose(1, 2)
        k_nope, value = torch.split(kv, [NOPE, V], dim=-1)
        key = torch.cat((k_nope, k_rot.expand(-1, HQ, -1, -1)), dim=-1)
        query = torch.cat((q_pass, q_rot), dim=-1)
        y = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLAStack(nn.Module):
    def __init__(self, apply: Callable) -> None:
        super().__init__()
        torch.manual_seed(0)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, ROPE, 2, dtype=torch.float) / ROPE))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList(MLA(apply) for _ in range(LAYERS))

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq  # HF's [B, S, rot] tables
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for layer in self.layers:
            x = x + layer(x, cos, sin)
        return x


def test_mla_interleave_miss_reported(caplog):
    missed = assert_missed(MLAStack(apply_rotary_pos_emb_interleave).eval(), _inputs(), caplog)
    assert missed == {f"missed: {DEINTERLEAVE_REASON}": 2 * LAYERS}, missed


def test_mla_interleave_view_spelling():
    """The older spelling rotates a de-interleaved copy with ``rotate_half``: a proven RoPE of
    that copy (its 64-wide heads are a head-size skip by default). Batch 1: rewritten, q_rot and
    the shared k_rot head in one call; batch 2: the copy is ``[B, H, S, 64]`` contiguous, its
    token dims do not merge (a counted skip)."""
    model = MLAStack(apply_rotary_pos_emb_interleave_view).eval()
    options = {**CPU_OPTIONS, **FORCE_REWRITE, "head_sizes": (64, 128)}
    for batch, want in ((1, "rewritten"),
                        (2, "skipped: x's token dims do not merge into one without a copy")):
        args = _inputs(batch=batch)
        expected = model(*args)
        with fresh_compile():
            out = torch.compile(model, backend="rope_compile", options=options)(*args)
            counts = rope_counters()
        torch.testing.assert_close(out, expected, **TOL)
        assert counts.get(want) == LAYERS, counts
        assert not {k for k in counts if "error" in k or k.startswith("missed")}, counts


@pytest.mark.parametrize("interleave", [True, False], ids=["rope_interleave", "rotate_half"])
def test_deepseek_v3_model(interleave, caplog):
    """The real ``DeepseekV3ForCausalLM``, tiny: with ``rope_interleave`` (its default) a
    counted miss naming the de-interleave; without, HF ``rotate_half`` on q's last 64 columns,
    a proven RoPE (a counted head-size skip with the default ``head_sizes``)."""
    transformers = _transformers()
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=256, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=LORA, qk_rope_head_dim=ROPE,
        qk_nope_head_dim=NOPE, v_head_dim=V, max_position_embeddings=256)
    assert config.rope_interleave
    config.rope_interleave = interleave
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()

    def logits(ids):
        return model(ids).logits

    if interleave:
        missed = assert_missed(logits, (_ids(),), caplog)
        assert missed == {f"missed: {DEINTERLEAVE_REASON}": 2 * LAYERS}, missed
    else:
        counts, missed, _, calls = _compile(logits, (_ids(),), caplog, LENIENT)
        assert calls == 0 and not missed, counts
        assert counts.get("skipped: head_size 64 not in (128, 256, 512)") == LAYERS, counts
