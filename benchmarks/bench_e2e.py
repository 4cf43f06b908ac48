"""End-to-end benchmark: a Llama-style decoder stack, plain Inductor vs the rope_compile backend.

    python benchmarks/bench_e2e.py --out OUT_DIR            # 8 layers, decode 1/16/64, prefill 4096
    python benchmarks/bench_e2e.py --out OUT_DIR --quick    # 2 layers, decode 16, prefill 4096

Model (bf16, random weights, no embedding / LM head): ``--layers`` decoder layers of hidden 4096,
32 q / 8 kv heads of 128, MLP 14336, each layer::

    x = x + o_proj(attn(rope(split(qkv_proj(rmsnorm(x))))))
    x = x + down_proj(silu(gate_proj(rmsnorm(x))) * up_proj(rmsnorm(x)))

with q, k, v split from one qkv projection and rotated by
``rope_compile.RotaryEmbedding.forward_native`` (neox, rotary_dim 128), then a final RMSNorm.
Attention is ``F.scaled_dot_product_attention(..., enable_gqa=True)`` and there is no KV cache:

* prefill: the T tokens are one sequence (positions ``0..T-1``), ``is_causal=True``;
* decode: every token is its own sequence of length 1 (random positions in ``[0, 4096)``), so
  it attends only to itself. This keeps the decode step's projections, RoPE and MLP, with a
  trivial attention (no KV-cache reads).

Configs: eager; ``torch.compile(model)``; ``torch.compile(model, backend="rope_compile")``; the
two compiled ones also with ``mode="reduce-overhead"`` (CUDA graphs). All configs are compiled
first and kept (``dynamic=False``: one static graph per shape, as per-batch-size CUDA graphs in
a server), then timed in interleaved rounds (``--rounds``), so that the drift of a shared host
falls on all configs alike. Reported per config and shape: ms per synchronised step (CUDA
events) and its spread over the rounds, host ms per step (back-to-back steps, one sync at the
end), CUDA kernels launched per step (``torch.profiler`` kernel events over a few steps /
steps), time of the first call (compilation included), the number of Q+K RoPE pairs the
rope_compile pass rewrote while compiling, and the max abs difference of the output against
eager and, for rope_compile, against plain Inductor in the same mode.

If the rope_compile backend cannot be imported or fails to compile, its rows say so and the
other numbers are still reported. Inductor's on-disk caches make a second run much faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as benchmarks.bench_e2e
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

from rope_compile import RotaryEmbedding  # after common, which puts the repo on sys.path

# The Triton kernel the fused op launches (its name in profiler kernel events).
ROPE_KERNEL = "fused_qk_rope_kernel"


@dataclass(frozen=True)
class ModelConfig:
    layers: int = 8
    hidden: int = 4096
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    max_position: int = 8192
    rope_theta: float = 500000.0
    eps: float = 1e-5


TINY = ModelConfig(layers=2, hidden=512, num_q_heads=4, num_kv_heads=2, head_dim=128,
                   intermediate=1024)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype, device) -> None:
        super().__init__()
        self.hq, self.hk, self.d = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.hq * self.d, self.hk * self.d
        lin = dict(bias=False, dtype=dtype, device=device)
        self.qkv_proj = nn.Linear(cfg.hidden, self.q_size + 2 * self.kv_size, **lin)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden, **lin)
        self.rotary_emb = rope  # shared by every layer, as sglang's get_rope cache does

    def forward(self, positions: torch.Tensor, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb.forward_native(positions, q, k)
        if prefill:  # one sequence of T tokens: [1, H, T, D]
            q = q.view(1, tokens, self.hq, self.d).transpose(1, 2)
            k = k.view(1, tokens, self.hk, self.d).transpose(1, 2)
            v = v.reshape(1, tokens, self.hk, self.d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out = out.transpose(1, 2).reshape(tokens, self.q_size)
        else:  # T sequences of one token: [T, H, 1, D]
            q = q.view(tokens, self.hq, 1, self.d)
            k = k.view(tokens, self.hk, 1, self.d)
            v = v.reshape(tokens, self.hk, 1, self.d)
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            out = out.reshape(tokens, self.q_size)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        lin = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, **lin)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, **lin)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, **lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype, device) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden, cfg.eps, dtype, device)
        self.attn = Attention(cfg, rope, dtype, device)
        self.post_attn_norm = RMSNorm(cfg.hidden, cfg.eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        x = x + self.attn(positions, self.input_norm(x), prefill)
        return x + self.mlp(self.post_attn_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        rope = RotaryEmbedding(cfg.head_dim, cfg.head_dim, cfg.max_position, cfg.rope_theta,
                               True, dtype).to(device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, dtype, device)
                                    for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps, dtype, device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        for layer in self.layers:
            x = layer(positions, x, prefill)
        return self.norm(x)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg, dtype, device).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, 0.02)
    return model


def make_inputs(cfg: ModelConfig, kind: str, tokens: int, dtype, device: str, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "prefill":
        positions = torch.arange(tokens, device=device)
    else:
        positions = torch.randint(0, min(4096, cfg.max_position), (tokens,), generator=gen,
                                  device=device)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=device, dtype=torch.float32)
    return positions, x.to(dtype)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileConfig:
    name: str  # eager | inductor | rope_compile
    mode: str | None  # None (eager) | default | reduce-overhead

    @property
    def label(self) -> str:
        return self.name if self.mode is None else f"{self.name} {self.mode}"


def compile_model(model: nn.Module, cfg: CompileConfig, device: str) -> Callable:
    if cfg.name == "eager":
        return model
    kwargs: dict = {"dynamic": False}
    if cfg.name == "rope_compile":
        kwargs["backend"] = common.rope_backend()
        if torch.device(device).type == "cpu":
            # The pass leaves CPU graphs alone by default; force it for CPU smoke runs.
            kwargs["options"] = {"devices": ("cpu",)}
    if "options" not in kwargs:  # torch.compile takes mode or options, not both
        kwargs["mode"] = cfg.mode
    return torch.compile(model, **kwargs)


def _rewritten_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["rope_compile"].get("rewritten", 0))


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))


def _clear_counters() -> None:
    from torch._dynamo.utils import counters

    counters["rope_compile"].clear()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_e2e(
    model_cfg: ModelConfig,
    shapes: Sequence[tuple[str, int]],
    configs: Sequence[CompileConfig],
    device: str,
    dtype: torch.dtype = torch.bfloat16,
    decode_steps: int = 50,
    prefill_steps: int = 10,
    profile_steps: int = 3,
    rounds: int = 5,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One result dict per (config, shape).

    Phase 1 compiles every config (all kept alive: Dynamo guards on the backend, so they do not
    share graphs), runs each shape once (compile time), counts kernels and checks the output.
    Phase 2 times them in ``rounds`` interleaved rounds, the order of configs rotating each
    round, so that drift of the shared host hits all configs alike; a config's time is the
    median of its round medians, and its spread the range of those."""
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                4 * len(shapes) * len(configs))
    model = build_model(model_cfg, dtype, device)
    inputs = {s: make_inputs(model_cfg, s[0], s[1], dtype, device, seed=i)
              for i, s in enumerate(shapes)}
    eager_out = {}
    with torch.no_grad():
        for s in shapes:
            pos, x = inputs[s]
            eager_out[s] = model(pos, x, s[0] == "prefill").float()
    results: dict[tuple[str, tuple[str, int]], dict] = {}
    steps_of: dict[tuple[str, tuple[str, int]], Callable] = {}
    outputs: dict[tuple[str, tuple[str, int]], torch.Tensor] = {}
    for cfg in configs:
        _clear_counters()
        try:
            fn = compile_model(model, cfg, device)
        except Exception as err:  # noqa: BLE001 - e.g. the backend does not import
            msg = _short(err)
            log(f"{cfg.label}: setup failed: {msg}")
            results.update({(cfg.label, s): _result(cfg, s, error=msg) for s in shapes})
            continue
        graphs = cfg.mode == "reduce-overhead"
        for s in shapes:
            kind, tokens = s
            pos, x = inputs[s]
            prefill = kind == "prefill"

            def step(fn=fn, pos=pos, x=x, prefill=prefill, graphs=graphs):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return fn(pos, x, prefill)

            res = results[(cfg.label, s)] = _result(cfg, s)
            try:
                with torch.no_grad():
                    before, skips = _rewritten_count(), _cudagraph_skips()
                    t0 = time.perf_counter()
                    step()
                    common.synchronize(device)
                    res["first_call_s"] = time.perf_counter() - t0
                    res["cudagraph_skips"] = _cudagraph_skips() - skips
                    if cfg.name == "rope_compile":
                        res["rope_pairs_rewritten"] = _rewritten_count() - before
                    prof = common.profile_gpu_kernels(step, profile_steps, device)
                    if prof is not None:
                        res["kernels_per_step"] = prof.count
                        res["gpu_kernel_ms"] = prof.gpu_us / 1e3
                        res["rope_kernels_per_step"] = sum(
                            n for name, n in prof.per_name.items() if ROPE_KERNEL in name)
                        res["kernel_us_by_name"] = prof.us_per_name
                    # A copy: CUDA-graph outputs are overwritten by the next replay.
                    out = step().to(torch.float32, copy=True)
                    common.synchronize(device)
                outputs[(cfg.label, s)] = out
                res["max_abs_diff_vs_eager"] = (out - eager_out[s]).abs().max().item()
                res["out_abs_max"] = eager_out[s].abs().max().item()
                steps_of[(cfg.label, s)] = step
            except Exception as err:  # noqa: BLE001 - report and go on
                res["error"] = _short(err)
                log(traceback.format_exc(limit=3))
            log(f"{cfg.label:<30} {kind:>7} T={tokens:<5} "
                f"kernels={common.fmt(res['kernels_per_step'], 0)} "
                f"first={common.fmt(res['first_call_s'], 1)}s "
                f"rope_kernels={common.fmt(res['rope_kernels_per_step'], 0)} "
                f"pass_rewrites={res['rope_pairs_rewritten']} "
                f"cudagraph_skips={res['cudagraph_skips']} "
                f"{'ERROR ' + res['error'] if res['error'] else ''}")

    _time_interleaved(results, steps_of, shapes, configs, device, decode_steps, prefill_steps,
                      rounds, log)
    # rope_compile against plain Inductor in the same mode.
    for (label, s), res in results.items():
        if res["config"] == "rope_compile":
            ours = outputs.get((label, s))
            plain = outputs.get((CompileConfig("inductor", res["mode"]).label, s))
            if ours is not None and plain is not None:
                res["max_abs_diff_vs_inductor"] = (ours - plain).abs().max().item()
    return list(results.values())


