"""The KV-store extension (``passes/fuse_kv_store.py``): a fused RoPE call grows over the
KV-cache write of the rotated k and of v into one ``fused_qk_rope_kv_store_inplace`` call.

Compiled with ``backend="rope_compile"`` and the CPU test options (pass forced on, strict):

* the sglang decode step, ``RotaryEmbedding.forward_native(..., fused_set_kv_buffer_arg=...)``
  (fp32 / bf16 / scales / an fp8 cache), and a hand-written ``k_cache[loc] = k`` layer;
* HF Llama with a ``StaticCache`` (prefill eagerly, compile the decode step): the 4-D form,
  once the table-form store op is registered;
* refusals, each with its counted reason and eager's results: an accumulating write, k and v
  at different ``loc``, a cache that overlaps k.

Checks: the fused call in the generated code, the counters, the KV buffers (written rows equal
to torch's cast of the compiled k bit for bit, every other row untouched, and close to eager's),
the outputs, and the rewritten region's graph (inline, expecttest).

Refresh the inline graph after an intended change with::

    EXPECTTEST_ACCEPT=1 python -m pytest tests/test_pass_kv_store.py
"""

from __future__ import annotations

import expecttest
import pytest
import torch
from pass_helpers import CPU_OPTIONS, CaptureGraph, cpu_pass, fresh_compile, rope_counters
from rope_compile.passes.fuse_kv_store import FuseKVStorePass
from rope_compile.passes.fuse_qk_norm import FuseQKNormPass
from torch import nn
from torch._inductor.utils import run_and_get_code

from rope_compile import FusedSetKVBufferArg, RotaryEmbedding

FP8 = getattr(torch, "float8_e4m3fn", None)
T, HQ, HK, D, SLOTS, HIDDEN = 3, 4, 2, 128, 16, 64
LOC = (11, 2, 7)  # distinct cache rows, unsorted
KV_CALL = "rope_compile.fused_qk_rope_kv_store_inplace.default("


