"""Op rows for the attention-prologue kernels (issue 13): each fused op against its bandwidth
floor and against Inductor's code for the same unfused graph.

    python benchmarks/bench_prologue_op.py --out DIR [--tokens 1,8,64,512,4096] [--repeats 20]
    python benchmarks/bench_prologue_op.py --device cpu --tiny --out DIR   # CPU smoke

The graph is a layer's attention prologue as sglang-style native model code (that of
``rope_compile.demo.DecodeLayer``): the projection ``qkv = x @ w_qkv`` (``[T, (Hq + 2 Hk) D]``)
split into q, k, v;
optionally the per-head q/k RMSNorm (``rope_compile.demo.RMSNorm``); RoPE by
``RotaryEmbedding.forward_native`` from sglang's ``cos_sin_cache`` at ``positions``; optionally
the KV-cache write (``fused_set_kv_buffer_arg``: ``k_buffer[cache_loc] = k``,
``v_buffer[cache_loc] = v``, paged ``[S, Hk, D]`` buffers); then causal GQA SDPA over the
step's q, k, v (the reader a layer has). Three kinds:

* ``rope_kv``      RoPE + KV store          -> ``fused_qk_rope_kv_store_inplace``
* ``norm_rope``    QK-norm + RoPE           -> ``fused_qk_norm_rope_inplace``
* ``norm_rope_kv`` QK-norm + RoPE + KV store -> ``fused_qk_norm_rope_kv_store_inplace``

Implementations, each checked against eager on fresh data before timing:

* ``inductor``     ``torch.compile(layer, dynamic=False)``: Inductor's code for the unfused
  graph;
* ``rope_compile`` ``torch.compile(layer, backend="rope_compile")``: the passes rewrite the
  prologue into the fused op, launched from the generated code (the fusion counters are
  checked);
* ``op``           the fused ``torch.ops.rope_compile`` op alone, called directly on views of a
  precomputed qkv (the kernel; its q/k checked against eager's prologue).

The floor is the bytes the fused op must move over the measured device copy bandwidth: q and k
read and written (the whole heads when normalised, else the rotated part; here rotary_dim =
D), v read and the k/v cache rows written (KV kinds), the cos/sin cache rows, positions and
cache_loc read. GPU µs per call come from CUDA-graph replay (``common.time_cuda_graph_us``, 20
calls per graph rotating over input sets that together exceed 3x the L2, median of
``--repeats`` replays, min-max shown), the implementations interleaved in ``--rounds`` rounds.
From ``torch.profiler``: kernels per call, and the **prologue µs** of the compiled layers: the
summed durations of their kernels other than the projection GEMM and attention (what Inductor
spends on norm, RoPE and cache writes, against the fused kernel). The target (issue 13) is
each fused kernel within 1.3x of its floor. Writes ``prologue_op.md`` and ``prologue_op.json``
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

try:  # imported as benchmarks.bench_prologue_op
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

KINDS = ("rope_kv", "norm_rope", "norm_rope_kv")
IMPLS = ("inductor", "rope_compile", "op")
# The fusion counters rope_compile's compile must show per kind (one layer, one pair).
EXPECTED_FUSIONS = {
    "rope_kv": {"rewritten": 1, "kv_store rewritten": 1},
    "norm_rope": {"rewritten": 1, "qk_norm rewritten": 1},
    "norm_rope_kv": {"rewritten": 1, "qk_norm rewritten": 1, "kv_store rewritten": 1},
}


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int = 2048
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    slots: int = 0  # cache rows; 0: max(4 T, 4096)

    @property
    def cache_rows(self) -> int:
        return self.slots or max(4 * self.tokens, 4096)


def floor_bytes(kind: str, s: Shape, elem: int, cache_elem: int) -> int:
    """Bytes the fused op must move (rotary_dim = head_dim)."""
    t, hq, hk, d = s.tokens, s.q_heads, s.kv_heads, s.head_dim
    total = 2 * t * (hq + hk) * d * elem  # q and k, read and written in place
    total += t * d * cache_elem + t * 8  # cos/sin rows (cat(cos, sin): D per token), positions
    if kind.startswith("norm"):
        total += 2 * d * elem  # the two weights
    if kind.endswith("kv"):
        total += t * hk * d * elem + 2 * t * hk * d * elem + t * 8  # v; k/v rows; cache_loc
    return total


class Prologue(nn.Module):
    """A layer's projection, attention prologue (``kind``) and attention."""

    def __init__(self, kind: str, s: Shape, dtype: torch.dtype) -> None:
        super().__init__()
        from rope_compile.demo import RMSNorm
        from rope_compile.module import RotaryEmbedding

        self.kind, self.s = kind, s
        g = torch.Generator().manual_seed(0)
        width = (s.q_heads + 2 * s.kv_heads) * s.head_dim
        self.w_qkv = nn.Parameter(torch.randn(s.hidden, width, generator=g) / s.hidden**0.5,
                                  requires_grad=False)
        self.q_norm, self.k_norm = RMSNorm(s.head_dim), RMSNorm(s.head_dim)
        with torch.no_grad():  # not all ones: the weights must matter
            self.q_norm.weight.uniform_(0.5, 1.5)
            self.k_norm.weight.uniform_(0.5, 1.5)
        self.rope = RotaryEmbedding(s.head_dim, s.head_dim, 8192, 10000.0, True, dtype)

    def forward(self, x, positions, cache_loc, k_buffer, v_buffer):
        t, s = x.shape[0], self.s
        q, k, v = self.prologue(x @ self.w_qkv, positions, cache_loc, k_buffer, v_buffer)
        q, k, v = (y.view(t, h, s.head_dim).transpose(0, 1).unsqueeze(0)
                   for y, h in ((q, s.q_heads), (k, s.kv_heads), (v, s.kv_heads)))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                             enable_gqa=True)
        return o.squeeze(0).transpose(0, 1).reshape(t, s.q_heads * s.head_dim)

    def prologue(self, qkv, positions, cache_loc, k_buffer, v_buffer):
        """(q, k, v) of the layer: norm, RoPE and the KV store by ``kind``."""
        from rope_compile.kv_store import FusedSetKVBufferArg

        t, hq, hk, d = qkv.shape[0], self.s.q_heads, self.s.kv_heads, self.s.head_dim
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        if self.kind.startswith("norm"):
            q = self.q_norm(q.view(t, hq, d)).view(t, hq * d)
            k = self.k_norm(k.view(t, hk, d)).view(t, hk * d)
        store = None
        if self.kind.endswith("kv"):
            store = FusedSetKVBufferArg(value=v.view(t, hk, d), k_buffer=k_buffer,
                                        v_buffer=v_buffer, k_scale=None, v_scale=None,
                                        cache_loc=cache_loc)
        q, k = self.rope.forward_native(positions, q, k, fused_set_kv_buffer_arg=store)
        return q, k, v


