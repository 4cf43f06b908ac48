"""Readers of a rewritten tensor keep their meaning (``passes/readers.py``).

Before a rewrite, the rotated (or normed and rotated) q and k are fresh dense tensors at offset
0; after it they are strided views into the projection. A reader that only sees values may read
the view; one whose meaning depends on the layout (a graph output, ``as_strided``, a view op the
pass does not know, an in-place custom op taking the tensor as its base, a second fused call)
reads a copy in the old layout. Each program here is a Qwen3-style layer (QK-norm, RoPE,
optionally sglang's KV store) with one such reader, compiled with the CPU test options: values,
output strides and mutated buffers must equal eager's, and the prologue is still rewritten.
"""

from __future__ import annotations

import pytest
import torch
from pass_helpers import CPU_OPTIONS, fresh_compile, rope_counters
from test_pass_kv_store import _clone, _inputs, _linear
from test_pass_qk_norm import HK, HQ, RMSNorm
from torch import nn
from torch._inductor.utils import run_and_get_code

from rope_compile import FusedSetKVBufferArg, RotaryEmbedding

T, D = 3, 128


@torch.library.custom_op("rope_compile_test::scale_", mutates_args=("x",))
def _scale_(x: torch.Tensor, factor: float) -> None:
    x.mul_(factor)


@_scale_.register_fake
def _(x, factor):
    return None


def _diag(x):
    return torch.diagonal(x, 0, -2, -1)


READERS = {
    # a user's in-place custom op on a view of the rotated k, then k read on
    "custom_op_on_k_view": lambda q, k: (_scale_(k.view(T, HK, D)[:, 1], 3.0), q, k * 1.0)[1:],
    "custom_op_on_q": lambda q, k: (_scale_(q, 2.0), q + 0, k + 0)[1:],
    "as_strided_q": lambda q, k: (q.as_strided((T, 64), (HQ * D, 1), 128), k + 0),
    "as_strided_k_read": lambda q, k: (q + 0, k.as_strided((2, 8), (1, 2), 5) * 2),
    "diagonal_q": lambda q, k: (torch.diagonal(q.view(T, HQ, D), 0, 1, 2), k + 0),
    "unfold_k": lambda q, k: (q + 0, k.unfold(-1, 4, 3)),
    "returned": lambda q, k: (q, k),
    "view_returned": lambda q, k: (q.view(T, HQ, D).transpose(0, 1), k.view(T, HK, D)[:, 0]),
    "stride_dependent_op": lambda q, k: (torch.empty_like(q).copy_(q), k.contiguous() + 0),
}


class Layer(nn.Module):
    """qkv -> per-head q_norm / k_norm -> forward_native (optionally with sglang's KV store)
    -> ``READERS[reader](q, k)``; ``second``: a second RoPE pair of the rotated q and k."""

    def __init__(self, reader: str, store: bool = False, second: bool = False):
        super().__init__()
        self.qkv = _linear((HQ + 2 * HK) * D, 2)
        self.rope = RotaryEmbedding(D, D, 64, 10000.0, True, torch.float32)
        self.q_norm, self.k_norm = RMSNorm(D, seed=1), RMSNorm(D, seed=2)
        self.reader, self.store, self.second = reader, store, second

    def forward(self, positions, x, k_buffer, v_buffer, loc):
        q, k, v = self.qkv(x).split([HQ * D, HK * D, HK * D], dim=-1)
        q = self.q_norm(q.view(T, HQ, D)).view(T, HQ * D)
        k = self.k_norm(k.view(T, HK, D)).view(T, HK * D)
        arg = FusedSetKVBufferArg(value=v, k_buffer=k_buffer, v_buffer=v_buffer, k_scale=None,
                                  v_scale=None, cache_loc=loc) if self.store else None
        q, k = self.rope.forward_native(positions, q, k, fused_set_kv_buffer_arg=arg)
        if self.second:
            q, k = self.rope.forward_native(positions.flip(0), q, k)
        return READERS[self.reader](q, k)


def _check(model, device: str = "cpu", options=CPU_OPTIONS):
    """Values, output strides and mutated inputs as eager's; the counters."""
    model = model.to(device)
    inputs = [t.to(device) for t in _inputs()]
    eager_inputs = _clone(inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    with fresh_compile():
        out, _ = run_and_get_code(
            torch.compile(model, backend="rope_compile", options=options), *inputs)
        counts = rope_counters()
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        assert got.stride() == want.stride(), (got.stride(), want.stride())
    for got, want in zip(inputs, eager_inputs, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    return counts


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("store", [False, True], ids=["nostore", "store"])
def test_reader_keeps_its_meaning(reader, store):
    counts = _check(Layer(reader, store))
    assert counts.get("rewritten") == 1, counts
    assert counts.get("qk_norm rewritten") == 1, counts
    if store:
        assert counts.get("kv_store rewritten") == 1, counts


@pytest.mark.parametrize("store", [False, True], ids=["nostore", "store"])
def test_second_rope_after_norm_rope(store):
    counts = _check(Layer("returned", store, second=True))
    assert counts.get("rewritten") == 2, counts


def _aten_ops():
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            yield getattr(packet, overload)


def _reader_node(op):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(op, (x,)), x


def test_no_aliasing_aten_op_is_a_value_reader():
    """Every aten op that returns an alias of its input (a view: ``diagonal``, ``unfold``,
    ``as_strided``, ``view.dtype``...) or writes it is either a layout-free view the pass
    replays, or a reader that gets a copy in the old layout: never re-pointed as it is."""
    from rope_compile.passes.readers import LAYOUT_FREE_VIEWS, _reads_values

    checked = 0
    for op in _aten_ops():
        schema = op._schema
        if not schema.arguments or schema.arguments[0].alias_info is None:
            continue
        user, x = _reader_node(op)
        assert not _reads_values(user, x), op
        checked += 1
    assert checked > 300
    for op in (torch.ops.aten.diagonal.default, torch.ops.aten.unfold.default,
               torch.ops.aten.as_strided.default, torch.ops.aten.view.dtype):
        assert op not in LAYOUT_FREE_VIEWS


def test_value_readers_are_functional_in_the_tensor():
    """The allow-list reads values: matmuls, attention, pointwise ops, copies into fresh
    buffers, the source of a scatter or of ``copy_``."""
    from rope_compile.passes.readers import _reads_values

    aten = torch.ops.aten
    for op in (aten.mm.default, aten.add.Tensor, aten.clone.default, aten.cat.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default):
        user, x = _reader_node(op)
        assert _reads_values(user, x), op
    graph = torch.fx.Graph()
    dst, src = graph.placeholder("dst"), graph.placeholder("src")
    copy = graph.call_function(aten.copy_.default, (dst, src))
    assert _reads_values(copy, src) and not _reads_values(copy, dst)
    custom = graph.call_function(torch.ops.rope_compile_test.scale_.default, (src, 2.0))
    assert not _reads_values(custom, src)


@pytest.mark.gpu
@pytest.mark.parametrize("reader", sorted(READERS))
def test_reader_keeps_its_meaning_on_cuda(reader):
    """The same programs on CUDA with the default options (the GPU lowering in the loop)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    counts = _check(Layer(reader, store=True), "cuda", None)
    assert counts.get("qk_norm rewritten") == 1, counts
