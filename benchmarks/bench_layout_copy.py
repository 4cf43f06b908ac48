"""The layout-copy rule, measured (issue 12, item 4): is a Q/K pair whose rotated q and k are
read only by layout copies better left to Inductor (``passes/layout_copy_rule.py``)?

    python benchmarks/bench_layout_copy.py --out DIR [--tokens 1,64,4096] \
        [--graphs copies,sdpa] [--rounds 5] [--repeats 10]
    python benchmarks/bench_layout_copy.py --device cpu --tiny --out DIR   # CPU smoke

Two small graphs, one attention layer's input side: ``qkv = x @ w_qkv`` (``x [T, hidden]``; the
projection makes q/k an intermediate the rewrite may rotate in place, as in a model), split,
sglang's ``RotaryEmbedding.forward_native`` (neox, rotary_dim = head size, an fp32
``cos_sin_cache`` gathered at random positions), then:

* ``copies``: q, k and v ``.view(T, H, D).transpose(0, 1).contiguous()`` (the ``[H, T, D]``
  layout attention reads): the rotated q and k are read only by layout copies, the rule's case
  (at T=1 the transposes are already contiguous, so there is no copy: the rule does not apply,
  the pair is rewritten, and the row compares the rewrite with Inductor's RoPE);
* ``sdpa``: causal GQA ``scaled_dot_product_attention`` straight on ``[1, H, T, D]`` views (the
  control: the rule rewrites it; the rewrite is expected to win or tie).

Three variants, each ``torch.compile`` in the default mode: plain Inductor (``inductor``),
``backend="rope_compile"`` with the rule (``rule``, the default options), and with the rule off
(``forced``: ``skip_pairs_only_read_by_copies=False``). Per graph and token count (bf16,
Hq=32, Hk=8, D=128 by default):

* the pass's decision (``rewritten`` / the rule's ``skipped:`` counter) and the fused calls in
  the generated code; max abs error of the outputs against eager;
* kernels per call and their summed GPU µs per call (``torch.profiler``), and the µs of the
  kernels other than GEMMs and attention (what the RoPE, the copies and the rewrite cost);
* µs per call from CUDA-graph replay (``common.time_cuda_graph_us``: 20 calls per graph,
  rotating over input buffers 3x the L2), in ``--rounds`` interleaved rounds (the variants'
  order reversed every other round): the median of the round medians and their min-max.

On the CPU (``--device cpu``) the rewrite is forced on for CPU graphs
(``devices=("cpu",)``), the timer is ``time.perf_counter`` and there are no kernel counts.
Writes ``layout_copy.md`` and ``layout_copy.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as benchmarks.bench_layout_copy
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

from rope_compile.demo import count_fused_calls  # noqa: E402  (common puts the repo on the path)

GRAPHS = ("copies", "sdpa")
VARIANTS = ("inductor", "rule", "forced")
RULE_OPTION = "skip_pairs_only_read_by_copies"
SKIPPED_PREFIX = "skipped: rotated q and k are only read by layout copies"
@dataclass(frozen=True)
class Size:
    hidden: int = 2048
    hq: int = 32
    hk: int = 8
    d: int = 128
    tokens: tuple[int, ...] = (1, 64, 4096)
    max_position: int = 8192


# Two kv heads: with one, k's transpose(0, 1) is already contiguous and ``.contiguous()`` no copy.
TINY = Size(hidden=64, hq=4, hk=2, d=128, tokens=(1, 8), max_position=64)


class Layer(nn.Module):
    """``x @ w_qkv`` -> split -> ``forward_native`` -> ``graph`` (see the module docstring)."""

    def __init__(self, s: Size, graph: str, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        from rope_compile import RotaryEmbedding

        g = torch.Generator().manual_seed(0)
        width = (s.hq + 2 * s.hk) * s.d
        w = torch.randn(s.hidden, width, generator=g) / s.hidden**0.5
        self.w_qkv = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
        self.rope = RotaryEmbedding(s.d, s.d, s.max_position, 10000.0, True,
                                    torch.float32).to(device)
        self.s, self.graph = s, graph

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        s, t = self.s, x.shape[0]
        q, k, v = (x @ self.w_qkv).split([s.hq * s.d, s.hk * s.d, s.hk * s.d], dim=-1)
        q, k = self.rope.forward_native(positions, q, k)
        q, k, v = (y.view(t, h, s.d).transpose(0, 1) for y, h in ((q, s.hq), (k, s.hk),
                                                                  (v, s.hk)))
        if self.graph == "copies":
            return q.contiguous(), k.contiguous(), v.contiguous()
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                           is_causal=True, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1).reshape(t, s.hq * s.d)


def _inputs(s: Size, tokens: int, dtype, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, s.hidden, generator=g).to(device=device, dtype=dtype)
    positions = torch.randint(0, s.max_position, (tokens,), generator=g).to(device)
    return x, positions


def _n_buffers(s: Size, tokens: int, dtype, device: str, max_buffers: int = 20) -> int:
    """Input sets that together are 3x the L2 (x and the qkv each call writes), at most
    ``max_buffers``; 2 on the CPU."""
    if torch.device(device).type != "cuda":
        return 2
    per_call = tokens * (s.hidden + (s.hq + 2 * s.hk) * s.d) * dtype.itemsize
    return common.sets_beyond_l2(per_call, device, max_buffers)


def _compile(model: nn.Module, variant: str, device: str) -> Callable:
    if variant == "inductor":
        return torch.compile(model, dynamic=False)
    options = {} if variant == "rule" else {RULE_OPTION: False}
    if torch.device(device).type == "cpu":
        options["devices"] = ("cpu",)
    return torch.compile(model, backend=common.rope_backend(), dynamic=False,
                         options=options or None)


def _max_err(got, want) -> float:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return max(common.max_abs_err(a, b) for a, b in zip(got, want, strict=True))


def _time_us(fns: Sequence[Callable[[], object]], device: str, repeats: int) -> float:
    if torch.device(device).type == "cuda":
        return common.time_cuda_graph_us(fns, n_calls=20, replays=repeats)[0]
    return common.time_perf_counter_us(fns, repeats=repeats, device=device)[0]


def run_case(s: Size, graph: str, tokens: int, device: str, dtype: torch.dtype,
             rounds: int = 5, repeats: int = 10, profile_steps: int = 20) -> list[dict]:
    """One row per variant for ``graph`` at ``tokens`` tokens (see the module docstring)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    model = Layer(s, graph, dtype, device).eval()
    bufs = [_inputs(s, tokens, dtype, device, seed=i)
            for i in range(_n_buffers(s, tokens, dtype, device))]
    rows = {v: {"graph": graph, "tokens": tokens, "variant": v, "error": None}
            for v in VARIANTS}
    steps: dict[str, list[Callable[[], object]]] = {}
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(*bufs[0])
        for variant, row in rows.items():
            try:
                counters["rope_compile"].clear()
                fn = _compile(model, variant, device)
                out, codes = run_and_get_code(fn, *bufs[0])
                rope = {k: int(n) for k, n in counters["rope_compile"].items() if n}
                row["rewritten"] = rope.get("rewritten", 0)
                row["skipped_by_rule"] = sum(n for k, n in rope.items()
                                             if k.startswith(SKIPPED_PREFIX))
                row["fused_calls"] = count_fused_calls("\n".join(codes))
                row["max_err"] = _max_err(out, eager)
                steps[variant] = [lambda fn=fn, b=b: fn(*b) for b in bufs]
                prof = common.profile_gpu_kernels(lambda f=steps[variant][0]: f(),
                                                  profile_steps, device)
                row["kernels"] = prof.count if prof else None
                row["gpu_us"] = prof.gpu_us if prof else None
                row["rope_side_us"] = prof.us_outside_gemm_and_attention() if prof else None
                row["kernel_us"] = prof.us_per_name if prof else None
            except Exception as err:  # noqa: BLE001 - report and go on with the others
                row["error"] = f"{type(err).__name__}: {err}".replace("\n", " ")[:400]
                traceback.print_exc(limit=-6)
        timed = [v for v in VARIANTS if v in steps]
        samples: dict[str, list[float]] = {v: [] for v in timed}
        for r in range(rounds):
            for v in timed if r % 2 == 0 else timed[::-1]:
                samples[v].append(_time_us(steps[v], device, repeats))
    for v in timed:
        rows[v]["us"] = statistics.median(samples[v])
        rows[v]["us_spread"] = (min(samples[v]), max(samples[v]))
        rows[v]["us_rounds"] = samples[v]
    base = rows["inductor"].get("us")
    for row in rows.values():
        row["vs_inductor"] = row["us"] / base if base and row.get("us") else None
    torch._dynamo.reset()
    return list(rows.values())