def direct_op(module: Prologue):
    """The fused op on views of qkv (in place): what the rewrite launches."""
    ops = torch.ops.rope_compile
    s = module.s

    def call(qkv, positions, cache_loc, k_buffer, v_buffer):
        t, hq, hk, d = qkv.shape[0], s.q_heads, s.kv_heads, s.head_dim
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
        cache, eps = module.rope.cos_sin_cache, module.q_norm.eps
        w = (module.q_norm.weight, module.k_norm.weight)
        if module.kind == "rope_kv":
            ops.fused_qk_rope_kv_store_inplace(q, k, v, k_buffer, v_buffer, cache_loc, cache,
                                               positions, d, True)
        elif module.kind == "norm_rope":
            ops.fused_qk_norm_rope_inplace(q, k, *w, eps, 0.0, cache, positions, d, True)
        else:
            ops.fused_qk_norm_rope_kv_store_inplace(q, k, v, k_buffer, v_buffer, cache_loc, *w,
                                                    eps, 0.0, cache, positions, d, True)
        return q, k

    return call


def make_inputs(s: Shape, dtype, device, seed: int) -> tuple:
    """(x, positions, cache_loc, k_buffer, v_buffer) of the layer."""
    g = torch.Generator().manual_seed(seed)
    hk, d, t = s.kv_heads, s.head_dim, s.tokens
    x = torch.randn(t, s.hidden, generator=g).to(device=device, dtype=dtype)
    positions = torch.randint(0, 8192, (t,), generator=g).to(device)
    loc = torch.randperm(s.cache_rows, generator=g)[:t].to(device)
    k_buffer = torch.randn(s.cache_rows, hk, d, generator=g).to(device=device, dtype=dtype)
    v_buffer = torch.randn(s.cache_rows, hk, d, generator=g).to(device=device, dtype=dtype)
    return x, positions, loc, k_buffer, v_buffer


