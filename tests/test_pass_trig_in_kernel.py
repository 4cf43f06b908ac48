"""The last extension pass (``passes/fuse_trig_in_kernel.py``): a RoPE call reading the model's
own cos/sin tables computes them in the kernel from the angles, where the tables are proven to
be ``convert(mul(cos|sin(cat(a, a)), s))``, so no kernel materialises the tables.

* an HF-style layer (the HF rotary module's chain, written out) and tiny HF Llama, plain and
  with YaRN (attention_scaling != 1): rewritten to the angles op, values equal to eager, no
  ``cos`` kernel left in the generated code, the rewritten call shown inline;
* tables that are graph inputs, or computed differently (a cast between cos and the scale):
  the tables op stays, with the reason counted where there is a chain to explain.
"""

from __future__ import annotations

import os
import re

import expecttest
import pytest
import torch
from pass_helpers import CPU_OPTIONS, CaptureGraph, fresh_compile, render_node, rope_counters
from rope_compile.passes.fuse_kv_store import FuseKVStorePass
from rope_compile.passes.fuse_qk_norm import FuseQKNormPass
from rope_compile.passes.fuse_qk_rope import FuseQKRopePass
from rope_compile.passes.fuse_trig_in_kernel import ComputeTrigInKernelPass
from torch import nn
from torch._inductor.utils import run_and_get_code

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANGLES_CALL = "fused_qk_rope_with_angles_inplace.default("
TABLES_CALL = "fused_qk_rope_with_cos_sin_tables_inplace.default("


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class HFStyleLayer(nn.Module):
    """q/k projections, the HF rotary module's cos/sin (``freqs = inv_freq @ positions``,
    ``emb = cat(freqs, freqs)``, ``cos() * scaling``, cast), ``q * cos + rotate_half(q) * sin``.
    ``variant``: "hf" as HF writes it; "cast_first" casts cos before the scale (another chain:
    not converted); "input_tables" takes cos/sin as arguments (nothing to compute)."""

    def __init__(self, variant: str = "hf", scaling: float = 1.0, heads: int = 2,
                 head_dim: int = 128) -> None:
        super().__init__()
        self.variant, self.scaling, self.heads, self.head_dim = variant, scaling, heads, head_dim
        self.q = nn.Linear(64, heads * head_dim, bias=False)
        self.k = nn.Linear(64, head_dim, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, positions, dtype):
        freqs = (self.inv_freq[None, :, None].float() @ positions[:, None, :].float()).transpose(
            1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.variant == "cast_first":
            return (emb.cos().to(dtype) * self.scaling), (emb.sin().to(dtype) * self.scaling)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def forward(self, x, positions, cos=None, sin=None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, 1, self.head_dim).transpose(1, 2)
        if cos is None:
            cos, sin = self.tables(positions, x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q.transpose(1, 2).reshape(b, s, -1) + 1, k.transpose(1, 2).reshape(b, s, -1) * 2


def _inputs(batch=2, seq=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, 64, generator=g).to(dtype)
    positions = torch.arange(3, 3 + seq).expand(batch, seq)
    return x, positions


def _compile(model, *args):
    torch._dynamo.reset()
    with fresh_compile():
        out, code = run_and_get_code(
            torch.compile(model, backend="rope_compile", options=dict(CPU_OPTIONS)), *args)
        return out, "\n".join(code), rope_counters()


@pytest.mark.parametrize("scaling", [1.0, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_chain_computed_in_kernel(scaling, dtype):
    torch.manual_seed(0)
    model = HFStyleLayer(scaling=scaling).to(dtype)
    args = _inputs(dtype=dtype)
    with torch.no_grad():
        expected = model(*args)
    out, code, counts = _compile(model, *args)
    assert counts == {"pairs_found": 1, "rewritten": 1, "trig_in_kernel rewritten": 1}, counts
    assert code.count(ANGLES_CALL) == 1 and TABLES_CALL not in code
    # The tables' own kernel is gone: nothing else reads them.
    kernels = re.findall(r"cpp_fused_\w+", code)
    assert not any("_cos" in name or "_sin" in name for name in kernels), kernels
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2,
                                                                         "rtol": 3e-2}
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_other_chains_keep_the_tables():
    torch.manual_seed(0)
    args = _inputs(dtype=torch.bfloat16)
    # cos cast before the scale: not the chain the kernel computes -> the tables op stays.
    model = HFStyleLayer("cast_first", scaling=0.75).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(*args)
    out, code, counts = _compile(model, *args)
    assert counts["rewritten"] == 1 and "trig_in_kernel rewritten" not in counts, counts
    assert any(k.startswith("trig_in_kernel skipped:") for k in counts), counts
    assert TABLES_CALL in code and ANGLES_CALL not in code
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    # Tables given as inputs: nothing to compute, no count.
    model = HFStyleLayer("input_tables")
    x, positions = _inputs()
    cos, sin = model.tables(positions, torch.float32)
    with torch.no_grad():
        expected = model(x, positions, cos, sin)
    out, code, counts = _compile(model, x, positions, cos, sin)
    assert counts == {"pairs_found": 1, "rewritten": 1}, counts
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 2.0,
                                                 "original_max_position_embeddings": 128}])
def test_hf_llama(rope_scaling):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=256, attn_implementation="sdpa", rope_scaling=rope_scaling)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    out, code, counts = _compile(model, ids)
    assert counts.get("trig_in_kernel rewritten") == 2, counts
    assert code.count(ANGLES_CALL) == 2
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4)


class TestRewrittenGraph(expecttest.TestCase):
    def test_hf_style_graph(self):
        after = CaptureGraph()
        passes = (FuseQKRopePass(**CPU_OPTIONS), FuseQKNormPass(**CPU_OPTIONS),
                  FuseKVStorePass(**CPU_OPTIONS), ComputeTrigInKernelPass(**CPU_OPTIONS), after)
        torch.manual_seed(0)
        with fresh_compile(), torch._inductor.config.patch(post_grad_custom_post_pass=passes):
            torch.compile(HFStyleLayer(scaling=0.75))(*_inputs())
        region = [render_node(n) for n in after.graphs[0].nodes
                  if n.op == "call_function" and "auto_functionalized" in render_node(n)
                  or n.name.startswith(("slice_tensor", "reshape_default"))]
        self.assertExpectedInline("\n".join(region) + "\n", """\
slice_tensor_2: f32[2, 5, 64] = aten.slice.Tensor(permute_4, -1, 0, 64)
reshape_default_2: f32[10, 64] = aten.reshape.default(slice_tensor_2, [-1, 64])
auto_functionalized_v2_1 = auto_functionalized_v2(
    rope_compile.fused_qk_rope_with_angles_inplace.default,
    rotary_dim=128,
    is_neox=True,
    angles=reshape_default_2,
    cos_scale=0.75,
    sin_scale=0.75,
    table_dtype=f32,
    _q_base_index=0,
    _q_size=(10, 2, 128),
    _q_stride=(256, 128, 1),
    _q_storage_offset=0,
    _k_base_index=1,
    _k_size=(10, 1, 128),
    _k_stride=(128, 128, 1),
    _k_storage_offset=0,
    _all_bases=[mm, mm_1])
getitem_6: f32[10, 256] = auto_functionalized_v2_1[1]
getitem_7: f32[10, 128] = auto_functionalized_v2_1[2]
""")
