"""The QK-norm extension (``passes/fuse_qk_norm.py``): a fused RoPE call grows backwards over
a proven RMSNorm of q and of k (per head, or of the whole projection as OLMo2's) into
``fused_qk_norm_rope_inplace`` (and, with the KV-store extension,
``fused_qk_norm_rope_kv_store_inplace``).

Compiled with ``backend="rope_compile"`` and the CPU test options: a Qwen3-style hand-written
layer (``q_norm`` / ``k_norm`` as HF's ``Qwen3RMSNorm``, or Gemma3's ``(1 + w)`` form; RoPE by
``forward_native``), per head or over the whole ``[T, H * D]`` projection (OLMo2), with and
without sglang's KV store, and HF Qwen3 / Gemma3 / OLMo2 with a StaticCache (decode step) once
the table-form ops are registered. OLMo2's own rounding (once, after the weight) is the op's
``round_once=True`` in bf16/fp16: fused, bit for bit as eager's norm (hand-written and a bf16 HF
OLMo2). Refusals: a norm output with another reader, different eps for q and k, each counted
with its reason and results as eager.

Refresh the inline graph after an intended change with::

    EXPECTTEST_ACCEPT=1 python -m pytest tests/test_pass_qk_norm.py
"""

from __future__ import annotations

import expecttest
import pytest
import torch
from pass_helpers import CPU_OPTIONS, CaptureGraph, cpu_pass, fresh_compile, render_node
from rope_compile.passes.fuse_kv_store import FuseKVStorePass
from rope_compile.passes.fuse_qk_norm import FuseQKNormPass
from test_pass_kv_store import _clone, _has_op, _inputs, _linear, compile_and_run, hf_decode
from torch import nn

from rope_compile import FusedSetKVBufferArg, RotaryEmbedding

T, HQ, HK, D = 3, 4, 2, 128
NORM_CALL = "rope_compile.fused_qk_norm_rope_inplace.default("
NORM_KV_CALL = "rope_compile.fused_qk_norm_rope_kv_store_inplace.default("


class RMSNorm(nn.Module):
    """HF ``Qwen3RMSNorm`` (``gemma=False``), ``Gemma3RMSNorm`` (``gemma=True``) or
    ``Olmo2RMSNorm`` (``olmo2=True``: ``(w * x_normed).to(dtype)``, one rounding after the
    weight; ``olmo2="swapped"``: ``(x_normed * w).to(dtype)``)."""

    def __init__(self, dim: int, eps: float = 1e-6, gemma: bool = False, seed: int = 0,
                 olmo2: bool | str = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(dim, generator=g) * 0.1 + (0.0 if gemma else 1.0))
        self.eps, self.gemma, self.olmo2 = eps, gemma, olmo2

    def forward(self, hidden):
        if self.gemma:
            x = hidden.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return (x * (1.0 + self.weight.float())).type_as(hidden)
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        if self.olmo2 == "swapped":
            return (hidden * self.weight).to(dtype)
        if self.olmo2:
            return (self.weight * hidden).to(dtype)
        return self.weight * hidden.to(dtype)


