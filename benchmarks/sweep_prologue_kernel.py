"""Launch-configuration sweep of the attention-prologue kernel (diagnostic, CUDA).

    python benchmarks/sweep_prologue_kernel.py --out DIR [--tokens 512,4096] [--kinds ...]
    python benchmarks/sweep_prologue_kernel.py --device cpu --tokens 2 --max-configs 2  # smoke

For each kind of ``bench_prologue_op`` (``rope_kv``, ``norm_rope``, ``norm_rope_kv``; bf16,
Hq/Hk/D 32/8/128, q/k/v views of one qkv projection as a layer has them) and token count,
times ``rope_kv_store.launch`` for every heads-per-block (``BLOCK_H``), head split and warp
count against the launch the heuristics choose (``plan_launch`` without overrides), as GPU µs
per call from CUDA-graph replay over input sets that together exceed 3x the L2, and over the
same bandwidth floor as ``bench_prologue_op``. It answers whether a kernel's distance from its
floor is a launch-configuration choice. Writes ``sweep_prologue.md`` and
``sweep_prologue.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

try:  # imported as benchmarks.sweep_prologue_kernel
    from . import bench_prologue_op as bench
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import bench_prologue_op as bench
    import common

from rope_compile.kernels import rope_kv_store  # noqa: E402


def launch_args(kind: str, module: bench.Prologue, qkv, positions, cache_loc, k_buffer,
                v_buffer) -> tuple[tuple, dict]:
    """The kind's fused kernel on views of qkv, as ``rope_kv_store.launch(*args, **kwargs)``
    takes it (the op ``bench_prologue_op`` calls directly)."""
    s = module.s
    t, hq, hk, d = qkv.shape[0], s.q_heads, s.kv_heads, s.head_dim
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    norm = ((module.q_norm.weight, module.k_norm.weight, module.q_norm.eps, 0.0)
            if kind.startswith("norm") else None)
    kv = (v, k_buffer, v_buffer, cache_loc, None, None) if kind.endswith("kv") else None
    return (q, k, module.rope.cos_sin_cache, positions, d, True), {"norm": norm, "kv": kv}


def launcher(kind: str, module: bench.Prologue, overrides: dict):
    """``launch(qkv, positions, cache_loc, k_buffer, v_buffer)`` with launch ``overrides``
    (empty: the heuristics)."""

    def launch(*inputs):
        args, kwargs = launch_args(kind, module, *inputs)
        rope_kv_store.launch(*args, **kwargs, **overrides)

    return launch


def configs(s: bench.Shape) -> list[dict]:
    """(block_h, head_splits, num_warps) to time: every heads-per-block and warp count, the
    head splits a power of two (each configuration is a compile of its own)."""
    out = []
    max_heads = max(s.q_heads, s.kv_heads)
    for block_h, warps in itertools.product((2, 4, 8, 16, 32), (2, 4, 8)):
        if block_h > max_heads:
            continue
        blocks = math.ceil(max_heads / block_h)
        for splits in (n for n in (1, 2, 4, 8, 16) if n <= blocks):
            out.append({"block_h": block_h, "head_splits": splits, "num_warps": warps})
    return out


def sweep(kind: str, tokens: int, dtype, repeats: int, copy_bw: float, device: str = "cuda",
          max_configs: int | None = None) -> dict:
    s = bench.Shape(tokens)
    module = bench.Prologue(kind, s, dtype).to(device=device, dtype=dtype).eval()
    first = bench.op_inputs(module, bench.make_inputs(s, dtype, device, 100))
    n_sets = common.sets_beyond_l2(sum(x.numel() * x.element_size() for x in first), device)
    sets = [first, *(bench.op_inputs(module, bench.make_inputs(s, dtype, device, 100 + i))
                     for i in range(1, n_sets))]
    elem = torch.finfo(dtype).bits // 8
    floor_us = bench.floor_bytes(kind, s, elem, module.rope.cos_sin_cache.element_size()) / (
        copy_bw) * 1e6
    (q, k, cache, positions, rotary_dim, is_neox), kwargs = launch_args(kind, module, *sets[0])
    default = rope_kv_store.plan_tensor_launch(
        q, k, rope_kv_store.FromCache(cache, positions), rotary_dim, is_neox, **kwargs)
    chosen = {"block_h": default.constexprs["BLOCK_H"], "head_splits": default.grid[1],
              "num_warps": default.options["num_warps"]}
    rows = []
    with torch.no_grad():
        for cfg in [{}, *configs(s)[:max_configs]]:
            launch = launcher(kind, module, cfg)
            fns = [lambda x=x, f=launch: f(*x) for x in sets]
            if device == "cuda":
                med, samples = common.time_cuda_graph_us(fns, replays=repeats)
            else:
                med, samples = common.time_perf_counter_us(fns, repeats, device)
            rows.append({**(cfg or {"heuristics": True, **chosen}), "us": med,
                         "spread": (min(samples), max(samples)), "over_floor": med / floor_us})
    best = min(rows, key=lambda r: r["us"])
    return {"kind": kind, "tokens": tokens, "floor_us": floor_us, "chosen": chosen,
            "rows": rows, "best": best}


def report(results: Sequence[dict]) -> str:
    lines = []
    for r in results:
        heur = r["rows"][0]
        lines += [f"## {r['kind']}, T = {r['tokens']}: floor {r['floor_us']:.2f} µs; "
                  f"heuristics {r['chosen']}: {heur['us']:.2f} µs "
                  f"({heur['over_floor']:.2f}x); best {r['best']['us']:.2f} µs "
                  f"({r['best']['over_floor']:.2f}x)", ""]
        ranked = sorted(r["rows"][1:], key=lambda x: x["us"])[:8]
        lines.append(common.markdown_table(
            ["block_h", "head_splits", "num_warps", "µs (min-max)", "/ floor"],
            [[x["block_h"], x["head_splits"], x["num_warps"],
              f"{x['us']:.2f} ({x['spread'][0]:.2f}-{x['spread'][1]:.2f})",
              f"{x['over_floor']:.2f}x"] for x in ranked]))
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", default="512,4096")
    p.add_argument("--kinds", default=",".join(bench.KINDS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda, or cpu (a smoke run: the kernel "
                   "under the Triton interpreter)")
    p.add_argument("--max-configs", type=int, default=None,
                   help="time only the first N configurations (smoke runs)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sweep_prologue_kernel: --device cuda needs CUDA")
    copy_bw = common.measure_copy_bandwidth(args.device)
    results = []
    for kind in args.kinds.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            results.append(sweep(kind, tokens, torch.bfloat16, args.repeats, copy_bw,
                                 args.device, args.max_configs))
            print(report(results[-1:]), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep_prologue.md").write_text(
            f"{common.env_info(args.device)}\n\n" + report(results))
        (out / "sweep_prologue.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
