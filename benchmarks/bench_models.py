"""Real model code: HF Llama, Phi (partial rotary), GPT-NeoX (per-head qkv, partial rotary),
Qwen3 (q_norm / k_norm before RoPE), Gemma2 (head 256, softcapping), Mistral and a
gpt-fast-style Transformer; random weights, bf16.

    python benchmarks/bench_models.py --out DIR [--models qwen3,gemma2] \
        [--modes default,reduce-overhead] [--tokens 512] [--layers 4] [--rounds 5]
    python benchmarks/bench_models.py --device cpu --tiny --models qwen3 --out DIR  # CPU smoke

For each model and compile mode (``default``; ``reduce-overhead``: CUDA graphs, CUDA only),
plain Inductor (``torch.compile(model, mode=...)``) against ``backend="rope_compile"`` in the
same mode:

* fused RoPE calls in the generated code (one per layer expected) and the pairs the pass
  rewrote (``counters["rope_compile"]["rewritten"]``);
* max abs error of the logits (the output) of each against eager;
* kernels per forward and GPU kernel ms per forward: the summed durations of the forward's
  CUDA kernels from ``torch.profiler`` (of two interleaved profiles, the one with less GPU
  time; kernels replayed from a CUDA graph are reported one by one too), the GPU's share
  whatever the host does; and the kernels that run in only one of the two (Inductor's RoPE
  kernels and ours) with their µs;
* wall ms per synchronised forward (CUDA events; ``time.perf_counter`` on the CPU): the two
  alternatives are timed in ``--rounds`` interleaved rounds (the order alternating), each
  round the median of ``--iters`` forwards; reported: the median of the round medians and
  their min-max spread, and the speedup plain / rope_compile of the medians;
* back-to-back ms per forward: ``--iters`` forwards issued with no synchronisation between
  them, the wall time over their count (``common.host_time_us``), in the same interleaved
  rounds. This is how a serving loop runs; when the forward is host-bound (these small models
  in default mode) it is the host's time per forward, which is what the synchronised wall time
  of a host-bound forward measures plus one GPU tail.

Writes ``models.md`` (a table per mode) and ``models.json`` to ``--out``. A model that fails
is reported and the others go on. On the CPU (``--device cpu``) only the default mode runs
and the rewrite is forced on (``options={"devices": ("cpu",)}``); no kernel counts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

try:  # imported as benchmarks.bench_models
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

from rope_compile.demo import count_fused_calls  # noqa: E402  (common puts the repo on the path)

TESTS_DIR = common.REPO_ROOT / "tests"
MODES = ("default", "reduce-overhead")


@dataclass(frozen=True)
class Size:
    layers: int = 4
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    intermediate: int = 5632
    vocab: int = 1024
    tokens: int = 512


TINY = Size(layers=1, hidden=256, heads=2, kv_heads=1, head_dim=128, intermediate=256,
            vocab=128, tokens=8)


# --------------------------------------------------------------------------------------------
# Models: name -> (label, builder(size) -> (model, example args))


def _ids(s: Size, device) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, s.vocab, (1, s.tokens), generator=g).to(device),)


def _common_hf(s: Size) -> dict:
    return {"vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "max_position_embeddings": 4096,
            "intermediate_size": s.intermediate}


def _llama(s: Size):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common_hf(s), num_key_value_heads=s.kv_heads,
                                        head_dim=s.head_dim, attn_implementation="sdpa"))


def _phi(s: Size):
    from transformers import PhiConfig, PhiForCausalLM

    # head = hidden / heads; rotary half of it.
    return PhiForCausalLM(PhiConfig(**_common_hf(s), partial_rotary_factor=0.5,
                                    attn_implementation="sdpa"))


def _neox(s: Size):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(**_common_hf(s), rotary_pct=0.25,
                                            attn_implementation="sdpa"))


def _qwen3(s: Size):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_common_hf(s), num_key_value_heads=s.kv_heads,
                                        head_dim=s.head_dim, attn_implementation="sdpa"))


def _gemma2(s: Size):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Gemma2's own head size (256) and half the heads; "eager" attention keeps its logit
    # softcapping (SDPA has none), as HF recommends for Gemma2.
    return Gemma2ForCausalLM(Gemma2Config(
        **{**_common_hf(s), "num_attention_heads": max(1, s.heads // 2)},
        num_key_value_heads=max(1, s.kv_heads // 2), head_dim=2 * s.head_dim,
        attn_implementation="eager"))


def _mistral(s: Size):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common_hf(s), num_key_value_heads=s.kv_heads,
                                            head_dim=s.head_dim, sliding_window=4096,
                                            attn_implementation="sdpa"))


def _gpt_fast(s: Size, device, dtype):
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from test_gpt_fast import Transformer

    model = Transformer(layers=s.layers, dim=s.hidden, n_head=s.heads, n_kv=s.kv_heads,
                        head_dim=s.head_dim)
    tokens = min(s.tokens, 256)  # its freqs_cis table has 256 rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, s.hidden, generator=g).to(device=device, dtype=dtype)
    return model, (x, torch.arange(tokens, device=device))


HF_MODELS: dict[str, tuple[str, Callable]] = {
    "llama": ("HF Llama (GQA {heads}/{kv_heads}, head {head_dim})", _llama),
    "phi": ("HF Phi (rotary half of head {phi_head})", _phi),
    "neox": ("HF GPT-NeoX (rotary quarter of head {phi_head})", _neox),
    "qwen3": ("HF Qwen3 (q/k norm, GQA {heads}/{kv_heads}, head {head_dim})", _qwen3),
    "gemma2": ("HF Gemma2 (softcap, head {gemma_head})", _gemma2),
    "mistral": ("HF Mistral (GQA {heads}/{kv_heads}, head {head_dim})", _mistral),
}
MODEL_NAMES = (*HF_MODELS, "gpt-fast")


def label(name: str, s: Size) -> str:
    if name == "gpt-fast":
        return f"gpt-fast Transformer (GQA {s.heads}/{s.kv_heads}, head {s.head_dim})"
    return HF_MODELS[name][0].format(**asdict(s), phi_head=s.hidden // s.heads,
                                     gemma_head=2 * s.head_dim)


def build(name: str, s: Size, device, dtype) -> tuple[nn.Module, tuple]:
    """The model (random weights, ``dtype``, eval) and its example arguments."""
    torch.manual_seed(0)
    if name == "gpt-fast":
        model, args = _gpt_fast(s, device, dtype)
    else:
        model = HF_MODELS[name][1](s)
        model.config.use_cache = False
        args = _ids(s, device)
    return model.to(device=device, dtype=dtype).eval(), args


def select_models(spec: str | None) -> list[str]:
    """``--models``: comma-separated names or regexes matched against the names."""
    if not spec:
        return list(MODEL_NAMES)
    picked = [n for n in MODEL_NAMES
              if any(re.fullmatch(p.strip(), n) or p.strip() == n
                     for p in spec.split(",") if p.strip())]
    if not picked:
        raise SystemExit(f"--models {spec!r} matches none of {', '.join(MODEL_NAMES)}")
    return picked


# --------------------------------------------------------------------------------------------
# Measuring


def _logits(result) -> torch.Tensor:
    out = result.logits if hasattr(result, "logits") else result
    return out.float()  # a copy: a CUDA graph's output is overwritten by its next replay


def _compile(model: nn.Module, backend: str, mode: str, device: str) -> Callable:
    kwargs: dict = {}
    if backend == "rope_compile":
        kwargs["backend"] = common.rope_backend()
        if torch.device(device).type == "cpu":  # torch.compile takes mode or options
            kwargs["options"] = {"devices": ("cpu",)}
    if mode != "default" and "options" not in kwargs:
        kwargs["mode"] = mode
    return torch.compile(model, **kwargs)


def _stepper(fn: Callable, args: tuple, mode: str) -> Callable[[], object]:
    if mode == "reduce-overhead":
        def step():
            torch.compiler.cudagraph_mark_step_begin()
            return fn(*args)
        return step
    return lambda: fn(*args)


def time_rounds(steps: dict[str, Callable[[], object]], rounds: int, iters: int, device: str
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per alternative, ``rounds`` medians of ``iters`` synchronised calls (ms) and ``rounds``
    back-to-back ms per call (``iters`` calls, one synchronisation at the end), the order of
    the alternatives reversed every other round."""
    names = list(steps)
    synced: dict[str, list[float]] = {n: [] for n in names}
    back_to_back: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            synced[n].append(common.time_steps_ms(steps[n], iters, device, warmup=2)[0])
            back_to_back[n].append(common.host_time_us(steps[n], iters, device, warmup=2) / 1e3)
    return synced, back_to_back