def _time_interleaved(results, steps_of, shapes, configs, device, decode_steps, prefill_steps,
                      rounds, log) -> None:
    """Fill ``ms`` (synchronised step, CUDA events) and ``host_ms`` (back-to-back steps, one
    sync at the end: the host's cost per step when it is the bottleneck) with medians over
    interleaved rounds, and their spreads."""
    samples: dict = {key: {"ms": [], "host_ms": []} for key in steps_of}
    with torch.no_grad():
        for r in range(rounds):
            for s in shapes:
                steps = prefill_steps if s[0] == "prefill" else decode_steps
                order = [c for c in configs if (c.label, s) in steps_of]
                order = order[r % len(order):] + order[:r % len(order)] if order else order
                for cfg in order:
                    step = steps_of[(cfg.label, s)]
                    ms, _ = common.time_steps_ms(step, steps, device)
                    samples[(cfg.label, s)]["ms"].append(ms)
                    samples[(cfg.label, s)]["host_ms"].append(
                        common.host_time_us(step, steps, device) / 1e3)
            log(f"timing round {r + 1}/{rounds} done")
    for key, got in samples.items():
        res = results[key]
        for field, values in got.items():
            if values:
                res[field] = statistics.median(values)
                res[field + "_spread"] = (min(values), max(values))