# --------------------------------------------------------------------------------------------
# Reporting


def _decision(row: dict) -> str:
    if row["variant"] == "inductor":
        return "-"
    if row.get("skipped_by_rule"):
        return "left to Inductor (rule)"
    return f"rewritten ({row.get('fused_calls', 0)} fused call)"


def results_table(rows: Sequence[dict]) -> str:
    headers = ["graph", "T", "variant", "decision", "kernels / call", "GPU kernel µs / call",
               "µs outside GEMM+attention", "µs / call (spread)", "vs Inductor",
               "max abs err"]
    body = []
    for r in rows:
        if r["error"]:
            body.append([r["graph"], r["tokens"], r["variant"], "error: " + r["error"][:120],
                         *["-"] * 6])
            continue
        spread = r.get("us_spread")
        body.append([
            r["graph"], r["tokens"], r["variant"], _decision(r), common.fmt(r["kernels"], 0),
            common.fmt(r["gpu_us"]), common.fmt(r["rope_side_us"]),
            f"{common.fmt(r.get('us'))} ({common.fmt(spread[0])}-{common.fmt(spread[1])})"
            if spread else "-",
            f"{r['vs_inductor']:.3f}x" if r.get("vs_inductor") else "-",
            f"{r['max_err']:.3g}",
        ])
    return common.markdown_table(headers, body)