class Qwen3StyleLayer(nn.Module):
    """qkv -> split -> per-head q_norm / k_norm -> forward_native (optionally with sglang's
    KV store). ``variant``: "other_reader" also returns the normalised q; "eps" gives k_norm
    another eps; "whole" normalises the whole q and k projections ``[T, H * D]`` (as OLMo2,
    with ``norm``'s rounding); "olmo2": the same with OLMo2's own rounding ("olmo2_swapped":
    the product's operands the other way round)."""

    def __init__(self, dtype=torch.float32, gemma=False, store=False, variant="",
                 rotary_dim=D) -> None:
        super().__init__()
        self.qkv = _linear((HQ + 2 * HK) * D, 2)
        self.rope = RotaryEmbedding(D, rotary_dim, 64, 10000.0, True, torch.float32)
        whole = variant in ("whole", "olmo2", "olmo2_swapped")
        olmo2 = {"olmo2": True, "olmo2_swapped": "swapped"}.get(variant, False)
        self.q_norm = RMSNorm(HQ * D if whole else D, gemma=gemma, seed=1, olmo2=olmo2)
        self.k_norm = RMSNorm(HK * D if whole else D, 1e-5 if variant == "eps" else 1e-6,
                              gemma=gemma, seed=2, olmo2=olmo2)
        self.qkv.to(dtype)
        self.q_norm.to(dtype)
        self.k_norm.to(dtype)
        self.store, self.variant = store, variant

    def forward(self, positions, x, k_buffer, v_buffer, loc):
        q, k, v = self.qkv(x).split([HQ * D, HK * D, HK * D], dim=-1)
        if self.variant in ("whole", "olmo2", "olmo2_swapped"):
            q, k = self.q_norm(q), self.k_norm(k)
        else:
            q = self.q_norm(q.view(T, HQ, D)).view(T, HQ * D)
            k = self.k_norm(k.view(T, HK, D)).view(T, HK * D)
        arg = FusedSetKVBufferArg(value=v, k_buffer=k_buffer, v_buffer=v_buffer, k_scale=None,
                                  v_scale=None, cache_loc=loc) if self.store else None
        q2, k2 = self.rope.forward_native(positions, q, k, fused_set_kv_buffer_arg=arg)
        if self.variant == "other_reader":
            return q2, k2, q
        return q2, k2


def _run(model, dtype=torch.float32):
    inputs = _inputs(dtype)
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = compile_and_run(model, inputs)
    return out, expected, inputs, eager_inputs, code, counts


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    else:  # bf16: about one ulp (the fused kernel's sum of squares runs in another order)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma3"])
def test_qwen3_style_norm_rope(dtype, gemma):
    out, expected, *_, code, counts = _run(Qwen3StyleLayer(dtype, gemma), dtype)
    assert counts == {"pairs_found": 1, "rewritten": 1, "qk_norm rewritten": 1}
    assert code.count(NORM_CALL) == 1
    assert "rsqrt" not in code  # no norm left to Inductor
    for got, want in zip(out, expected, strict=True):
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qwen3_style_norm_rope_kv_store(dtype):
    out, expected, inputs, eager_inputs, code, counts = _run(
        Qwen3StyleLayer(dtype, store=True), dtype)
    assert counts == {"pairs_found": 1, "rewritten": 1, "qk_norm rewritten": 1,
                      "kv_store rewritten": 1}
    assert code.count(NORM_KV_CALL) == 1
    assert "index_put" not in code
    for got, want in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        _close(got, want, dtype)
    # The k rows hold exactly the compiled (normalised, rotated) k.
    rows = inputs[4]
    assert torch.equal(inputs[2][rows], out[1].view(T, HK, D))