def _linear(rows: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(HIDDEN, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / HIDDEN**0.5)
    return layer


class SglangLayer(nn.Module):
    """sglang's decode step: qkv -> split -> forward_native with the fused KV-store argument,
    then attention over the cache rows just written (a reader of the new buffer value)."""

    def __init__(self, dtype=torch.float32, scale=None, rotary_dim=D) -> None:
        super().__init__()
        self.qkv = _linear((HQ + 2 * HK) * D, 0).to(dtype)
        self.rope = RotaryEmbedding(D, rotary_dim, 64, 10000.0, True, torch.float32)
        self.scale = scale

    def forward(self, positions, x, k_buffer, v_buffer, loc):
        q, k, v = self.qkv(x).split([HQ * D, HK * D, HK * D], dim=-1)
        arg = FusedSetKVBufferArg(value=v, k_buffer=k_buffer, v_buffer=v_buffer,
                                  k_scale=self.scale, v_scale=self.scale, cache_loc=loc)
        q, k = self.rope.forward_native(positions, q, k, fused_set_kv_buffer_arg=arg)
        keys = k_buffer[loc].to(q.dtype).repeat_interleave(HQ // HK, 1)  # [T, Hq, D]
        scores = (q.view(T, HQ, D) * keys).sum(-1)
        return q, k, scores


class HandWrittenLayer(nn.Module):
    """A layer writing its cache itself: ``k_cache[loc] = k`` / ``index_put_`` (``how``)."""

    def __init__(self, how: str = "setitem") -> None:
        super().__init__()
        self.qkv = _linear((HQ + 2 * HK) * D, 1)
        self.rope = RotaryEmbedding(D, D, 64, 10000.0, True, torch.float32)
        self.how = how

    def forward(self, positions, x, k_cache, v_cache, loc):
        q, k, v = self.qkv(x).split([HQ * D, HK * D, HK * D], dim=-1)
        q, k = self.rope.forward_native(positions, q, k)
        k, v = k.view(T, HK, D), v.view(T, HK, D)
        if self.how == "setitem":
            k_cache[loc] = k
            v_cache[loc] = v
        elif self.how == "index_put_":
            k_cache.index_put_((loc,), k)
            v_cache.index_put_((loc,), v)
        elif self.how == "accumulate":
            k_cache.index_put_((loc,), k, accumulate=True)
            v_cache.index_put_((loc,), v, accumulate=True)
        elif self.how == "other_loc":
            k_cache[loc] = k
            v_cache[loc.flip(0)] = v
        return q, k_cache[loc].sum(-1)


class OverlappingCacheLayer(nn.Module):
    """The k cache is the projection's own k region: the write overlaps the k it stores."""

    def __init__(self) -> None:
        super().__init__()
        self.rope = RotaryEmbedding(D, D, 64, 10000.0, True, torch.float32)

    def forward(self, positions, qkv, v_cache, loc):
        q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
        q2, k2 = self.rope.forward_native(positions, q, k)
        k_cache = k.view(T, HK, D)  # a view of qkv
        k_cache[loc] = k2.view(T, HK, D)
        v_cache[loc] = v.view(T, HK, D)
        return q2 * 1.0


def _inputs(dtype=torch.float32, cache_dtype=None, loc=LOC):
    g = torch.Generator().manual_seed(3)
    cache_dtype = cache_dtype or dtype
    positions = torch.tensor([5, 31, 9])
    x = torch.randn(T, HIDDEN, generator=g).to(dtype)
    k_buffer = torch.randn(SLOTS, HK, D, generator=g).to(cache_dtype)
    v_buffer = torch.randn(SLOTS, HK, D, generator=g).to(cache_dtype)
    return positions, x, k_buffer, v_buffer, torch.tensor(loc)


def _clone(inputs):
    return tuple(t.clone() for t in inputs)


def compile_and_run(model, inputs):
    """(outputs, generated code, counters) of ``model`` compiled with the backend, run on
    ``inputs`` (mutated like eager)."""
    with fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(model, backend="rope_compile", options=CPU_OPTIONS), *inputs)
        counts = rope_counters()
    return out, "\n".join(codes), counts


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    else:  # one rounding of the fused kernel against eager's several
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


def _stored(x: torch.Tensor, scale, dtype) -> torch.Tensor:
    """torch's conversion of ``x`` as the cache stores it."""
    if scale is not None:
        x = x.float() / scale
    return x.to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b)


def _check_buffers(before, after, eager, k_out, v, scale, loc=LOC):
    """Written rows = the cast of the compiled k / of v, bit for bit; other rows untouched;
    and close to eager's buffers."""
    rows = torch.tensor(loc)
    others = torch.ones(SLOTS, dtype=torch.bool)
    others[rows] = False
    for buf, old, want, value in zip(after, before, eager, (k_out, v), strict=True):
        _same_bits(buf[rows], _stored(value, scale, buf.dtype))
        _same_bits(buf[others], old[others])
        if buf.dtype == torch.float32:
            torch.testing.assert_close(buf, want, atol=2e-5, rtol=2e-5)
        else:  # at most one step of the cache dtype from eager's (eager rounds k more often)
            step = 0.125 if buf.element_size() == 1 else 2**-7
            torch.testing.assert_close(buf.float(), want.float(), atol=1e-2, rtol=step)


CASES = {
    "fp32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, None, None),
    "fp32-scale": (torch.float32, None, 0.37),
    "bf16-fp16-cache": (torch.bfloat16, torch.float16, None),
}
if FP8 is not None:
    CASES["bf16-fp8-cache-scale"] = (torch.bfloat16, FP8, 0.25)