def verdicts(rows: Sequence[dict]) -> list[str]:
    """Per graph and T: whether the rule's choice was the faster one (CUDA-graph µs)."""
    lines = []
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["graph"], r["tokens"]), {})[r["variant"]] = r
    for (graph, tokens), case in by_case.items():
        if any(case.get(v, {}).get("us") is None for v in VARIANTS):
            continue
        plain, rule, forced = (case[v]["us"] for v in ("inductor", "rule", "forced"))
        chose = "Inductor" if case["rule"].get("skipped_by_rule") else "the rewrite"
        best = "Inductor" if plain < forced else "the rewrite"
        lines.append(f"- {graph}, T={tokens}: the rule chose {chose} ({rule:.1f} µs); "
                     f"Inductor {plain:.1f} µs, forced rewrite {forced:.1f} µs: "
                     f"{best} is faster by {abs(forced - plain):.1f} µs "
                     f"({'agrees' if chose == best else 'DISAGREES'})")
    return lines


LEGEND = (
    "variants: plain Inductor; rope_compile with the rule (default options); rope_compile with "
    f"`{RULE_OPTION}=False` (forced rewrite). decision: what the pair pass did. kernels / call "
    "and GPU kernel µs / call: torch.profiler's CUDA kernels per call and their summed "
    "durations; µs outside GEMM+attention: the same without the projection GEMM and attention "
    "kernels (RoPE, copies, the rewrite's kernel). µs / call: CUDA-graph replay (20 calls per "
    "graph), the median over interleaved rounds and the min-max of the round medians."
)


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write layout_copy.md and layout_copy.json here")
    p.add_argument("--graphs", default=",".join(GRAPHS), help=f"subset of {','.join(GRAPHS)}")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (1,64,4096)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true",
                   help="hidden 64, 4/2 heads, T 1,8, fp32 (CPU smoke runs)")
    p.add_argument("--dtype", default=None, choices=sorted(common.DTYPES),
                   help="bf16 (default), fp32 with --tiny")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--repeats", type=int, default=10,
                   help="CUDA-graph replays (or synchronised calls on the CPU) per round")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse_args(argv)
    device = args.device or common.default_device()
    size = TINY if args.tiny else Size()
    if args.tokens:
        size = replace(size, tokens=tuple(int(t) for t in args.tokens.split(",") if t.strip()))
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    bad = [g for g in graphs if g not in GRAPHS]
    if bad:
        raise SystemExit(f"--graphs: unknown {bad}; choose from {GRAPHS}")
    dtype = common.DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    size = replace(size, max_position=max(size.max_position, *size.tokens))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    meta = common.env_info(device)
    meta.update(size=asdict(size), dtype=str(dtype), graphs=graphs, rounds=args.rounds,
                repeats=args.repeats)
    header = (f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, "
              f"{str(dtype).removeprefix('torch.')}, Hq/Hk/D {size.hq}/{size.hk}/{size.d}, "
              f"hidden {size.hidden}, {args.rounds} rounds x {args.repeats} repeats")
    print(header, flush=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for graph in graphs:
        for tokens in size.tokens:
            case = run_case(size, graph, tokens, device, dtype, rounds=args.rounds,
                            repeats=args.repeats)
            rows += case
            for r in case:
                print(f"{graph} T={tokens} {r['variant']}: " + (
                    f"ERROR {r['error']}" if r["error"] else
                    f"{_decision(r)}, {common.fmt(r.get('us'))} µs/call"), flush=True)
    meta["total_s"] = time.perf_counter() - t0
    md = [header, f"total {meta['total_s']:.0f} s", "", LEGEND, "", results_table(rows), "",
          *verdicts(rows), ""]
    text = "\n".join(md)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "layout_copy.md").write_text(text)
        (out / "layout_copy.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                         indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
