"""Compile time of the fused-RoPE pass on deep Llama-style graphs.

    python benchmarks/bench_compile_time.py --layers 10,20,40,80 \
        --out benchmarks/results/compile_time_cpu.md

For each depth it builds an ``AttnStack`` (sglang ``forward_native`` layers: qkv projection,
RoPE, GQA attention, o projection) and an HF ``LlamaModel`` of that many layers, and, in
interleaved rounds:

* compiles it with plain Inductor and with ``backend="rope_compile"`` (CPU, the pass forced on
  with ``devices=("cpu",)``; FX graph and AOTAutograd caches off), timing the first call, which
  is Dynamo + AOTAutograd + Inductor's whole compile;
* times the pass's own ``apply`` inside that compile.

A warm-up compile of each config comes first, so that both find Inductor's compiled C++
kernels in its on-disk cache and the timed rounds compare graph compiles.

The pass's work does not depend on the device (it reads only the graph and fake tensors), so
the CPU shows its cost; the target is time linear in layers and under 2% of the compile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from rope_compile.passes import fuse_qk_rope  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

TOKENS = 16


def _stack(layers: int):
    from pass_helpers import AttnStack, positions_for, tokens

    model = AttnStack(num_layers=layers, hidden=64, num_q_heads=4, num_kv_heads=2)
    return model, (positions_for(TOKENS, 512), tokens(TOKENS))


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128, max_position_embeddings=256,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, TOKENS))
    return _LogitsOnly(model), (ids,)


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids, use_cache=False).logits


MODELS = {"sglang-style stack": _stack, "HF Llama": _llama}


def _compile_once(model, inputs, backend: str) -> tuple[float, float, int]:
    """(first-call seconds, seconds inside the pass, pairs rewritten)."""
    torch._dynamo.reset()
    counters.clear()
    spent = [0.0]
    real_apply = fuse_qk_rope.FuseQKRopePass.apply

    def timed_apply(self, graph):
        start = time.perf_counter()
        try:
            return real_apply(self, graph)
        finally:
            spent[0] += time.perf_counter() - start

    fuse_qk_rope.FuseQKRopePass.apply = timed_apply
    try:
        options = {"devices": ("cpu",)} if backend == "rope_compile" else None
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
            compiled = torch.compile(model, backend=backend, options=options)
            start = time.perf_counter()
            compiled(*inputs)
            total = time.perf_counter() - start
    finally:
        fuse_qk_rope.FuseQKRopePass.apply = real_apply
    return total, spent[0], counters["rope_compile"]["rewritten"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="10,20,40,80")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    depths = [int(x) for x in args.layers.split(",")]
    rows = []
    for name in args.models.split(","):
        for layers in depths:
            model, inputs = MODELS[name](layers)
            plain, fused, in_pass, rewritten = [], [], [], 0
            # Warm-up (not timed): both configs then find Inductor's compiled C++ kernels in
            # its on-disk cache, so the rounds compare graph compiles, not kernel builds.
            _compile_once(model, inputs, "inductor")
            _compile_once(model, inputs, "rope_compile")
            for _ in range(args.rounds):  # interleaved: plain, ours, plain, ours, ...
                plain.append(_compile_once(model, inputs, "inductor")[0])
                total, spent, rewritten = _compile_once(model, inputs, "rope_compile")
                fused.append(total)
                in_pass.append(spent)
            row = {"model": name, "layers": layers, "rewritten": rewritten,
                   "inductor_s": statistics.median(plain),
                   "rope_compile_s": statistics.median(fused),
                   "pass_ms": 1000 * statistics.median(in_pass),
                   "pass_ms_spread": (1000 * min(in_pass), 1000 * max(in_pass))}
            row["pass_ms_per_layer"] = row["pass_ms"] / layers
            # What the pass adds to Inductor's compile of the same graph.
            row["pass_share"] = row["pass_ms"] / 1000 / row["inductor_s"]
            rows.append(row)
            print(row, flush=True)
    lines = ["| model | layers | pairs rewritten | Inductor compile s | rope_compile compile s "
             "| pass ms (min-max) | pass ms / layer | pass / Inductor compile |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["pass_ms_spread"]
        lines.append(f"| {r['model']} | {r['layers']} | {r['rewritten']} | "
                     f"{r['inductor_s']:.2f} | {r['rope_compile_s']:.2f} | "
                     f"{r['pass_ms']:.0f} ({lo:.0f}-{hi:.0f}) | {r['pass_ms_per_layer']:.2f} | "
                     f"{100 * r['pass_share']:.2f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        header = (f"Compile time, `python benchmarks/bench_compile_time.py --layers "
                  f"{args.layers} --rounds {args.rounds}` (torch {torch.__version__}, CPU, "
                  f"{TOKENS} tokens, medians of {args.rounds} interleaved rounds)\n\n")
        args.out.write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
