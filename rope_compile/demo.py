"""Demo: compile a small Llama-style decoder with ``backend="rope_compile"``.

    python -m rope_compile.demo [--layers 4] [--tokens 256] [--device cuda|xpu|cpu]

Prints the RoPE pairs found and rewritten, the fused-op calls in the generated code, the max
abs error against eager, and the median step time of eager, plain Inductor and rope_compile.
On a CPU-only machine the rewrite is forced on (it is off for CPU graphs by default, because
Inductor's own C++ RoPE is faster there than the reference CPU kernel) and says so.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from rope_compile.module import RotaryEmbedding

FUSED_CALL = "fused_qk_rope_with_cos_sin_cache_inplace.default("
# The pass emits the cache op, or the tables op where it reads a model's own cos/sin tables.
FUSED_OP_CALL = re.compile(r"fused_qk_rope_with_cos_sin_(?:cache|tables)_inplace\.default\(")
# On GPUs Inductor launches the fused Triton kernel itself (rope_compile.inductor_lowering).
FUSED_LAUNCH = re.compile(r"fused_qk_rope(?:_tables)?_kernel\w*\.run\(")


def count_fused_calls(source: str) -> int:
    """Fused-op calls in Inductor's generated code: op calls plus direct kernel launches."""
    return len(FUSED_OP_CALL.findall(source)) + len(FUSED_LAUNCH.findall(source))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class DecoderLayer(nn.Module):
    """qkv projection -> split -> RotaryEmbedding.forward_native -> sdpa -> o projection -> MLP."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.rope = rope

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(self.norm1(x))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rope.forward_native(positions, q, k)
        q = q.view(tokens, self.num_heads, self.head_dim).transpose(0, 1)
        k = k.view(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(attn.transpose(0, 1).reshape(tokens, self.q_size))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLlama(nn.Module):
    def __init__(self, layers: int = 4, hidden: int = 512, num_heads: int = 4,
                 num_kv_heads: int = 2, head_dim: int = 128, max_position: int = 4096,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        rope = RotaryEmbedding(head_dim, head_dim, max_position, 10000.0, True, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, num_heads, num_kv_heads, head_dim, rope) for _ in range(layers)
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(positions, x)
        return x


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "xpu":
        torch.xpu.synchronize()


def median_ms(fn, args, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=best_device())
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16")
    parser.add_argument("--show-code", action="store_true",
                        help="print the generated-code lines that run the fused op")
    args = parser.parse_args(argv)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float32 if device == "cpu" else torch.bfloat16)
    options = {}
    if device == "cpu":
        options = {"devices": ("cpu",)}
        print("CPU-only run: forcing the rewrite on for CPU graphs (options={'devices': "
              "('cpu',)}); by default rope_compile leaves CPU graphs to Inductor's C++.")
    torch.manual_seed(0)
    model = TinyLlama(layers=args.layers, dtype=dtype).to(device=device, dtype=dtype).eval()
    positions = torch.randint(0, 4096, (args.tokens,), device=device)
    x = torch.randn(args.tokens, 512, device=device, dtype=dtype)

    with torch.no_grad():
        eager = model(positions, x)
        inductor = torch.compile(model)
        inductor_out = inductor(positions, x)
        counters.clear()
        fused = torch.compile(model, backend="rope_compile", options=options or None)
        fused_out, code = run_and_get_code(fused, positions, x)
        stats = dict(counters["rope_compile"])
        calls = sum(count_fused_calls(src) for src in code)
        if args.show_code:
            for src in code:
                print("\n".join(line for line in src.splitlines() if "fused_qk_rope" in line))
        tol_ref = eager.float()
        results = {
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "layers": args.layers,
            "tokens": args.tokens,
            "pairs_found": stats.get("pairs_found", 0),
            "pairs_rewritten": stats.get("rewritten", 0),
            "fused_calls_in_code": calls,
            # Graphs Inductor's cache served (the pass did not run; its recorded decisions are
            # what pairs_found / pairs_rewritten report for them).
            "graphs_from_cache": stats.get("graphs_from_cache", 0),
            "max_abs_err_rope_compile_vs_eager": (fused_out.float() - tol_ref).abs().max().item(),
            "max_abs_err_inductor_vs_eager": (inductor_out.float() - tol_ref).abs().max().item(),
            "eager_ms": median_ms(model, (positions, x), device, args.repeats),
            "inductor_ms": median_ms(inductor, (positions, x), device, args.repeats),
            "rope_compile_ms": median_ms(fused, (positions, x), device, args.repeats),
        }
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    return results


if __name__ == "__main__":
    main()
