"""gpt-fast / torchtune interleaved RoPE (``x.float().reshape(..., -1, 2)`` with a gathered
``freqs_cis`` of (cos, sin) pairs, ``apply_rotary_emb`` called on q and on k) is rewritten into
one fused call per layer, with results equal to eager; head size 64 is left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from rope_compile.demo import count_fused_calls

CPU = {"devices": ("cpu",), "strict": True}


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # [seq, n_elem / 2, 2]


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """gpt-fast's spelling, verbatim in structure."""
    xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(1, xshaped.size(1), 1, xshaped.size(3), 2)
    x_out2 = torch.stack(
        [
            xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
            xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1],
        ],
        -1,
    )
    return x_out2.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv: int, head_dim: int) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv) * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=False)

    def forward(self, x, freqs_cis):
        bsz, seqlen, _ = x.shape
        sizes = [self.n_head * self.head_dim, self.n_kv * self.head_dim,
                 self.n_kv * self.head_dim]
        q, k, v = self.wqkv(x).split(sizes, dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv, self.head_dim)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class Transformer(nn.Module):
    def __init__(self, layers: int = 2, dim: int = 512, n_head: int = 4, n_kv: int = 2,
                 head_dim: int = 128) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Attention(dim, n_head, n_kv, head_dim)
                                    for _ in range(layers))
        self.register_buffer("freqs_cis", precompute_freqs_cis(256, head_dim))

    def forward(self, x, input_pos):
        freqs_cis = self.freqs_cis[input_pos]
        for layer in self.layers:
            x = layer(x, freqs_cis)
        return x


def _compile_and_run(model, *args):
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        expected = model(*args)
        out, code = run_and_get_code(torch.compile(model, backend="rope_compile", options=CPU),
                                     *args)
    return expected, out, "\n".join(code)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gpt_fast_transformer_fused_per_layer(dtype, tol):
    torch.manual_seed(0)
    model = Transformer().to(dtype).eval()
    x = torch.randn(2, 7, 512, dtype=dtype)
    expected, out, code = _compile_and_run(model, x, torch.arange(3, 10))
    assert count_fused_calls(code) == 2
    assert counters["rope_compile"]["rewritten"] == 2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_gpt_fast_head_dim_64_left_alone():
    torch.manual_seed(0)
    model = Transformer(head_dim=64).eval()
    x = torch.randn(1, 5, 512)
    expected, out, code = _compile_and_run(model, x, torch.arange(5))
    assert count_fused_calls(code) == 0
    assert counters["rope_compile"]["skipped: head_size 64 not in (128, 256, 512)"] == 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gpt_fast_different_freqs_for_k_not_paired():
    """q and k rotated by different freqs_cis gathers must not be fused."""
    torch.manual_seed(0)
    model = Transformer(layers=1).eval()
    attn = model.layers[0]

    def forward(x, pos_q, pos_k):
        bsz, seqlen, _ = x.shape
        q, k, _ = attn.wqkv(x).split([512, 256, 256], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, 4, 128), model.freqs_cis[pos_q])
        k = apply_rotary_emb(k.view(bsz, seqlen, 2, 128), model.freqs_cis[pos_k])
        return q, k

    x = torch.randn(1, 5, 512)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        expected = forward(x, torch.arange(5), torch.arange(1, 6))
        out, code = run_and_get_code(torch.compile(forward, backend="rope_compile",
                                                   options=CPU),
                                     x, torch.arange(5), torch.arange(1, 6))
    assert count_fused_calls("\n".join(code)) == 0
    assert counters["rope_compile"]["rewritten"] == 0
    for o, e in zip(out, expected, strict=True):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