def op_inputs(module: Prologue, inputs: tuple) -> tuple:
    """The direct op's inputs: the layer's with x replaced by its projection."""
    return (inputs[0] @ module.w_qkv, *inputs[1:])


def _clone(inputs: tuple) -> tuple:
    return tuple(x.clone() for x in inputs)


def build_impls(module: Prologue, device: str) -> tuple[dict, dict]:
    """The implementations, and the rope_compile fusion counters of its compile."""
    from torch._dynamo.utils import counters

    impls = {"op": direct_op(module)}
    if device == "cpu":
        return impls, {}
    torch._dynamo.reset()
    impls["inductor"] = torch.compile(module, dynamic=False)
    counters.clear()
    compiled = torch.compile(module, backend=common.rope_backend(), dynamic=False)
    return {**impls, "rope_compile": compiled}, counters


def check(module: Prologue, name: str, impl, s: Shape, dtype, device) -> float:
    """Max abs error against eager (raises past the tolerance: a few bf16 ulps of the largest
    output): the layer's output, or the direct op's q and k; and the written cache rows."""
    inputs = make_inputs(s, dtype, device, seed=7)
    if name == "op":
        inputs = op_inputs(module, inputs)
    mine, theirs = _clone(inputs), _clone(inputs)
    got = impl(*mine)
    with torch.no_grad():
        want = module.prologue(*theirs)[:2] if name == "op" else module(*theirs)
    loc = inputs[2]
    pairs = [*zip(got, want, strict=True)] if name == "op" else [(got, want)]
    if module.kind.endswith("kv"):
        pairs += [(mine[3][loc], theirs[3][loc]), (mine[4][loc], theirs[4][loc])]
    err = 0.0
    for a, b in pairs:
        a, b = a.float().reshape(-1), b.float().reshape(-1)
        if a.numel() == 0:
            continue
        e = (a - b).abs().max().item()
        tol = common.tolerance(dtype, b.abs().max().item(), ulps=4)
        if not e <= tol:
            raise AssertionError(f"{module.kind}: max abs error {e:.3g} > {tol:.3g}")
        err = max(err, e)
    return err