@pytest.mark.parametrize("case", list(CASES))
def test_sglang_decode_step(case):
    dtype, cache_dtype, scale = CASES[case]
    model = SglangLayer(dtype, scale)
    inputs = _inputs(dtype, cache_dtype)
    before = _clone(inputs)
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = compile_and_run(model, inputs)
    assert counts == {"pairs_found": 1, "rewritten": 1, "kv_store rewritten": 1}
    assert code.count(KV_CALL) == 1
    assert "fused_qk_rope_with_cos_sin_cache_inplace" not in code
    assert "index_put" not in code  # the cache rows are written by the fused call only
    with fresh_compile():
        inductor = torch.compile(model)(*_clone(before))  # plain Inductor, unfused
    for got, want, plain in zip(out[:2], expected[:2], inductor[:2], strict=True):
        _close(got, want, dtype)
        assert torch.equal(got, plain)  # the same rotation as Inductor's code
    # The scores read the cache rows just written: as Inductor's (an fp8 cache quantises).
    torch.testing.assert_close(out[2].float(), inductor[2].float(), atol=1e-2, rtol=1e-2)
    v = model.qkv(before[1]).split([HQ * D, HK * D, HK * D], -1)[2].view(T, HK, D)
    _check_buffers(before[2:4], inputs[2:4], eager_inputs[2:4], out[1].view(T, HK, D),
                   v.detach(), scale)


def test_sglang_partial_rotary_stores_whole_heads():
    """rotary_dim 64 of head 128: the call rotates k[..., :64], the store writes whole heads
    (the pass-through tail too)."""
    model = SglangLayer(rotary_dim=64)
    inputs = _inputs()
    before, eager_inputs = _clone(inputs), _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = compile_and_run(model, inputs)
    assert counts == {"pairs_found": 1, "rewritten": 1, "kv_store rewritten": 1}
    assert code.count(KV_CALL) == 1
    for got, want in zip(out, expected, strict=True):
        _close(got, want, torch.float32)
    v = model.qkv(before[1]).split([HQ * D, HK * D, HK * D], -1)[2].view(T, HK, D)
    _check_buffers(before[2:4], inputs[2:4], eager_inputs[2:4], out[1].view(T, HK, D),
                   v.detach(), None)


@pytest.mark.parametrize("how", ["setitem", "index_put_"])
def test_hand_written_cache_write(how):
    model = HandWrittenLayer(how)
    inputs = _inputs()
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = compile_and_run(model, inputs)
    assert counts == {"pairs_found": 1, "rewritten": 1, "kv_store rewritten": 1}
    assert code.count(KV_CALL) == 1
    for got, want in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# refusals: the reason counted, the graph left to Inductor, results as eager