@pytest.mark.parametrize("store", [False, True], ids=["rope", "rope-kv-store"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma3"])
def test_whole_projection_norm_rope(dtype, gemma, store):
    """OLMo2's layout: q_norm over the whole ``[T, Hq * D]`` projection (k_norm over
    ``[T, Hk * D]``), viewed into heads after it: one call that normalises each token's heads
    together (weights ``[H * D]``), rotates (and stores) them, values as eager."""
    out, expected, inputs, eager_inputs, code, counts = _run(
        Qwen3StyleLayer(dtype, gemma, store=store, variant="whole"), dtype)
    want = {"pairs_found": 1, "rewritten": 1, "qk_norm rewritten": 1}
    if store:
        want["kv_store rewritten"] = 1
    assert counts == want
    assert code.count(NORM_KV_CALL if store else NORM_CALL) == 1
    assert "rsqrt" not in code  # no norm left to Inductor
    for got, want_ in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        _close(got, want_, dtype)


@pytest.mark.parametrize("store", [False, True], ids=["rope", "rope-kv-store"])
@pytest.mark.parametrize("variant", ["", "whole"], ids=["per-head", "whole"])
def test_partial_rotary(variant, store):
    """rotary_dim 32 of head 128: the call rotates ``[T, H, 32]`` views of the norm output
    (each head's first columns); the new call normalises whole heads and rotates the same
    columns (found by the prologue fuzzer: refused as 'normalises [.., 128], not each head of
    32' from the Gemma3 [B, H, S, D] change on)."""
    out, expected, inputs, eager_inputs, code, counts = _run(
        Qwen3StyleLayer(store=store, variant=variant, rotary_dim=32))
    want = {"pairs_found": 1, "rewritten": 1, "qk_norm rewritten": 1}
    if store:
        want["kv_store rewritten"] = 1
    assert counts == want
    assert code.count(NORM_KV_CALL if store else NORM_CALL) == 1
    for got, want_ in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        _close(got, want_, torch.float32)


@pytest.mark.parametrize("variant, reason", [
    ("other_reader", "the q norm output has another reader"),
    ("eps", "q and k norms use different eps (1e-06 vs 1e-05)"),
])
def test_refused(variant, reason):
    out, expected, *_, code, counts = _run(Qwen3StyleLayer(variant=variant))
    assert counts == {"pairs_found": 1, "rewritten": 1, f"qk_norm skipped: {reason}": 1}
    assert NORM_CALL not in code
    for got, want in zip(out, expected, strict=True):
        _close(got, want, torch.float32)


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("variant", ["olmo2", "olmo2_swapped"], ids=["w*x", "x*w"])
@pytest.mark.parametrize("store", [False, True], ids=["rope", "rope-kv-store"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_olmo2_rounding(dtype, store, variant):
    """HF ``Olmo2RMSNorm`` rounds once, after the fp32 weight multiply
    (``convert(mul(w, mul(xf, r)), dtype)``): fused as the op's ``round_once=True`` in bf16 and
    fp16 (in float32 nothing is rounded: the Qwen3 form, no round_once), with and without the
    KV store (the argument survives the store's extension of the call), either operand order
    of the weight product; values as eager, and
    bit for bit as eager at position 0 (cos 1, sin 0: the outputs are the normalised q/k, and
    the cache rows the normalised k)."""
    out, expected, inputs, eager_inputs, code, counts = _run(
        Qwen3StyleLayer(dtype, store=store, variant=variant), dtype)
    want = {"pairs_found": 1, "rewritten": 1, "qk_norm rewritten": 1}
    if store:
        want["kv_store rewritten"] = 1
    assert counts == want
    assert code.count(NORM_KV_CALL if store else NORM_CALL) == 1
    assert "rsqrt" not in code  # no norm left to Inductor
    for got, want_ in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        _close(got, want_, dtype)
    # The call's round_once, by keyword in the post-grad graph.
    call = _fused_norm_call(Qwen3StyleLayer(dtype, store=store, variant=variant), dtype)
    assert call.kwargs.get("round_once") is (None if dtype == torch.float32 else True)
    assert call.kwargs["weight_offset"] == 0.0
    # Position 0: the norm alone, bit for bit.
    model = Qwen3StyleLayer(dtype, store=store, variant=variant)
    inputs = (torch.zeros_like(inputs[0]), *_inputs(dtype)[1:])
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, _, counts = compile_and_run(model, inputs)
    assert counts == want
    for got, want_ in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        assert torch.equal(got, want_)


def test_olmo2_rounding_for_q_only_refused():
    """q normalised with OLMo2's rounding, k with Qwen3's (bf16): one call has one rounding,
    refused with its reason; values as eager."""
    model = Qwen3StyleLayer(torch.bfloat16, variant="olmo2")
    model.k_norm.olmo2 = False
    out, expected, *_, code, counts = _run(model, torch.bfloat16)
    assert counts == {"pairs_found": 1, "rewritten": 1,
                      "qk_norm skipped: q and k norms differ in rounding (x_normed rounded "
                      "before the weight vs once after it)": 1}
    assert NORM_CALL not in code
    for got, want in zip(out, expected, strict=True):
        _close(got, want, torch.bfloat16)


def _fused_norm_call(model, dtype):
    """The QK-norm call node of ``model``'s post-grad graph after the passes."""
    after = CaptureGraph()
    passes = (cpu_pass(), FuseQKNormPass(**CPU_OPTIONS), FuseKVStorePass(**CPU_OPTIONS), after)
    with fresh_compile(), torch._inductor.config.patch(post_grad_custom_post_pass=passes):
        torch.compile(model)(*_inputs(dtype))
    calls = [n for n in after.graphs[0].nodes if n.op == "call_function" and n.args
             and "fused_qk_norm" in str(n.args[0])]
    assert len(calls) == 1, calls
    return calls[0]


def _rewritten_region(model) -> str:
    """The post-grad graph after the passes, without the projection's mm and permutes."""
    after = CaptureGraph()
    passes = (cpu_pass(), FuseQKNormPass(**CPU_OPTIONS), FuseKVStorePass(**CPU_OPTIONS), after)
    with fresh_compile(), torch._inductor.config.patch(post_grad_custom_post_pass=passes):
        torch.compile(model)(*_inputs())
    region = [render_node(n) for n in after.graphs[0].nodes
              if n.op == "call_function" and "permute" not in n.name
              and not n.name.startswith("mm")]
    return "\n".join(region) + "\n"


class TestRewrittenGraph(expecttest.TestCase):
    def test_whole_projection_fp32_graph(self):
        """OLMo2's layout: the call gets the whole-projection weights (arg2_1 [512] = Hq * D,
        arg3_1 [256] = Hk * D) and the projection's q/k as [T, H, D] heads; no norm left."""
        self.assertExpectedInline(_rewritten_region(Qwen3StyleLayer(variant="whole")), """\
auto_functionalized_v2_1 = auto_functionalized_v2(
    rope_compile.fused_qk_norm_rope_inplace.default,
    cos_sin_cache=arg5_1,
    positions=arg4_1,
    rotary_dim=128,
    is_neox=True,
    q_weight=arg2_1,
    k_weight=arg3_1,
    eps=1e-06,
    weight_offset=0.0,
    _q_base_index=0,
    _q_size=(3, 4, 128),
    _q_stride=(1024, 128, 1),
    _q_storage_offset=0,
    _k_base_index=0,
    _k_size=(3, 2, 128),
    _k_stride=(1024, 128, 1),
    _k_storage_offset=512,
    _all_bases=[mm])
getitem_11: f32[3, 1024] = auto_functionalized_v2_1[1]
split_with_sizes_2 = aten.split_with_sizes.default(getitem_11, [512, 256, 256], -1)
getitem_13: f32[3, 256] = split_with_sizes_2[1]
view_11: f32[3, 2, 128] = aten.reshape.default(getitem_13, [3, -1, 128])
split_with_sizes_1 = aten.split_with_sizes.default(getitem_11, [512, 256, 256], -1)
getitem_12: f32[3, 512] = split_with_sizes_1[0]
view_10: f32[3, 4, 128] = aten.reshape.default(getitem_12, [3, -1, 128])
clone_default: f32[3, 4, 128] = aten.clone.default(
    view_10,
    memory_format=torch.contiguous_format)
view_5: f32[3, 512] = aten.reshape.default(clone_default, [3, 512])
clone_default_1: f32[3, 2, 128] = aten.clone.default(
    view_11,
    memory_format=torch.contiguous_format)
view_8: f32[3, 256] = aten.reshape.default(clone_default_1, [3, 256])
""")

    def test_qwen3_style_fp32_graph(self):
        self.assertExpectedInline(_rewritten_region(Qwen3StyleLayer()), """\
auto_functionalized_v2_1 = auto_functionalized_v2(
    rope_compile.fused_qk_norm_rope_inplace.default,
    cos_sin_cache=arg5_1,
    positions=arg4_1,
    rotary_dim=128,
    is_neox=True,
    q_weight=arg2_1,
    k_weight=arg3_1,
    eps=1e-06,
    weight_offset=0.0,
    _q_base_index=0,
    _q_size=(3, 4, 128),
    _q_stride=(1024, 128, 1),
    _q_storage_offset=0,
    _k_base_index=0,
    _k_size=(3, 2, 128),
    _k_stride=(1024, 128, 1),
    _k_storage_offset=512,
    _all_bases=[mm])
getitem_11: f32[3, 1024] = auto_functionalized_v2_1[1]
split_with_sizes_2 = aten.split_with_sizes.default(getitem_11, [512, 256, 256], -1)
getitem_13: f32[3, 256] = split_with_sizes_2[1]
view_13: f32[3, 2, 128] = aten.reshape.default(getitem_13, [3, 2, 128])
split_with_sizes_1 = aten.split_with_sizes.default(getitem_11, [512, 256, 256], -1)
getitem_12: f32[3, 512] = split_with_sizes_1[0]
view_12: f32[3, 4, 128] = aten.reshape.default(getitem_12, [3, 4, 128])
clone_default: f32[3, 4, 128] = aten.clone.default(
    view_12,
    memory_format=torch.contiguous_format)
view_8: f32[3, 512] = aten.reshape.default(clone_default, [3, 512])
clone_default_1: f32[3, 2, 128] = aten.clone.default(
    view_13,
    memory_format=torch.contiguous_format)
view_10: f32[3, 256] = aten.reshape.default(clone_default_1, [3, 256])
""")


@pytest.mark.skipif(not _has_op("fused_qk_norm_rope_kv_store_tables_inplace"),
                    reason="the table-form QK-norm + KV-store op is not registered")
@pytest.mark.parametrize("name", ["qwen3", "gemma3", "olmo2"])
def test_hf_static_cache_decode(name):
    """HF Qwen3 normalises q/k as [B, S, H, D] before the transpose, Gemma3 as [B, H, S, D]
    after it, OLMo2 the whole [B, S, H * D] projection before the view into heads (float32:
    its rounding is the Qwen3 form): each way one call norms, rotates and stores each layer's
    q/k/v."""
    expected, got, eager_cache, cache, code, counts = hf_decode(name)
    assert counts == {"pairs_found": 2, "rewritten": 2, "qk_norm rewritten": 2,
                      "kv_store rewritten": 2}
    assert code.count("fused_qk_norm_rope_kv_store_tables_inplace.default(") == 2
    assert "index_copy" not in code and "index_put" not in code
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(cache.layers, eager_cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _has_op("fused_qk_norm_rope_kv_store_tables_inplace"),
                    reason="the table-form QK-norm + KV-store op is not registered")
def test_hf_olmo2_bf16_decode():
    """HF OLMo2 in bf16: its own norm rounding (once, after the weight) is fused, each layer's
    whole-projection q/k norm, RoPE and cache write in one call with round_once=True (in the
    generated call, before wrap_negative_cache_loc=False: HF's index_copy_ raises for a negative
    cache_position); logits and caches as eager within bf16 rounding (the fused RoPE rounds
    once, eager's several times)."""
    expected, got, eager_cache, cache, code, counts = hf_decode("olmo2", dtype=torch.bfloat16)
    assert counts == {"pairs_found": 2, "rewritten": 2, "qk_norm rewritten": 2,
                      "kv_store rewritten": 2}
    calls = [line for line in code.splitlines()
             if "fused_qk_norm_rope_kv_store_tables_inplace.default(" in line]
    assert len(calls) == 2
    assert all(line.rstrip().endswith(", None, None, True, False)") for line in calls), calls
    assert "index_copy" not in code and "index_put" not in code
    assert "rsqrt" in code  # the layers' input / post-attention norms: Inductor's
    torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=5e-2)
    for mine, theirs in zip(cache.layers, eager_cache.layers, strict=True):
        assert mine.keys.dtype == torch.bfloat16
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    # The first layer's v (not normalised, not rotated) is stored exactly.
    assert torch.equal(cache.layers[0].values, eager_cache.layers[0].values)


# --------------------------------------------------------------------------------------------
# fault injection: an error inside the QK-norm pass


def _raise(*args, **kwargs):
    raise RuntimeError("injected qk_norm failure")


@pytest.mark.parametrize("where", ["match_rms_norm", "rebase_views"],
                         ids=["planning", "rewriting"])
def test_injected_error_strict_reraises(monkeypatch, where):
    from rope_compile.passes import fuse_qk_norm

    monkeypatch.setattr(fuse_qk_norm, where, _raise)
    with fresh_compile(), pytest.raises(Exception, match="injected qk_norm failure"):
        torch.compile(Qwen3StyleLayer(), backend="rope_compile", options=CPU_OPTIONS)(*_inputs())


@pytest.mark.parametrize("store", [False, True], ids=["rope", "rope-kv-store"])
@pytest.mark.parametrize("where", ["match_rms_norm", "rebase_views"],
                         ids=["planning", "rewriting"])
def test_injected_error_not_strict_costs_the_candidate_only(monkeypatch, where, store):
    """strict=False: the error is counted (candidate_errors), the norm left to Inductor, the
    RoPE rewrite (and the KV-store extension of it) kept, results as eager."""
    from pass_helpers import rope_counters
    from rope_compile.passes import fuse_qk_norm
    from test_pass_kv_store import KV_CALL
    from torch._inductor.utils import run_and_get_code

    model = Qwen3StyleLayer(store=store)
    inputs = _inputs()
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    monkeypatch.setattr(fuse_qk_norm, where, _raise)
    with fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(model, backend="rope_compile",
                          options={**CPU_OPTIONS, "strict": False}), *inputs)
        counts = rope_counters()
    code = "\n".join(codes)
    want = {"pairs_found": 1, "rewritten": 1, "candidate_errors": 1}
    if store:
        want["kv_store rewritten"] = 1
    assert counts == want
    assert NORM_CALL not in code and NORM_KV_CALL not in code
    assert "rsqrt" in code  # the norm computed by Inductor
    assert code.count(KV_CALL if store else
                      "fused_qk_rope_with_cos_sin_cache_inplace.default(") == 1
    for got, want_ in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        _close(got, want_, torch.float32)


def test_norm_spelling_float_twice_bf16():
    """``x.float()`` spelled twice (``x.float().pow(2).mean(...)`` and ``x.float() * r``, as
    the demo's RMSNorm writes it): two cast nodes of one value, still the norm (bf16 model,
    the whole prologue in one call)."""
    from pass_helpers import rope_counters

    from rope_compile import demo

    torch.manual_seed(0)
    model = demo.TinyDecoder(layers=1).to(torch.bfloat16).eval()
    length, tokens = 16, 2
    g = torch.Generator().manual_seed(3)
    caches = ([torch.randn(tokens * length, 2, 128, generator=g).bfloat16()],
              [torch.randn(tokens * length, 2, 128, generator=g).bfloat16()])
    eager_caches = ([caches[0][0].clone()], [caches[1][0].clone()])
    inputs = demo.decode_inputs(0, tokens, length, 1024, "cpu")
    with fresh_compile():
        expected = model(*inputs, *eager_caches)
        got = torch.compile(model, backend="rope_compile", options=CPU_OPTIONS)(*inputs, *caches)
        counts = rope_counters()
    assert counts == {"pairs_found": 1, "rewritten": 1, "qk_norm rewritten": 1,
                      "kv_store rewritten": 1}, counts
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
    for mine, ref in ((caches[0][0], eager_caches[0][0]), (caches[1][0], eager_caches[1][0])):
        torch.testing.assert_close(mine, ref, atol=3e-2, rtol=3e-2)