def run_shape(kind: str, s: Shape, dtype, device: str, repeats: int, rounds: int,
              copy_bw: float) -> dict:
    torch.manual_seed(0)
    module = Prologue(kind, s, dtype).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        impls, fusion_counts = build_impls(module, device)
        row = {"kind": kind, "shape": vars(s) | {"cache_rows": s.cache_rows},
               "floor_bytes": floor_bytes(kind, s, torch.finfo(dtype).bits // 8,
                                          module.rope.cos_sin_cache.element_size())}
        row["floor_us"] = row["floor_bytes"] / copy_bw * 1e6 if copy_bw else None
        row["errors"] = {name: check(module, name, impl, s, dtype, device)
                         for name, impl in impls.items()}
        if "rope_compile" in impls:
            fused = {k: v for k, v in fusion_counts["rope_compile"].items()
                     if k in EXPECTED_FUSIONS[kind] or "skipped" in k or "missed" in k}
            row["fusions"] = fused
            row["fused_as_expected"] = fused == EXPECTED_FUSIONS[kind]
        n_sets = common.sets_beyond_l2(
            sum(x.numel() * x.element_size() for x in make_inputs(s, dtype, "meta", 0)), device)
        sets = [make_inputs(s, dtype, device, seed=100 + i) for i in range(n_sets)]
        inputs = {name: [op_inputs(module, x) for x in sets] if name == "op" else sets
                  for name in impls}
        samples: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(rounds):
            order = list(impls) if r % 2 == 0 else list(reversed(impls))
            for name in order:
                fns = [lambda f=impls[name], x=x: f(*x) for x in inputs[name]]
                if device == "cuda":
                    _, times = common.time_cuda_graph_us(fns, replays=repeats)
                else:
                    _, times = common.time_perf_counter_us(fns, 3, device)
                samples[name] += times
        row["time_us"] = {n: statistics.median(v) for n, v in samples.items()}
        row["spread_us"] = {n: (min(v), max(v)) for n, v in samples.items()}
        row["kernels"], row["prologue_us"], row["kernel_us"] = {}, {}, {}
        for name, impl in impls.items():
            prof = common.profile_gpu_kernels(lambda f=impl, x=inputs[name][0]: f(*x), 5,
                                              device)
            if prof is None:
                continue
            row["kernels"][name] = prof.count
            row["kernel_us"][name] = prof.us_per_name
            row["prologue_us"][name] = prof.us_outside_gemm_and_attention()
    return row


def results_table(rows: Sequence[dict]) -> str:
    headers = ["kind", "T", "floor µs", "op µs (min-max)", "op / floor",
               "prologue µs, inductor / rope_compile (profiler)",
               "layer µs, inductor / rope_compile (min-max)", "speedup", "kernels ind / rc",
               "fused"]
    body = []
    for r in rows:
        t, sp, fl, pro = r["time_us"], r["spread_us"], r["floor_us"], r.get("prologue_us", {})

        def cell(n, t=t, sp=sp):
            if n not in t:
                return "-"
            return f"{common.fmt(t[n], 2)} ({common.fmt(sp[n][0], 2)}-{common.fmt(sp[n][1], 2)})"

        ratio = f"{t['op'] / fl:.2f}x" if fl else "-"
        both = "inductor" in t and "rope_compile" in t
        speed = f"{t['inductor'] / t['rope_compile']:.3f}x" if both else "-"
        prologue = (f"{common.fmt(pro.get('inductor'), 2)} / "
                    f"{common.fmt(pro.get('rope_compile'), 2)}") if both else "-"
        layer = f"{cell('inductor')} / {cell('rope_compile')}" if both else "-"
        kern = " / ".join("-" if r["kernels"].get(n) is None else f"{r['kernels'][n]:.0f}"
                          for n in ("inductor", "rope_compile"))
        fused = {True: "yes", False: f"NO {r.get('fusions')}", None: "-"}[
            r.get("fused_as_expected")]
        body.append([r["kind"], r["shape"]["tokens"], common.fmt(fl, 2), cell("op"), ratio,
                     prologue, layer, speed, kern, fused])
    return common.markdown_table(headers, body)


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    p.add_argument("--tokens", default="1,8,64,512,4096", help="comma-separated T")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--repeats", type=int, default=20, help="CUDA-graph replays per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--tiny", action="store_true", help="a tiny shape (CPU smoke)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse_args(argv)
    device = args.device or common.default_device()
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = ([Shape(3, hidden=64, q_heads=2, kv_heads=1, slots=16)] if args.tiny else
              [Shape(int(t)) for t in args.tokens.split(",")])
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)}; choose from {KINDS}")
    copy_bw = common.measure_copy_bandwidth(device) if device == "cuda" else 0.0
    rows = []
    for kind in kinds:
        for s in shapes:
            rows.append(run_shape(kind, s, dtype, device, args.repeats, args.rounds, copy_bw))
            print(results_table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = common.env_info(device) | {"copy_bw_gbs": copy_bw / 1e9, "dtype": args.dtype,
                                      "command": " ".join(["python", *sys.argv])}
    table = results_table(rows)
    (out / "prologue_op.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                     default=str))
    (out / "prologue_op.md").write_text(
        "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