@pytest.mark.parametrize("how, reason", [
    ("accumulate", "the k write accumulates (index_put accumulate=True), the op overwrites"),
    ("other_loc", "k and v are written at different cache_loc"),
])
def test_refused(how, reason):
    model = HandWrittenLayer(how)
    inputs = _inputs()
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = compile_and_run(model, inputs)
    assert counts == {"pairs_found": 1, "rewritten": 1, f"kv_store skipped: {reason}": 1}
    assert KV_CALL not in code
    for got, want in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_refused_cache_overlapping_k():
    model = OverlappingCacheLayer()
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(T, (HQ + 2 * HK) * D, generator=g)
    inputs = (torch.tensor([5, 31, 9]), qkv, torch.zeros(SLOTS, HK, D), torch.tensor([2, 0, 1]))
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = compile_and_run(model, inputs)
    assert not counts.get("kv_store rewritten")
    assert counts == {"pairs_found": 1, "rewritten": 1,
                      "kv_store skipped: k_buffer shares memory with q/k": 1}
    assert KV_CALL not in code
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    for got, want in zip(inputs, eager_inputs, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_no_cache_write_counts_nothing():
    """A RoPE whose k is not written into a cache is not a candidate: no counter at all."""
    model = HandWrittenLayer("setitem")
    model.forward = lambda positions, x, k_cache, v_cache, loc: model.rope.forward_native(
        positions, *model.qkv(x).split([HQ * D, HK * D, HK * D], dim=-1)[:2])
    out, code, counts = compile_and_run(model, _inputs())
    assert counts == {"pairs_found": 1, "rewritten": 1}


# --------------------------------------------------------------------------------------------
# the rewritten graph


def _render_region(graph) -> str:
    from pass_helpers import render_node

    keep = []
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        text = render_node(node)
        if node.op == "output" or "permute" in text or " = aten.mm" in text:
            continue
        keep.append(text)
    return "\n".join(keep) + "\n"


class TestRewrittenGraph(expecttest.TestCase):
    def test_sglang_fp32_graph(self):
        model = SglangLayer()
        after = CaptureGraph()
        passes = (cpu_pass(), FuseQKNormPass(**CPU_OPTIONS), FuseKVStorePass(**CPU_OPTIONS),
                  after)
        with fresh_compile(), torch._inductor.config.patch(post_grad_custom_post_pass=passes):
            torch.compile(model)(*_inputs())
        self.assertExpectedInline(_render_region(after.graphs[0]), """\
split_with_sizes_4 = aten.split_with_sizes.default(mm, [512, 256, 256], -1)
getitem_13: f32[3, 256] = split_with_sizes_4[2]
view_15: f32[3, 2, 128] = aten.reshape.default(getitem_13, [3, 2, -1])
auto_functionalized_v2_1 = auto_functionalized_v2(
    rope_compile.fused_qk_rope_kv_store_inplace.default,
    cos_sin_cache=arg6_1,
    positions=arg5_1,
    rotary_dim=128,
    is_neox=True,
    v=view_15,
    cache_loc=arg4_1,
    k_scale=None,
    v_scale=None,
    _q_base_index=0,
    _q_size=(3, 4, 128),
    _q_stride=(1024, 128, 1),
    _q_storage_offset=0,
    _k_base_index=0,
    _k_size=(3, 2, 128),
    _k_stride=(1024, 128, 1),
    _k_storage_offset=512,
    _k_buffer_base_index=1,
    _v_buffer_base_index=2,
    _all_bases=[mm, arg2_1, arg3_1])
getitem_14: f32[3, 1024] = auto_functionalized_v2_1[1]
split_with_sizes_7 = aten.split_with_sizes.default(getitem_14, [512, 256, 256], -1)
getitem_19: f32[3, 256] = split_with_sizes_7[1]
view_20: f32[3, 2, 128] = aten.reshape.default(getitem_19, [3, -1, 128])
split_with_sizes_6 = aten.split_with_sizes.default(getitem_14, [512, 256, 256], -1)
getitem_18: f32[3, 512] = split_with_sizes_6[0]
view_17: f32[3, 4, 128] = aten.reshape.default(getitem_18, [3, -1, 128])
view_18: f32[3, 512] = aten.reshape.default(view_17, [3, 512])
view_19: f32[3, 4, 128] = aten.reshape.default(view_18, [3, 4, 128])
getitem_15: f32[16, 2, 128] = auto_functionalized_v2_1[2]
getitem_16: f32[16, 2, 128] = auto_functionalized_v2_1[3]
clone_default_1: f32[3, 4, 128] = aten.clone.default(
    view_17,
    memory_format=torch.contiguous_format)
view_11: f32[3, 512] = aten.reshape.default(clone_default_1, [3, 512])
clone_default: f32[3, 2, 128] = aten.clone.default(
    view_20,
    memory_format=torch.contiguous_format)
view_8: f32[3, 256] = aten.reshape.default(clone_default, [3, 256])
index_1: f32[3, 2, 128] = aten.index.Tensor(getitem_15, [arg4_1])
unsqueeze_4: f32[3, 2, 1, 128] = aten.unsqueeze.default(index_1, 2)
expand: f32[3, 2, 2, 128] = aten.expand.default(unsqueeze_4, [3, 2, 2, 128])
clone_2: f32[3, 2, 2, 128] = aten.clone.default(expand, memory_format=torch.contiguous_format)
view_5: f32[3, 4, 128] = aten.reshape.default(clone_2, [3, 4, 128])
mul_8: f32[3, 4, 128] = aten.mul.Tensor(view_19, view_5)
sum_1: f32[3, 4] = aten.sum.dim_IntList(mul_8, [-1])
copy_: f32[16, 2, 128] = aten.copy_.default(arg2_1, getitem_15)
copy__1: f32[16, 2, 128] = aten.copy_.default(arg3_1, getitem_16)
""")


# --------------------------------------------------------------------------------------------
# HF StaticCache (4-D buffers, the table-form store op)


def _has_op(name: str) -> bool:
    import rope_compile.ops  # noqa: F401

    return hasattr(torch.ops.rope_compile, name)


needs_tables_store = pytest.mark.skipif(
    not _has_op("fused_qk_rope_kv_store_tables_inplace"),
    reason="the table-form KV-store op is not registered in this install")


def hf_decode(name: str, batch: int = 2, prefill: int = 5, cache_len: int = 16,
              device: str = "cpu", dtype: torch.dtype = torch.float32):
    """HF ``name`` (tiny, in ``dtype``) decode step on a StaticCache after an eager prefill,
    eager and compiled (on the CPU forced on, elsewhere with the default options): (eager
    logits, compiled logits, eager cache, compiled cache, code, counters)."""
    import inspect

    transformers = pytest.importorskip("transformers")
    from transformers import StaticCache

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen3": (transformers.Qwen3Config,
                                       transformers.Qwen3ForCausalLM),
                             "gemma3": (transformers.Gemma3TextConfig,
                                        transformers.Gemma3ForCausalLM),
                             "olmo2": (transformers.Olmo2Config,
                                       transformers.Olmo2ForCausalLM)}[name]
    torch.manual_seed(0)
    config = config_cls(vocab_size=96, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=128, max_position_embeddings=256, attn_implementation="sdpa")
    model = model_cls(config).eval().to(device=device, dtype=dtype)
    params = inspect.signature(model.model.forward).parameters
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 96, (batch, prefill), generator=g).to(device)
    ids = torch.randint(0, 96, (batch, 1), generator=g).to(device)
    positions = torch.arange(cache_len, device=device)

    def kwargs(cache, cache_position):
        found = {"cache" if "cache" in params else "past_key_values": cache,
                 "position_ids": cache_position.expand(batch, -1), "use_cache": True}
        if "cache_position" in params:
            found["cache_position"] = cache_position
        return found

    def prefilled():
        cache = StaticCache(config=config, max_cache_len=cache_len)
        with torch.no_grad():
            model(prompt, **kwargs(cache, positions[:prefill]))
        return cache

    step = positions[prefill:prefill + 1]
    eager_cache = prefilled()
    with torch.no_grad():
        expected = model(ids, **kwargs(eager_cache, step)).logits
    cache = prefilled()
    with fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(model, backend="rope_compile",
                          options=CPU_OPTIONS if device == "cpu" else {}),
            ids, **kwargs(cache, step))
        counts = rope_counters()
    return expected, out.logits, eager_cache, cache, "\n".join(codes), counts


