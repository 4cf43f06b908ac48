"""The post-grad graph before and after ``FuseQKRopePass``, shown inline (expecttest).

Each model is qkv projection -> split -> ``RotaryEmbedding.forward_native`` -> (q, k, v), with
T=5 tokens, 4 q heads, 2 kv heads and head size 128, compiled with plain ``torch.compile``
(Inductor) with the pass installed as ``post_grad_custom_post_pass`` between two capturing passes.
Rendering: one line per node, ``name: dtype[shape] = target(args, kwargs)`` (pass_helpers).

Refresh the expected graphs after an intended change of the pass with::

    EXPECTTEST_ACCEPT=1 python -m pytest tests/test_pass_rewrite.py
"""

from __future__ import annotations

import expecttest
import torch
from pass_helpers import (
    FUSED_TARGET,
    QKVRope,
    capture_compile,
    cpu_pass,
    fused_nodes,
    positions_for,
    render_graph,
    tokens,
)

T = 5


def _compile(**model_options):
    model = QKVRope(**model_options)
    positions, x = positions_for(T), tokens(T)
    out, before, after, counts = capture_compile(model, positions, x, rope_pass=cpu_pass())
    with torch.no_grad():
        expected = model(positions, x)
    return out, expected, before, after, counts


class _RewriteCase(expecttest.TestCase):
    model_options: dict = {}

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.out, cls.expected, cls.before, cls.after, cls.counts = _compile(**cls.model_options)

    def check_rewritten(self) -> None:
        self.assertEqual(len(self.before.renders), 1)
        self.assertEqual(len(self.after.renders), 1)
        self.assertEqual(self.counts, {"pairs_found": 1, "rewritten": 1})
        self.assertEqual(len(fused_nodes(self.before.graphs[0])), 0)
        self.assertEqual(len(fused_nodes(self.after.graphs[0])), 1)
        # No RoPE arithmetic is left: q and k are not recomputed anywhere else.
        ops = {str(n.target) for n in self.after.graphs[0].nodes if n.op == "call_function"}
        for gone in ("aten.mul.Tensor", "aten.sub.Tensor", "aten.add.Tensor", "aten.cat.default",
                     "aten.index.Tensor"):
            self.assertNotIn(gone, ops)
        for got, want in zip(self.out, self.expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class TestNeoxFullRotary(_RewriteCase):
    model_options = {"is_neox": True}

    def test_graph_before_pass(self):
        self.assertExpectedInline(self.before.renders[0], """\
arg0_1: f32[1024, 64]
arg1_1: f32[5, 64]
arg2_1: i64[5]
arg3_1: f32[64, 128]
permute: f32[64, 1024] = aten.permute.default(arg0_1, [1, 0])
mm: f32[5, 1024] = aten.mm.default(arg1_1, permute)
split_with_sizes = aten.split_with_sizes.default(mm, [512, 256, 256], -1)
getitem: f32[5, 512] = split_with_sizes[0]
getitem_1: f32[5, 256] = split_with_sizes[1]
getitem_2: f32[5, 256] = split_with_sizes[2]
index: f32[5, 128] = aten.index.Tensor(arg3_1, [arg2_1])
split = aten.split.Tensor(index, 64, -1)
getitem_3: f32[5, 64] = split[0]
getitem_4: f32[5, 64] = split[1]
view: f32[5, 4, 128] = aten.reshape.default(getitem, [5, -1, 128])
split_1 = aten.split.Tensor(view, 64, -1)
getitem_5: f32[5, 4, 64] = split_1[0]
getitem_6: f32[5, 4, 64] = split_1[1]
view_2: f32[5, 2, 128] = aten.reshape.default(getitem_1, [5, -1, 128])
split_2 = aten.split.Tensor(view_2, 64, -1)
getitem_7: f32[5, 2, 64] = split_2[0]
getitem_8: f32[5, 2, 64] = split_2[1]
unsqueeze: f32[5, 1, 64] = aten.unsqueeze.default(getitem_3, -2)
mul: f32[5, 4, 64] = aten.mul.Tensor(getitem_5, unsqueeze)
unsqueeze_1: f32[5, 1, 64] = aten.unsqueeze.default(getitem_4, -2)
mul_1: f32[5, 4, 64] = aten.mul.Tensor(getitem_6, unsqueeze_1)
sub: f32[5, 4, 64] = aten.sub.Tensor(mul, mul_1)
mul_2: f32[5, 4, 64] = aten.mul.Tensor(getitem_6, unsqueeze)
mul_3: f32[5, 4, 64] = aten.mul.Tensor(getitem_5, unsqueeze_1)
add: f32[5, 4, 64] = aten.add.Tensor(mul_2, mul_3)
cat: f32[5, 4, 128] = aten.cat.default([sub, add], -1)
view_1: f32[5, 512] = aten.reshape.default(cat, [5, 512])
unsqueeze_2: f32[5, 1, 64] = aten.unsqueeze.default(getitem_3, -2)
mul_4: f32[5, 2, 64] = aten.mul.Tensor(getitem_7, unsqueeze_2)
unsqueeze_3: f32[5, 1, 64] = aten.unsqueeze.default(getitem_4, -2)
mul_5: f32[5, 2, 64] = aten.mul.Tensor(getitem_8, unsqueeze_3)
sub_1: f32[5, 2, 64] = aten.sub.Tensor(mul_4, mul_5)
mul_6: f32[5, 2, 64] = aten.mul.Tensor(getitem_8, unsqueeze_2)
mul_7: f32[5, 2, 64] = aten.mul.Tensor(getitem_7, unsqueeze_3)
add_1: f32[5, 2, 64] = aten.add.Tensor(mul_6, mul_7)
cat_1: f32[5, 2, 128] = aten.cat.default([sub_1, add_1], -1)
view_3: f32[5, 256] = aten.reshape.default(cat_1, [5, 256])
return (view_1, view_3, getitem_2)
""")

    def test_graph_after_pass(self):
        self.check_rewritten()
        self.assertExpectedInline(self.after.renders[0], """\
arg0_1: f32[1024, 64]
arg1_1: f32[5, 64]
arg2_1: i64[5]
arg3_1: f32[64, 128]
permute: f32[64, 1024] = aten.permute.default(arg0_1, [1, 0])
mm: f32[5, 1024] = aten.mm.default(arg1_1, permute)
auto_functionalized_v2 = auto_functionalized_v2(
    rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default,
    cos_sin_cache=arg3_1,
    positions=arg2_1,
    rotary_dim=128,
    is_neox=True,
    _q_base_index=0,
    _q_size=(5, 4, 128),
    _q_stride=(1024, 128, 1),
    _q_storage_offset=0,
    _k_base_index=0,
    _k_size=(5, 2, 128),
    _k_stride=(1024, 128, 1),
    _k_storage_offset=512,
    _all_bases=[mm])
getitem_9: f32[5, 1024] = auto_functionalized_v2[1]
split_with_sizes_3 = aten.split_with_sizes.default(getitem_9, [512, 256, 256], -1)
getitem_12: f32[5, 256] = split_with_sizes_3[2]
split_with_sizes_2 = aten.split_with_sizes.default(getitem_9, [512, 256, 256], -1)
getitem_11: f32[5, 256] = split_with_sizes_2[1]
view_7: f32[5, 2, 128] = aten.reshape.default(getitem_11, [5, -1, 128])
clone_default_1: f32[5, 2, 128] = aten.clone.default(
    view_7,
    memory_format=torch.contiguous_format)
view_8: f32[5, 256] = aten.reshape.default(clone_default_1, [5, 256])
split_with_sizes_1 = aten.split_with_sizes.default(getitem_9, [512, 256, 256], -1)
getitem_10: f32[5, 512] = split_with_sizes_1[0]
view_4: f32[5, 4, 128] = aten.reshape.default(getitem_10, [5, -1, 128])
clone_default: f32[5, 4, 128] = aten.clone.default(
    view_4,
    memory_format=torch.contiguous_format)
view_5: f32[5, 512] = aten.reshape.default(clone_default, [5, 512])
return (view_5, view_8, getitem_12)
""")

    def test_apply_to_traced_graph(self):
        """The pass applied directly to a graph traced without it does the same rewrite."""
        model = QKVRope(is_neox=True)
        _, traced, after, counts = capture_compile(model, positions_for(T), tokens(T))
        self.assertEqual(counts, {})  # the pass was not installed
        self.assertEqual(after.renders, [])
        graph = traced.graphs[0]
        text = render_graph(graph)
        self.assertEqual(text, self.before.renders[0])
        self.assertEqual(cpu_pass().apply(graph), 1)
        graph.lint()
        self.assertNotEqual(render_graph(graph), text)
        self.assertEqual(render_graph(graph), self.after.renders[0])
        (call,) = fused_nodes(graph)
        self.assertEqual(str(call.args[0]), FUSED_TARGET)
        self.assertEqual({k: call.kwargs[k] for k in ("rotary_dim", "is_neox")},
                         {"rotary_dim": 128, "is_neox": True})
        # Nothing left to fuse: a second application is a no-op.
        self.assertEqual(cpu_pass().apply(graph), 0)
        self.assertEqual(render_graph(graph), self.after.renders[0])


class TestGPTJFullRotary(_RewriteCase):
    model_options = {"is_neox": False}

    def test_graph_after_pass(self):
        self.check_rewritten()
        self.assertExpectedInline(self.after.renders[0], """\
arg0_1: f32[1024, 64]
arg1_1: f32[5, 64]
arg2_1: i64[5]
arg3_1: f32[64, 128]
permute: f32[64, 1024] = aten.permute.default(arg0_1, [1, 0])
mm: f32[5, 1024] = aten.mm.default(arg1_1, permute)
auto_functionalized_v2 = auto_functionalized_v2(
    rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default,
    cos_sin_cache=arg3_1,
    positions=arg2_1,
    rotary_dim=128,
    is_neox=False,
    _q_base_index=0,
    _q_size=(5, 4, 128),
    _q_stride=(1024, 128, 1),
    _q_storage_offset=0,
    _k_base_index=0,
    _k_size=(5, 2, 128),
    _k_stride=(1024, 128, 1),
    _k_storage_offset=512,
    _all_bases=[mm])
getitem_5: f32[5, 1024] = auto_functionalized_v2[1]
split_with_sizes_3 = aten.split_with_sizes.default(getitem_5, [512, 256, 256], -1)
getitem_8: f32[5, 256] = split_with_sizes_3[2]
split_with_sizes_2 = aten.split_with_sizes.default(getitem_5, [512, 256, 256], -1)
getitem_7: f32[5, 256] = split_with_sizes_2[1]
view_9: f32[5, 2, 128] = aten.reshape.default(getitem_7, [5, -1, 128])
clone_default_1: f32[5, 2, 128] = aten.clone.default(
    view_9,
    memory_format=torch.contiguous_format)
view_10: f32[5, 256] = aten.reshape.default(clone_default_1, [5, 256])
split_with_sizes_1 = aten.split_with_sizes.default(getitem_5, [512, 256, 256], -1)
getitem_6: f32[5, 512] = split_with_sizes_1[0]
view_6: f32[5, 4, 128] = aten.reshape.default(getitem_6, [5, -1, 128])
clone_default: f32[5, 4, 128] = aten.clone.default(
    view_6,
    memory_format=torch.contiguous_format)
view_7: f32[5, 512] = aten.reshape.default(clone_default, [5, 512])
return (view_7, view_10, getitem_8)
""")


class TestPartialRotary(_RewriteCase):
    model_options = {"is_neox": True, "head_size": 128, "rotary_dim": 64}

    def test_graph_after_pass(self):
        self.check_rewritten()
        self.assertExpectedInline(self.after.renders[0], """\
arg0_1: f32[1024, 64]
arg1_1: f32[5, 64]
arg2_1: i64[5]
arg3_1: f32[64, 64]
permute: f32[64, 1024] = aten.permute.default(arg0_1, [1, 0])
mm: f32[5, 1024] = aten.mm.default(arg1_1, permute)
auto_functionalized_v2 = auto_functionalized_v2(
    rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default,
    cos_sin_cache=arg3_1,
    positions=arg2_1,
    rotary_dim=64,
    is_neox=True,
    _q_base_index=0,
    _q_size=(5, 4, 64),
    _q_stride=(1024, 128, 1),
    _q_storage_offset=0,
    _k_base_index=0,
    _k_size=(5, 2, 64),
    _k_stride=(1024, 128, 1),
    _k_storage_offset=512,
    _all_bases=[mm])
getitem_9: f32[5, 1024] = auto_functionalized_v2[1]
split_with_sizes_3 = aten.split_with_sizes.default(getitem_9, [512, 256, 256], -1)
getitem_12: f32[5, 256] = split_with_sizes_3[2]
split_with_sizes_2 = aten.split_with_sizes.default(getitem_9, [512, 256, 256], -1)
getitem_11: f32[5, 256] = split_with_sizes_2[1]
view_7: f32[5, 2, 128] = aten.reshape.default(getitem_11, [5, -1, 128])
clone_default_1: f32[5, 2, 128] = aten.clone.default(
    view_7,
    memory_format=torch.contiguous_format)
view_8: f32[5, 256] = aten.reshape.default(clone_default_1, [5, 256])
split_with_sizes_1 = aten.split_with_sizes.default(getitem_9, [512, 256, 256], -1)
getitem_10: f32[5, 512] = split_with_sizes_1[0]
view_4: f32[5, 4, 128] = aten.reshape.default(getitem_10, [5, -1, 128])
clone_default: f32[5, 4, 128] = aten.clone.default(
    view_4,
    memory_format=torch.contiguous_format)
view_5: f32[5, 512] = aten.reshape.default(clone_default, [5, 512])
return (view_5, view_8, getitem_12)
""")

    def test_tail_passes_through(self):
        """The op gets only x[..., :64]; the tail [64:] is the untouched projection."""
        (call,) = fused_nodes(self.after.graphs[0])
        self.assertEqual(call.kwargs["rotary_dim"], 64)
        self.assertEqual(tuple(call.kwargs["_q_size"]), (T, 4, 64))
        self.assertEqual(tuple(call.kwargs["_k_size"]), (T, 2, 64))


if __name__ == "__main__":
    from torch.testing._internal.common_utils import run_tests

    run_tests()
