"""Demo: a decode loop with a static KV cache, compiled with ``backend="rope_compile"``.

    python -m rope_compile.demo [--layers 4] [--tokens 8] [--steps 16] [--device cuda|xpu|cpu]

A small Qwen3-style decoder written as serving code writes it (sglang's ``RotaryEmbedding``:
per-head q/k RMSNorm, ``forward_native`` RoPE that stores the rotated k and v into a paged KV
cache through ``FusedSetKVBufferArg``, attention over the cache) decodes ``--tokens`` sequences
one token per step. It prints what the passes fused (RoPE pairs, KV-cache stores, QK-norms),
the kernels per step and per layer of plain Inductor and of rope_compile, the error of the
logits and of the KV cache against eager after the loop, and the step time of both (median and
min-max over interleaved rounds). Progress goes to stderr, the table to stdout.

On a GPU the table is the result: fewer kernels per step, and the step time. On a CPU-only
machine the rewrite is forced on (it is off for CPU graphs by default) and the table says what
its numbers mean there: the fused ops run the float32 reference as eager PyTorch ops, beside
the C++ kernels in which Inductor already computes the norm, the RoPE and the store, so a step
has no fewer calls and is slower; the CPU run shows that the rewrite happens and is exact.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import textwrap
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from rope_compile.kv_store import FusedSetKVBufferArg
from rope_compile.module import RotaryEmbedding

FUSED_CALL = "fused_qk_rope_with_cos_sin_cache_inplace.default("
# Any fused op the passes emit (RoPE from a cache or tables, + QK-norm, + KV-cache store).
FUSED_OP_CALL = re.compile(r"fused_qk_\w+_inplace\.default\(")
# On GPUs Inductor launches the fused Triton kernel itself (rope_compile.inductor_lowering).
FUSED_LAUNCH = re.compile(r"fused_qk_\w+_kernel\w*\.run\(")


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
        return self.output_and_mlp(x, attn.transpose(0, 1).reshape(tokens, self.q_size))

    def output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual o projection of ``attn`` ``[T, Hq * D]``, then the residual MLP."""
        x = x + self.o_proj(attn)
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


class DecodeLayer(DecoderLayer):
    """``DecoderLayer`` with a per-head q/k RMSNorm and a KV cache: qkv projection -> per-head
    q/k RMSNorm -> RoPE + KV-cache store (sglang's
    ``forward_native`` with a ``FusedSetKVBufferArg``) -> attention over the cache -> o
    projection -> MLP. Token t of the step is sequence t, at position ``positions[t]``; its k
    and v go to cache row ``cache_loc[t]`` (sequence t owns rows ``[t * L, (t + 1) * L)``)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope: RotaryEmbedding) -> None:
        super().__init__(hidden, num_heads, num_kv_heads, head_dim, rope)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, positions, cache_loc, visible, x, k_cache, v_cache):
        tokens, hq, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.norm1(x))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(tokens, hq, d)).view(tokens, self.q_size)
        k = self.k_norm(k.view(tokens, hk, d)).view(tokens, self.kv_size)
        store = FusedSetKVBufferArg(value=v.view(tokens, hk, d), k_buffer=k_cache,
                                    v_buffer=v_cache, k_scale=None, v_scale=None,
                                    cache_loc=cache_loc)
        q, _ = self.rope.forward_native(positions, q, k, fused_set_kv_buffer_arg=store)
        length = k_cache.shape[0] // tokens
        keys = k_cache.view(tokens, length, hk, d).transpose(1, 2)
        values = v_cache.view(tokens, length, hk, d).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q.view(tokens, 1, hq, d).transpose(1, 2), keys,
                                              values, attn_mask=visible, enable_gqa=True)
        return self.output_and_mlp(x, attn.reshape(tokens, self.q_size))


class TinyDecoder(nn.Module):
    """Embedding, ``layers`` decode layers with their KV caches (passed in), lm head."""

    def __init__(self, layers: int = 4, hidden: int = 512, num_heads: int = 4,
                 num_kv_heads: int = 2, head_dim: int = 128, vocab: int = 1024,
                 max_position: int = 4096, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        rope = RotaryEmbedding(head_dim, head_dim, max_position, 10000.0, True, dtype)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            DecodeLayer(hidden, num_heads, num_kv_heads, head_dim, rope) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, positions, cache_loc, visible, k_caches, v_caches):
        x = self.embed(ids)
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            x = layer(positions, cache_loc, visible, x, k_cache, v_cache)
        return self.lm_head(self.norm(x))


def decode_inputs(step: int, tokens: int, length: int, vocab: int, device: str):
    """The inputs of decode step ``step``: one token per sequence at position ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    positions = torch.full((tokens,), step, dtype=torch.int64, device=device)
    cache_loc = torch.arange(tokens, device=device) * length + step
    visible = (torch.arange(length, device=device) <= step).view(1, 1, 1, length)
    return ids, positions, cache_loc, visible.expand(tokens, 1, 1, length)