@needs_tables_store
def test_hf_llama_static_cache_decode():
    expected, got, eager_cache, cache, code, counts = hf_decode("llama")
    assert counts == {"pairs_found": 2, "rewritten": 2, "kv_store rewritten": 2}
    assert code.count("fused_qk_rope_kv_store_tables_inplace.default(") == 2
    assert "index_copy" not in code and "index_put" not in code
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(cache.layers, eager_cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# found by the prologue fuzzer (tests/fuzz_prologue.py): open misses, strict xfail


def _decode(how: str, tokens: int = 1):
    """sglang's decode step of ``tokens`` tokens: ``forward_native`` with the fused KV-store
    argument (``set_kv_buffer_native``: ``k_buffer[loc] = k``, the rotated q and k returned),
    or ``index_put_`` of the rotated k (``"index_put_"``: before the reshape forward_native
    returns; ``"index_put_returned"``: a view of the returned k, k returned too)."""
    rope = RotaryEmbedding(D, D, 64, 10000.0, True, torch.float32)
    qkv_layer = _linear((HQ + 2 * HK) * D, 5)

    def step(positions, x, k_buffer, v_buffer, loc):
        q, k, v = qkv_layer(x).split([HQ * D, HK * D, HK * D], dim=-1)
        if how == "setitem":
            arg = FusedSetKVBufferArg(value=v, k_buffer=k_buffer, v_buffer=v_buffer,
                                      k_scale=None, v_scale=None, cache_loc=loc)
            return rope.forward_native(positions, q, k, fused_set_kv_buffer_arg=arg)
        q, k = rope.forward_native(positions, q, k)
        k_buffer.index_put_((loc,), k.view(tokens, HK, D))
        v_buffer.index_put_((loc,), v.view(tokens, HK, D))
        return (q, k) if how == "index_put_returned" else (q, k_buffer[loc].sum(-1))

    g = torch.Generator().manual_seed(6)
    inputs = (torch.randint(0, 64, (tokens,), generator=g),
              torch.randn(tokens, HIDDEN, generator=g), torch.randn(SLOTS, HK, D, generator=g),
              torch.randn(SLOTS, HK, D, generator=g), torch.randperm(SLOTS, generator=g)[:tokens])
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = step(*eager_inputs)
    out, code, counts = compile_and_run(step, inputs)
    for got, want in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    return counts


FUSED_KV = {"pairs_found": 1, "rewritten": 1, "kv_store rewritten": 1}


@pytest.mark.parametrize("how, tokens", [("index_put_", 1), ("setitem", 3)])
def test_decode_cache_write_is_fused(how, tokens):
    assert _decode(how, tokens) == FUSED_KV


def test_one_token_decode_setitem_is_fused():
    """``k_buffer[loc] = k`` with one token (sglang's one-token decode): torch's setitem strips
    the values' leading size-1 dims (index_put gets [Hk, D]); found by the prologue fuzzer."""
    assert _decode("setitem", 1) == FUSED_KV


def test_written_k_also_returned_is_fused():
    """``k_buffer.index_put_((loc,), k.view(T, Hk, D))`` and ``return q, k``: the returned k
    gets an eager-laid-out copy for the graph output only, the cache write reads the rotated
    k in place and is fused (found while writing the prologue fuzzer's tests)."""
    assert _decode("index_put_returned", 3) == FUSED_KV


def test_hf_setitem_batch_one_is_fused():
    """HF's `keys[:, :, cache_position] = k` at batch 1: setitem strips k's leading size-1 dim
    (index_put gets [Hk, S, D]); found by the prologue fuzzer, fixed."""
    import fuzz_prologue as fp

    p = fp.PrologueProgram(form="hf", source="qkv_input", is_neox=True, head_size=D,
                           rotary_dim=D, dtype=torch.float32, num_tokens=3, batch=1,
                           num_q_heads=HQ, num_kv_heads=HK, norm="none", gemma=False,
                           store="write", store_how="setitem", cache_dtype=torch.float32,
                           scale=None, extra_rows=4, seed=7)
    r = fp.check_program(p, control=False)
    assert not (r.categories - {"oracle_missed"}), r.failures  # values, caches, strides right
    assert r.counters.get("kv_store rewritten") == 1, r.counters


# --------------------------------------------------------------------------------------------
# fault injection: an error inside the KV-store pass


def _raise(*args, **kwargs):
    raise RuntimeError("injected kv_store failure")


@pytest.mark.parametrize("where", ["_stored_source", "rebase_views"],
                         ids=["planning", "rewriting"])
def test_injected_error_strict_reraises(monkeypatch, where):
    from rope_compile.passes import fuse_kv_store

    monkeypatch.setattr(fuse_kv_store, where, _raise)
    with fresh_compile(), pytest.raises(Exception, match="injected kv_store failure"):
        torch.compile(HandWrittenLayer("index_put_"), backend="rope_compile",
                      options=CPU_OPTIONS)(*_inputs())


@pytest.mark.parametrize("where", ["_stored_source", "rebase_views"],
                         ids=["planning", "rewriting"])
def test_injected_error_not_strict_costs_the_candidate_only(monkeypatch, where):
    """strict=False: the error is counted (candidate_errors), the KV-store candidate left as it
    was (the RoPE rewrite kept, the cache written by Inductor), results as eager."""
    from rope_compile.passes import fuse_kv_store

    model = HandWrittenLayer("index_put_")
    inputs = _inputs()
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    monkeypatch.setattr(fuse_kv_store, where, _raise)
    with fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(model, backend="rope_compile",
                          options={**CPU_OPTIONS, "strict": False}), *inputs)
        counts = rope_counters()
    code = "\n".join(codes)
    assert counts == {"pairs_found": 1, "rewritten": 1, "candidate_errors": 1}
    assert KV_CALL not in code
    assert code.count("fused_qk_rope_with_cos_sin_cache_inplace.default(") == 1
    for got, want in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
