"""The backward of HF's RoPE (``rope_pattern._match_rotate_half_transposed``):
``g * cos + rotate_half^T(g * sin)``, with ``rotate_half^T(y) = cat(y2, -y1)`` spelled as two
``slice_scatter`` into zeros, is the rotation by -θ when cos and sin have equal halves. dq and
dk of a layer are one in-place call, its sin negated (with the angles, ``sin_scale`` negated).

* The spelling by hand (inference graphs): rewritten, the graph inline; with unequal sin halves
  the op reads the adjoint sin ``-cat(sin2, sin1)`` (full tables); near-misses (a scatter in the
  wrong place, a fill of 1, ``alpha``) keep eager's values and are not rewritten.
* HF Llama's training step: the backward's dq/dk RoPE is one call per layer (the angles op),
  gradients equal plain Inductor's, no more kernels than Inductor's backward.
"""

from __future__ import annotations

import re

import expecttest
import pytest
import torch
from pass_helpers import _kernel_calls, capture_compile, cpu_pass, render_node
from rope_compile.passes.miss_report import BACKWARD_REASON
from test_pass_training import FORCED, _compare, _ids, _llama, _step

HALF = 64


def _tables(seq: int, unequal: bool = False):
    inv = 1.0 / (10000 ** (torch.arange(0, 2 * HALF, 2, dtype=torch.float32) / (2 * HALF)))
    f = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((f, f), -1)
    sin = emb.sin()
    if unequal:
        sin = torch.cat((f.sin(), (f * 1.5).sin()), -1)  # halves differ
    return emb.cos()[:, None], sin[:, None]


def _transposed(y, spelling: str = "hf"):
    """``rotate_half^T(y) = cat(y2, -y1)`` the way the backward graph spells it."""
    h = y.shape[-1] // 2
    fill = 1.0 if spelling == "ones" else 0.0
    first = torch.full_like(y, fill).slice_scatter(-y[..., :h], dim=-1, start=h)
    second = torch.full_like(y, fill).slice_scatter(y[..., h:], dim=-1, start=0, end=h)
    if spelling == "swapped":  # cat(-y1, y2): not the transpose
        first = torch.zeros_like(y).slice_scatter(-y[..., :h], dim=-1, start=0, end=h)
        second = torch.zeros_like(y).slice_scatter(y[..., h:], dim=-1, start=h)
    if spelling == "alpha":
        return torch.add(first, second, alpha=2.0)
    return first + second


def _litgpt_sum(y, plain):
    """litgpt's association: ``(g * cos + scatter1) + scatter2``."""
    h = y.shape[-1] // 2
    first = torch.zeros_like(y).slice_scatter(-y[..., :h], dim=-1, start=h)
    second = torch.zeros_like(y).slice_scatter(y[..., h:], dim=-1, start=0, end=h)
    return (plain + first) + second


def _backward_pair(spelling: str = "hf", unequal: bool = False):
    def fn(gq, gk):
        cos, sin = _tables(gq.shape[0], unequal)
        if spelling == "litgpt":
            return tuple(_litgpt_sum(g * sin, g * cos) for g in (gq, gk))
        return tuple(_transposed(g * sin, spelling) + g * cos for g in (gq, gk))
    return fn


def _grads(tokens: int = 6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(tokens, 4, 2 * HALF, generator=g),
            torch.randn(tokens, 2, 2 * HALF, generator=g))


def _rotate_minus_theta(x, cos, sin):
    """The float64 oracle: x rotated by -θ (pairs (i, i + h))."""
    x, cos, sin = (t.double() for t in (x, cos[..., :HALF], sin[..., :HALF]))
    x1, x2 = x[..., :HALF], x[..., HALF:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), -1)


@pytest.mark.parametrize("spelling", ["hf", "litgpt"])
def test_hand_spelled_backward_is_the_rotation_by_minus_theta(spelling):
    args = _grads()
    with torch.no_grad():
        out, _, after, counts = capture_compile(_backward_pair(spelling), *args,
                                                rope_pass=cpu_pass())
    assert counts.get("rewritten") == 1, counts
    cos, sin = _tables(6)
    for got, g in zip(out, args, strict=True):
        torch.testing.assert_close(got.double(), _rotate_minus_theta(g, cos, sin), atol=1e-5,
                                   rtol=1e-5)
    assert "slice_scatter" not in after.renders[0]


def test_unequal_halves_read_the_adjoint_sin():
    """sin's halves differ (not provably equal): not a rotation by -θ, but still the op's
    full-table map with sin' = -cat(sin2, sin1), each pair's matrix transposed; eager's
    values."""
    fn, args = _backward_pair("hf", unequal=True), _grads()
    with torch.no_grad():
        expected = fn(*args)
        out, _, after, counts = capture_compile(fn, *args, rope_pass=cpu_pass())
    assert counts.get("rewritten") == 1, counts
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "slice_scatter" not in after.renders[0]


@pytest.mark.parametrize("spelling", ["swapped", "ones", "alpha"],
                         ids=["not-the-transpose", "fill-1", "alpha"])
def test_near_misses_keep_eager_values(spelling):
    fn, args = _backward_pair(spelling), _grads()
    with torch.no_grad():
        expected = fn(*args)
        out, _, _, counts = capture_compile(fn, *args, rope_pass=cpu_pass(strict=False))
    assert "rewritten" not in counts, counts
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class TestBackwardGraph(expecttest.TestCase):
    def test_rewritten_graph(self):
        with torch.no_grad():
            _, _, after, _ = capture_compile(_backward_pair(), *_grads(), rope_pass=cpu_pass())
        graph = after.graphs[0]
        call = next(n for n in graph.nodes if "auto_functionalized" in str(n.target))
        keep = [render_node(n) for n in graph.nodes
                if n is call or (n.op == "call_function" and call in n.users)]
        self.assertExpectedInline("\n".join(keep) + "\n", """\
reshape_default: f32[6, 64] = aten.reshape.default(slice_tensor, [-1, 64])
neg_default: f32[6, 64] = aten.neg.default(reshape_default_1)
auto_functionalized_v2 = auto_functionalized_v2(
    rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default,
    cos=reshape_default,
    sin=neg_default,
    rotary_dim=128,
    is_neox=True,
    _q_base_index=0,
    _q_size=(6, 4, 128),
    _q_stride=(512, 128, 1),
    _q_storage_offset=0,
    _k_base_index=1,
    _k_size=(6, 2, 128),
    _k_stride=(256, 128, 1),
    _k_storage_offset=0,
    _all_bases=[arg0_1, arg1_1])
""")


def test_hf_llama_training_step_fuses_the_backward():
    codes, codes2, counts = _compare(_llama, _ids)
    assert counts.get("rewritten") == 4, counts  # 2 layers, forward and backward
    assert f"missed: {BACKWARD_REASON}" not in counts, counts
    backward = codes2[1]
    calls = re.findall(r"torch\.ops\.rope_compile\.(\w+)", backward)
    assert calls == ["fused_qk_rope_with_angles_inplace"] * 2, calls
    assert len(_kernel_calls(backward)) <= len(_kernel_calls(codes[1]))


def test_hf_llama_backward_gradients_dynamic():
    out, grads, _, counts = _step(_llama, _ids, "rope_compile", FORCED, dynamic=True)
    out2, grads2, _, _ = _step(_llama, _ids, "inductor", dynamic=True)
    assert counts.get("rewritten") == 4, counts
    for got, want in zip(grads, grads2, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