def _result(cfg: CompileConfig, shape: tuple[str, int], error: str | None = None) -> dict:
    return {"config": cfg.name, "mode": cfg.mode, "label": cfg.label, "kind": shape[0],
            "tokens": shape[1], "ms": None, "ms_spread": None, "host_ms": None,
            "host_ms_spread": None, "kernels_per_step": None, "gpu_kernel_ms": None,
            "kernel_us_by_name": None,
            "rope_kernels_per_step": None, "first_call_s": None, "rope_pairs_rewritten": None,
            "max_abs_diff_vs_eager": None, "max_abs_diff_vs_inductor": None,
            "out_abs_max": None, "cudagraph_skips": None, "error": error}


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:300]


def results_table(results: Sequence[dict]) -> str:
    by_key = {(r["label"], r["kind"], r["tokens"]): r for r in results}
    headers = ["shape", "config", "ms/step", "spread", "vs inductor", "host ms/step",
               "host vs inductor", "GPU kernel ms", "differing kernels µs", "kernels/step",
               "rope kernels",
               "first call s", "maxΔ eager", "maxΔ inductor"]
    rows = []
    for r in sorted(results, key=lambda r: (r["kind"] != "decode", r["tokens"])):
        speedup = host_speedup = differing = "-"
        if r["config"] == "rope_compile":
            plain = by_key.get((CompileConfig("inductor", r["mode"]).label, r["kind"],
                                r["tokens"]))
            if plain and plain["ms"] and r["ms"]:
                speedup = f"{plain['ms'] / r['ms']:.3f}x"
            if plain and plain["host_ms"] and r["host_ms"]:
                host_speedup = f"{plain['host_ms'] / r['host_ms']:.3f}x"
            if plain and plain["kernel_us_by_name"] and r["kernel_us_by_name"]:
                theirs, ours, _ = common.differing_kernels(plain["kernel_us_by_name"],
                                                           r["kernel_us_by_name"])
                differing = f"{theirs:.1f} -> {ours:.1f}"
        spread = r["ms_spread"]
        label = r["label"]
        if r["mode"] == "reduce-overhead" and r["cudagraph_skips"]:
            label += " (cudagraphs skipped!)"
        rows.append([
            f"{r['kind']} T={r['tokens']}", label,
            "err" if r["error"] else common.fmt(r["ms"], 3),
            f"{spread[0]:.3f}-{spread[1]:.3f}" if spread else "-", speedup,
            common.fmt(r["host_ms"], 3), host_speedup, common.fmt(r["gpu_kernel_ms"], 3),
            differing,
            common.fmt(r["kernels_per_step"], 0), common.fmt(r["rope_kernels_per_step"], 0),
            common.fmt(r["first_call_s"], 1),
            _sci(r["max_abs_diff_vs_eager"]), _sci(r["max_abs_diff_vs_inductor"]),
        ])
    return common.markdown_table(headers, rows)


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results", help="output directory")
    p.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    p.add_argument("--quick", action="store_true", help="2 layers, decode T=16, prefill 4096")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model (hidden 512, 2 layers), decode 4 / prefill 64: CPU smoke")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--decode", default=None, help="decode token counts, e.g. 1,16,64")
    p.add_argument("--prefill", default=None, help="prefill token counts, e.g. 4096")
    p.add_argument("--configs", default="eager,inductor,rope_compile",
                   help="subset of eager,inductor,rope_compile")
    p.add_argument("--modes", default="default,reduce-overhead",
                   help="compile modes (reduce-overhead needs CUDA)")
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--decode-steps", type=int, default=50)
    p.add_argument("--prefill-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--from-json", default=None,
                   help="render the tables of a saved results_e2e.json instead of running")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    device = args.device or common.default_device()
    on_cuda = torch.device(device).type == "cuda"
    model_cfg = TINY if args.tiny else ModelConfig(layers=2 if args.quick else 8)
    if args.layers:
        model_cfg = ModelConfig(**{**asdict(model_cfg), "layers": args.layers})
    if args.tiny:
        decode, prefill = [4], [64]
    elif args.quick:
        decode, prefill = [16], [4096]
    else:
        decode, prefill = [1, 16, 64], [4096]
    decode = _ints(args.decode) if args.decode is not None else decode
    prefill = _ints(args.prefill) if args.prefill is not None else prefill
    shapes = [("decode", t) for t in decode] + [("prefill", t) for t in prefill]

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not on_cuda:
        modes = [m for m in modes if m != "reduce-overhead"]
    configs = [CompileConfig("eager", None)] if "eager" in names else []
    configs += [CompileConfig(n, m) for m in modes for n in ("inductor", "rope_compile")
                if n in names]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:  # re-render a saved run (e.g. after a change of the table)
        saved = json.loads(Path(args.from_json).read_text())
        meta, results = saved["meta"], saved["rows"]
        model_cfg = ModelConfig(**meta["model"])
        args.dtype, args.rounds = meta["dtype"], meta.get("rounds", args.rounds)
    else:
        meta = common.env_info(device)
        meta.update(model=asdict(model_cfg), dtype=args.dtype, shapes=shapes, rounds=args.rounds,
                    argv=list(argv if argv is not None else sys.argv[1:]))
        print(f"{meta['device_name']}: torch {meta['torch']}, triton {meta['triton']}; "
              f"{model_cfg.layers} layers, hidden {model_cfg.hidden}, shapes {shapes}",
              flush=True)
        t0 = time.perf_counter()
        results = run_e2e(model_cfg, shapes, configs, device, common.DTYPES[args.dtype],
                          decode_steps=args.decode_steps, prefill_steps=args.prefill_steps,
                          rounds=args.rounds, log=lambda s: print(s, flush=True))
        meta["total_s"] = time.perf_counter() - t0
    table = results_table(results)
    errors = [f"- {r['label']} {r['kind']} T={r['tokens']}: {r['error']}"
              for r in results if r["error"]]
    legend = (
        f"{model_cfg.layers} layers, hidden {model_cfg.hidden}, {model_cfg.num_q_heads}/"
        f"{model_cfg.num_kv_heads} heads of {model_cfg.head_dim}, {args.dtype}. ms/step: one "
        "synchronised step (CUDA events), median over interleaved rounds of the configs "
        f"({args.rounds} rounds, each the median of its steps); spread: the lowest and highest "
        "round medians. host ms/step: back-to-back steps with one sync at the end (what the "
        "host costs per step when it is the bottleneck). vs inductor: inductor / rope_compile "
        "in the same mode. GPU kernel ms: the summed durations of the step's CUDA kernels "
        "(torch.profiler), the GPU's share whatever the host does. differing kernels µs: the "
        "kernels that run in only one of plain Inductor and rope_compile (its RoPE kernels and "
        "ours), their µs per step, Inductor's -> ours. "
        "kernels/step: CUDA kernel events from torch.profiler / steps; rope kernels: those of "
        f"them named {ROPE_KERNEL} (one per layer when the pass fused every layer). first call "
        "s: includes compilation. maxΔ: max abs "
        "difference of the output against eager / against plain Inductor in the same mode."
    )
    md = ["# End-to-end decoder: Inductor vs rope_compile", "",
          f"- device: {meta['device_name']}, torch {meta['torch']}, CUDA {meta['cuda']}, "
          f"triton {meta['triton']}", f"- total time: {meta['total_s']:.0f} s", "",
          legend, "", table, ""]
    if errors:
        md += ["## Errors", "", *errors, ""]
    (out / "results_e2e.md").write_text("\n".join(md))
    (out / "results_e2e.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print(f"\nwrote {out / 'results_e2e.md'}, {out / 'results_e2e.json'} "
          f"(total {meta['total_s']:.0f} s)")
    for line in errors[:10]:
        print(line[:240])
    print(f"\n## e2e ({meta['device_name']}, {model_cfg.layers} layers, {args.dtype})\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