# One kernel launch in Inductor's generated wrapper: a Triton kernel, a C++ kernel, an extern
# kernel (mm, attention) or an op call.
_KERNEL_CALL = re.compile(
    r"^\s+(?:\w+\s*=\s*)?(?:\w+\.run\(|cpp_fused_\w+\(|extern_kernels\.\w+\(|"
    r"torch\.ops\.\w+\.\w+\.\w+\()", re.M)


def count_kernels(code: list[str]) -> int:
    """Kernel launches per call of the compiled step (the wrappers' ``call`` bodies)."""
    total = 0
    for source in code:
        if "def call(" in source:
            total += len(_KERNEL_CALL.findall(source[source.index("def call("):]))
    return total


class Progress:
    """``[  12.3 s] message`` lines on stderr, flushed: a CPU run compiles for tens of
    seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr,
              flush=True)


def _step_times(fns: dict, make_inputs, caches: dict, steps: int, rounds: int, device: str,
                progress=lambda message: None):
    """Per-step ms of each compiled step, in interleaved rounds: {name: [round medians]}."""
    times = {name: [] for name in fns}
    for index in range(rounds):
        progress(f"timing round {index + 1} of {rounds} ({steps} steps of each)")
        for name, fn in fns.items():
            per_step = []
            for step in range(steps):
                inputs = make_inputs(step)
                _sync(device)
                start = time.perf_counter()
                fn(*inputs, *caches[name])
                _sync(device)
                per_step.append((time.perf_counter() - start) * 1e3)
            times[name].append(statistics.median(per_step))
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=best_device())
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=None, help="alias of --rounds")
    parser.add_argument("--cache-len", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16")
    parser.add_argument("--show-code", action="store_true",
                        help="print the generated-code lines that run the fused kernels")
    args = parser.parse_args(argv)
    rounds = args.repeats or args.rounds
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float32 if device == "cpu" else torch.bfloat16)
    options = {}
    progress = Progress()
    if device == "cpu":
        options = {"devices": ("cpu",)}
        print("CPU run, with options={'devices': ('cpu',)}: rope_compile leaves CPU graphs to "
              "Inductor by default. Here it shows what is fused and that it is exact; the "
              "speed is a GPU result (notes in the table).")
    torch.manual_seed(0)
    tokens, length, vocab = args.tokens, args.cache_len, 1024
    model = TinyDecoder(layers=args.layers, vocab=vocab, dtype=dtype).to(device=device,
                                                                         dtype=dtype).eval()
    steps = min(args.steps, length)

    def fresh_caches():
        g = torch.Generator().manual_seed(7)
        shape = (tokens * length, 2, 128)
        return tuple(
            [torch.randn(shape, generator=g).to(device=device, dtype=dtype)
             for _ in range(args.layers)] for _ in range(2))

    def make_inputs(step):
        return decode_inputs(step, tokens, length, vocab, device)

    caches = {name: fresh_caches() for name in ("eager", "inductor", "rope_compile")}
    with torch.no_grad():
        inductor = torch.compile(model)
        counters.clear()
        fused = torch.compile(model, backend="rope_compile", options=options or None)
        first = make_inputs(0)
        progress(f"compiling the {args.layers}-layer decoder with Inductor (first call)")
        _, plain_code = run_and_get_code(inductor, *first, *caches["inductor"])
        progress("compiling it with backend='rope_compile' (first call)")
        _, code = run_and_get_code(fused, *first, *caches["rope_compile"])
        stats = dict(counters["rope_compile"])
        progress(f"decoding {steps} steps with eager, Inductor and rope_compile, to compare")
        eager_out = model(*first, *caches["eager"])
        # The rest of the loop, the same inputs for all three; then compare.
        for step in range(1, steps):
            inputs = make_inputs(step)
            eager_out = model(*inputs, *caches["eager"])
            inductor_out = inductor(*inputs, *caches["inductor"])
            fused_out = fused(*inputs, *caches["rope_compile"])
        if steps == 1:
            inductor_out = inductor(*first, *caches["inductor"])
            fused_out = fused(*first, *caches["rope_compile"])
        if args.show_code:
            for src in code:
                print("\n".join(line for line in src.splitlines() if "fused_qk" in line))

        def cache_err(name):
            return max((a.float() - b.float()).abs().max().item()
                       for mine, ref in zip(caches[name], caches["eager"], strict=True)
                       for a, b in zip(mine, ref, strict=True))

        fused_kinds = {key.replace(" rewritten", ""): value for key, value in stats.items()
                       if key.endswith("rewritten") and key != "rewritten"}
        times = _step_times({"inductor": inductor, "rope_compile": fused}, make_inputs, caches,
                            steps, rounds, device, progress)
        progress("done")
        kernels = {"inductor": count_kernels(plain_code), "rope_compile": count_kernels(code)}
        results = {
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "layers": args.layers,
            "tokens": tokens,
            "pairs_found": stats.get("pairs_found", 0),
            "pairs_rewritten": stats.get("rewritten", 0),
            "fused_calls_in_code": sum(count_fused_calls(src) for src in code),
            "also_fused": ", ".join(f"{k} {v}" for k, v in sorted(fused_kinds.items()))
                          or "nothing else",
            # Graphs Inductor's cache served (the pass did not run; its recorded decisions are
            # what pairs_found / pairs_rewritten report for them).
            "graphs_from_cache": stats.get("graphs_from_cache", 0),
            "kernels_per_step_inductor": kernels["inductor"],
            "kernels_per_step_rope_compile": kernels["rope_compile"],
            "kernels_per_layer_inductor": round(kernels["inductor"] / args.layers, 2),
            "kernels_per_layer_rope_compile": round(kernels["rope_compile"] / args.layers, 2),
            "max_abs_err_logits_rope_compile_vs_eager":
                (fused_out.float() - eager_out.float()).abs().max().item(),
            "max_abs_err_logits_inductor_vs_eager":
                (inductor_out.float() - eager_out.float()).abs().max().item(),
            "max_abs_err_kv_cache_rope_compile_vs_eager": cache_err("rope_compile"),
            "max_abs_err_kv_cache_inductor_vs_eager": cache_err("inductor"),
        }
        for name in ("inductor", "rope_compile"):
            rounds_ms = times[name]
            results[f"step_ms_{name}"] = (f"{statistics.median(rounds_ms):.4g} "
                                          f"({min(rounds_ms):.4g}-{max(rounds_ms):.4g})")
        results["speedup"] = round(statistics.median(times["inductor"])
                                   / statistics.median(times["rope_compile"]), 3)
    notes = cpu_notes(results) if device == "cpu" else {}
    width = max(map(len, results))
    value_width = max(len(_shown(v)) for v in results.values())
    for key, value in results.items():
        line = f"{key:<{width}}  {_shown(value)}"
        if key in notes:
            line = f"{line:<{width + 2 + value_width}}  <- {notes[key]}"
        print(line.rstrip())
    if device == "cpu":
        print()
        print(textwrap.fill(
            f"On this CPU: {results['pairs_rewritten']} RoPE pairs fused (also fused: "
            f"{results['also_fused']}), equal to eager within "
            f"{results['max_abs_err_kv_cache_rope_compile_vs_eager']:.2g} (KV cache) and "
            f"{results['max_abs_err_logits_rope_compile_vs_eager']:.2g} (logits). The kernel "
            "counts and step times are what a CPU gives, not the result: that needs a CUDA or "
            "XPU GPU (the repository's benchmarks/results/ has GPU runs of this demo).", 100))
    return results


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cpu_notes(results: dict) -> dict[str, str]:
    """What the kernel counts and step times of a CPU run mean, by row of the table."""
    extra = results["kernels_per_step_rope_compile"] - results["kernels_per_step_inductor"]
    return {
        "kernels_per_step_rope_compile": (
            f"{extra:+d}: on a CPU, Inductor's C++ does norm + RoPE + store inside kernels "
            f"it runs anyway, so the {results['fused_calls_in_code']} fused-op calls do not "
            "lower the count"),
        "step_ms_rope_compile": ("on a CPU the fused ops run the float32 reference as eager "
                                 "PyTorch ops, not a Triton kernel"),
        "speedup": "below 1 is expected on a CPU: the speedup is a GPU result",
    }


if __name__ == "__main__":
    main()