def run_model(name: str, s: Size, modes: Sequence[str], device: str, dtype: torch.dtype,
              rounds: int = 5, iters: int = 20, profile_steps: int = 5,
              dump_code: str | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """One row per mode (see the module docstring for the fields)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    model, args = build(name, s, device, dtype)
    rows = []
    with torch.no_grad():
        eager = _logits(model(*args))
        for mode in modes:
            row = {"model": label(name, s), "key": name, "mode": mode, "error": None}
            rows.append(row)
            t0 = time.perf_counter()
            try:
                torch._dynamo.reset()
                counters["rope_compile"].clear()
                steps, codes = {}, {}
                for alt in ("inductor", "rope_compile"):
                    fn = _compile(model, alt, mode, device)
                    steps[alt] = _stepper(fn, args, mode)
                    out, code = run_and_get_code(steps[alt])
                    codes[alt] = "\n".join(code)
                    out = _logits(steps[alt]())  # after warm-up/recording: the steady state
                    row[f"max_err_{alt}"] = (out - eager).abs().max().item()
                row["fused_calls"] = count_fused_calls(codes["rope_compile"])
                row["fused_calls_inductor"] = count_fused_calls(codes["inductor"])
                row["rewritten"] = int(counters["rope_compile"].get("rewritten", 0))
                row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
                row["compile_s"] = time.perf_counter() - t0
                if dump_code:
                    stem = Path(dump_code) / f"{name}.{mode}"
                    stem.parent.mkdir(parents=True, exist_ok=True)
                    for alt, text in codes.items():
                        Path(f"{stem}.{alt}.py").write_text(text)
                for alt, prof in common.quietest_profiles(steps, profile_steps, device).items():
                    row[f"kernels_{alt}"] = prof.count if prof else None
                    row[f"gpu_ms_{alt}"] = prof.gpu_us / 1e3 if prof else None
                    row[f"kernel_us_{alt}"] = prof.us_per_name if prof else None
                if row["kernel_us_inductor"] is not None:
                    theirs, ours, names = common.differing_kernels(
                        row["kernel_us_inductor"], row["kernel_us_rope_compile"])
                    row["differing_us"] = (theirs, ours)
                    row["differing_kernels"] = names
                synced, back_to_back = time_rounds(steps, rounds, iters, device)
                for prefix, timed in (("ms", synced), ("b2b_ms", back_to_back)):
                    for alt, values in timed.items():
                        row[f"{prefix}_{alt}"] = statistics.median(values)
                        row[f"{prefix}_spread_{alt}"] = (min(values), max(values))
                        row[f"{prefix}_rounds_{alt}"] = values
                row["speedup"] = row["ms_inductor"] / row["ms_rope_compile"]
                row["b2b_speedup"] = row["b2b_ms_inductor"] / row["b2b_ms_rope_compile"]
            except Exception as err:  # noqa: BLE001 - report and go on with the others
                row["error"] = f"{type(err).__name__}: {err}".replace("\n", " ")[:400]
                log(traceback.format_exc(limit=-6))
            row["total_s"] = time.perf_counter() - t0
            log(f"{row['model']} [{mode}]: " + (f"ERROR {row['error']}" if row["error"] else
                f"fused {row['fused_calls']}, rewritten {row['rewritten']}, "
                f"ms {row['ms_inductor']:.3f} / {row['ms_rope_compile']:.3f}, back-to-back "
                f"{row['b2b_ms_inductor']:.3f} / {row['b2b_ms_rope_compile']:.3f}, "
                f"{row['total_s']:.1f} s"))
            torch._dynamo.reset()
    del model
    return rows


# --------------------------------------------------------------------------------------------
# Reporting


def _pair(row: dict, key: str, digits: int = 3) -> str:
    a, b = row.get(f"{key}_inductor"), row.get(f"{key}_rope_compile")
    if a is None or b is None:
        return "-"
    return f"{a:.{digits}f} / {b:.{digits}f}"


def _spread(row: dict, alt: str, prefix: str = "ms") -> str:
    lo_hi = row.get(f"{prefix}_spread_{alt}")
    return f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}" if lo_hi else "-"


def results_table(rows: Sequence[dict], mode: str) -> str:
    headers = ["model", "fused calls", "max abs err vs eager, Inductor / ours",
               "kernels per forward, Inductor / ours", "GPU kernel ms, Inductor / ours",
               "RoPE µs, Inductor -> ours", "wall ms Inductor (spread)",
               "wall ms ours (spread)", "speedup", "back-to-back ms, Inductor (spread) / "
               "ours (spread)", "back-to-back speedup"]
    body = []
    for r in rows:
        if r["mode"] != mode:
            continue
        if r["error"]:
            body.append([r["model"], "error: " + r["error"][:120], *["-"] * 9])
            continue
        diff = r.get("differing_us")
        skips = " (cudagraphs skipped!)" if r.get("cudagraph_skips") else ""
        body.append([
            r["model"] + skips, f"{r['fused_calls']} ({r['rewritten']} pairs)",
            f"{r['max_err_inductor']:.3g} / {r['max_err_rope_compile']:.3g}",
            _pair(r, "kernels", 0), _pair(r, "gpu_ms"),
            f"{diff[0]:.1f} -> {diff[1]:.1f}" if diff else "-",
            f"{r['ms_inductor']:.3f} ({_spread(r, 'inductor')})",
            f"{r['ms_rope_compile']:.3f} ({_spread(r, 'rope_compile')})",
            f"{r['speedup']:.3f}x",
            f"{r['b2b_ms_inductor']:.3f} ({_spread(r, 'inductor', 'b2b_ms')}) / "
            f"{r['b2b_ms_rope_compile']:.3f} ({_spread(r, 'rope_compile', 'b2b_ms')})",
            f"{r['b2b_speedup']:.3f}x",
        ])
    return common.markdown_table(headers, body)


LEGEND = (
    "fused calls: fused RoPE calls in rope_compile's generated code (the pairs the pass "
    "rewrote). max abs err: logits against eager. kernels per forward and GPU kernel ms: "
    "torch.profiler's CUDA kernel events per forward and their summed durations. RoPE µs: the "
    "kernels that run in only one of the two (Inductor's RoPE kernels and ours), µs per "
    "forward. wall ms: one synchronised forward, the median over interleaved rounds (each "
    "round the median of its forwards) and the min-max of the round medians. speedup: "
    "Inductor / ours, wall medians. back-to-back: the forwards of a round issued with one "
    "synchronisation at the end, wall ms over their count (the host's time per forward when "
    "it is host-bound), median and min-max over the rounds."
)


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write models.md and models.json here")
    p.add_argument("--models", default=None,
                   help=f"comma-separated subset of {','.join(MODEL_NAMES)} (regexes allowed)")
    p.add_argument("--modes", default="default,reduce-overhead",
                   help="default,reduce-overhead (reduce-overhead needs CUDA)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true",
                   help="1 layer, hidden 256, 2/1 heads, 8 tokens (CPU smoke runs)")
    p.add_argument("--dtype", default=None, choices=sorted(common.DTYPES),
                   help="bf16 (default), fp32 with --tiny")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=20, help="forwards per round")
    p.add_argument("--dump-code", default=None,
                   help="write each model's generated code (Inductor and rope_compile) here")
    return p.parse_args(argv)


def write_results(out: str | None, header: str, meta: dict, rows: Sequence[dict],
                  modes: Sequence[str]) -> str:
    """The markdown report of ``rows``, also written with the JSON to ``out`` if given."""
    md = [header, f"total {meta['total_s']:.0f} s", "", LEGEND, ""]
    for mode in modes:
        md += [f"## mode={mode}", "", results_table(rows, mode), ""]
    text = "\n".join(md)
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "models.md").write_text(text)
        (path / "models.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return text


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse_args(argv)
    device = args.device or common.default_device()
    size = TINY if args.tiny else Size()
    size = replace(size, **{k: v for k, v in (("tokens", args.tokens), ("layers", args.layers))
                            if v is not None})
    dtype = common.DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {MODES}")
    if torch.device(device).type != "cuda" and "reduce-overhead" in modes:
        print("reduce-overhead needs CUDA: skipped")
        modes = [m for m in modes if m != "reduce-overhead"]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    meta = common.env_info(device)
    meta.update(size=asdict(size), dtype=str(dtype), modes=modes, rounds=args.rounds,
                iters=args.iters)
    header = (f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, "
              f"{str(dtype).removeprefix('torch.')}, {size.layers} layers, hidden "
              f"{size.hidden}, {size.tokens} tokens (gpt-fast: <= 256), {args.rounds} rounds "
              f"x {args.iters} forwards")
    print(header, flush=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    text = ""
    for name in select_models(args.models):  # written after each model: a cut run keeps it
        rows += run_model(name, size, modes, device, dtype, rounds=args.rounds,
                          iters=args.iters, dump_code=args.dump_code,
                          log=lambda line: print(line, flush=True))
        meta["total_s"] = time.perf_counter() - t0
        text = write_results(args.out, header, meta, rows, modes)
    print(text)
    return rows


if __name__ == "__main__":
    main()
