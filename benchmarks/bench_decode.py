"""Decode-step benchmark (issue 13): the attention prologue (QK-norm, RoPE, KV-cache write)
of one decode step, plain Inductor against ``backend="rope_compile"``, whose passes fuse RoPE
(``FuseQKRopePass``), then extend the fused call over the per-head q/k RMSNorm
(``passes/fuse_qk_norm.py``) and the KV-cache store (``passes/fuse_kv_store.py``). Three
models, one token per sequence per step:

* ``qwen3``: HF Qwen3 (per-head q/k norm) with a transformers ``StaticCache``;
* ``llama``: HF Llama (no q/k norm) with a ``StaticCache``;
* ``sglang``: the sglang-style module path, ``rope_compile.demo.TinyDecoder`` (fused qkv
  projection, per-head q/k RMSNorm, ``RotaryEmbedding.forward_native(...,
  fused_set_kv_buffer_arg=FusedSetKVBufferArg(...))`` writing a paged ``[B * L, Hk, D]`` cache,
  SDPA over the cache with a visibility mask; its MLP is ``2 * hidden`` wide).

    python benchmarks/bench_decode.py --out DIR [--models sglang,qwen3,llama] \
        [--batches 1,8,64] [--modes default,reduce-overhead] [--layers 4] [--rounds 5] \
        [--budget-s 285]
    python benchmarks/bench_decode.py --device cpu --tiny --out DIR   # CPU smoke

Per model, batch and mode (``default``; ``reduce-overhead``: CUDA graphs): the cache holds a
``Size.prefill``-token prefix (16; HF: an eager prefill fills the StaticCache; sglang: random
cache rows, the same for every run), then each step decodes one token per sequence (HF:
``model(ids[B, 1], <cache>, position_ids=[B, 1], cache_position)``; sglang:
``model(ids[B], positions[B], cache_loc[B], visible[B, 1, 1, L], k_caches, v_caches)`` from
``rope_compile.demo.decode_inputs``), the positions advancing step by step (the cache is
rewound to the prefill before each timed run; later rows stay, masked; a step costs the same at
every position). Plain Inductor (``torch.compile(model, mode=..., dynamic=False)``) against
``backend="rope_compile"``, timed in ``--rounds`` interleaved rounds (order alternating); each
round is the median of ``--iters`` synchronised steps. Reported: step ms (median of the round
medians, min-max spread), speedup, max abs error of the first step's logits against eager,
fused calls in the generated code and which fusions the passes made (the ``rewritten``,
``qk_norm rewritten`` and ``kv_store rewritten`` counters of
``torch._dynamo.utils.counters["rope_compile"]``, read right after rope_compile's compile),
CUDA kernels per step and per layer and their GPU ms (torch.profiler), and the
attention-prologue kernels per layer: in the profiled step's kernel sequence, the non-GEMM
kernels from the layer's q/k/v projection GEMM(s) to its attention kernel (norms, RoPE, cache
writes, casts: what issue 13 wants fused). When the step has no attention kernel (SDPA's math
fallback, e.g. GQA with a mask on CUDA without cuDNN attention, runs attention as two batched
GEMMs), the layers are cut by their GEMM count instead and the prologue ends at the QK^T GEMM
(it then also holds the math path's K/V casts and copies).

``--budget-s`` (285 by default) keeps the default run (3 models x 3 batches x 2 modes) within
about 5 minutes: once the mean case time so far says that the next case would end past it, the
remaining cases are reported as skipped (run them with ``--models`` / ``--batches``); sglang
runs first.

Writes ``decode.md`` and ``decode.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

try:  # imported as benchmarks.bench_decode
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

from rope_compile.demo import count_fused_calls  # noqa: E402  (common puts the repo on the path)

MODES = ("default", "reduce-overhead")
ALTS = ("inductor", "rope_compile")
# Kernel names (torch.profiler) by role. Inductor names its kernels after the ops they fuse
# ("triton_poi_fused__scaled_dot_product_..."), so only non-Triton kernels count as GEMM or
# attention.
_GEMM = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas", re.I)
_GEMM_AUX = re.compile(r"splitK|reduce_kernel", re.I)
_ATTENTION = re.compile(r"fmha|flash|attention|sdpa|attn", re.I)
# The rope_compile counters of the fusions the passes made (read right after the compile).
FUSIONS = {"rewritten": "rewritten", "qk_norm_rewritten": "qk_norm rewritten",
           "kv_store_rewritten": "kv_store rewritten"}


@dataclass(frozen=True)
class Size:
    layers: int = 4
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    intermediate: int = 5632
    vocab: int = 1024
    prefill: int = 16
    cache_len: int = 256


TINY = Size(layers=1, hidden=256, heads=2, kv_heads=1, head_dim=128, intermediate=256,
            vocab=128, prefill=4, cache_len=64)


def build(name: str, s: Size, device, dtype) -> nn.Module:
    if name == "sglang":
        from rope_compile.demo import TinyDecoder

        torch.manual_seed(0)
        model = TinyDecoder(layers=s.layers, hidden=s.hidden, num_heads=s.heads,
                            num_kv_heads=s.kv_heads, head_dim=s.head_dim, vocab=s.vocab,
                            dtype=dtype)
        return model.to(device=device, dtype=dtype).eval()
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"qwen3": (Qwen3Config, Qwen3ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[name]
    torch.manual_seed(0)
    config = config_cls(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                        head_dim=s.head_dim, intermediate_size=s.intermediate,
                        max_position_embeddings=4096, attn_implementation="sdpa")
    return model_cls(config).to(device=device, dtype=dtype).eval()


LABELS = {"qwen3": "HF Qwen3 (q/k norm)", "llama": "HF Llama",
          "sglang": "sglang-style (q/k norm, paged KV store)"}
# Per model: (q/k/v projection GEMMs, GEMMs per layer with SDPA's math fallback: the
# projections, QK^T and PV, o, the MLP's).
GEMM_LAYOUT = {"qwen3": (3, 9), "llama": (3, 9), "sglang": (1, 6)}


def _call_kwargs(model: nn.Module, cache, cache_position, position_ids) -> dict:
    """The cache keyword arguments this transformers version's forward takes (5.x renamed
    ``past_key_values`` to ``cache`` and dropped ``cache_position``)."""
    params = inspect.signature(model.model.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache,
              "position_ids": position_ids, "use_cache": True}
    if "cache_position" in params:
        kwargs["cache_position"] = cache_position
    return kwargs


class Decoder:
    """One HF model's decode steps on its own StaticCache, filled by an eager prefill.

    ``step()`` decodes the next position (``fn`` is the model, compiled or not); ``rewind()``
    goes back to the first position after the prefill (the later cache rows stay, masked)."""

    def __init__(self, model: nn.Module, s: Size, batch: int, device, graphs: bool) -> None:
        from transformers import StaticCache

        g = torch.Generator().manual_seed(batch)
        self.model, self.s, self.graphs = model, s, graphs
        self.cache = StaticCache(config=model.config, max_cache_len=s.cache_len)
        prompt = torch.randint(0, s.vocab, (batch, s.prefill), generator=g).to(device)
        self.ids = torch.randint(0, s.vocab, (batch, 1), generator=g).to(device)
        positions = torch.arange(s.cache_len, device=device)
        self.positions = [(positions[p:p + 1].clone(), positions[p:p + 1].expand(batch, 1)
                           .clone()) for p in range(s.prefill, s.cache_len)]
        self.steps = len(self.positions)
        with torch.no_grad():
            model(prompt, **_call_kwargs(model, self.cache, positions[:s.prefill],
                                         positions[:s.prefill].expand(batch, -1)))
        self.next = 0

    def rewind(self) -> None:
        self.next = 0
        for layer in getattr(self.cache, "layers", ()):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(self.s.prefill)

    def step(self, fn: Callable) -> torch.Tensor:
        if self.next >= len(self.positions):
            raise RuntimeError("decode steps beyond --cache-len; rewind() first")
        cache_position, position_ids = self.positions[self.next]
        self.next += 1
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(self.ids, **_call_kwargs(self.model, self.cache, cache_position,
                                           position_ids)).logits


class PagedDecoder:
    """The sglang-style model's decode steps (``rope_compile.demo.TinyDecoder``) on its own
    paged caches: per layer ``k_cache`` / ``v_cache`` of ``[batch * cache_len, kv_heads,
    head_dim]`` (sequence b owns rows ``[b * cache_len, (b + 1) * cache_len)``), random rows
    standing for the prefill (the same for every decoder of a batch). Step n decodes position
    ``prefill + n`` with ``decode_inputs``' ids, positions, cache rows and visibility mask (built
    up front). The caches are static addresses (as a StaticCache's), so CUDA graphs can keep
    their in-place writes; ``rewind()`` goes back to the first position after the prefill."""

    def __init__(self, model: nn.Module, s: Size, batch: int, device, graphs: bool) -> None:
        from rope_compile.demo import decode_inputs

        layer = model.layers[0]
        dtype = model.lm_head.weight.dtype
        g = torch.Generator(device=device).manual_seed(batch)
        shape = (batch * s.cache_len, layer.num_kv_heads, layer.head_dim)
        self.k_caches, self.v_caches = (
            [torch.randn(shape, generator=g, device=device).to(dtype) for _ in model.layers]
            for _ in range(2))
        for cache in (*self.k_caches, *self.v_caches):
            torch._dynamo.mark_static_address(cache)
        self.inputs = [decode_inputs(p, batch, s.cache_len, s.vocab, device)
                       for p in range(s.prefill, s.cache_len)]
        self.steps, self.graphs, self.next = len(self.inputs), graphs, 0

    def rewind(self) -> None:
        self.next = 0

    def step(self, fn: Callable) -> torch.Tensor:
        if self.next >= self.steps:
            raise RuntimeError("decode steps beyond --cache-len; rewind() first")
        inputs = self.inputs[self.next]
        self.next += 1
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*inputs, self.k_caches, self.v_caches)


def make_decoder(name: str, model: nn.Module, s: Size, batch: int, device, graphs: bool):
    cls = PagedDecoder if name == "sglang" else Decoder
    return cls(model, s, batch, device, graphs)


def kernel_role(name: str) -> str:
    """``gemm``, ``gemm-aux`` (split-K reductions), ``attention`` or ``other``."""
    if name.startswith("triton"):
        return "other"
    if _ATTENTION.search(name):
        return "attention"
    if _GEMM_AUX.search(name):
        return "gemm-aux"
    return "gemm" if _GEMM.search(name) else "other"


def prologue_kernels(names: Sequence[str], qkv_gemms: int = 3, layer_gemms: int = 0,
                     layers: int = 0) -> list[int]:
    """Per attention kernel in ``names`` (one step's CUDA kernels in launch order): the
    non-GEMM kernels between the layer's q/k/v projections (the last ``qkv_gemms`` GEMMs
    before it) and it.

    Without an attention kernel (SDPA's math fallback: QK^T and PV are batched GEMMs), given
    ``layers`` layers of ``layer_gemms`` GEMMs each and one more GEMM (the lm head) after them:
    per layer, the non-GEMM kernels between its first projection GEMM and the GEMM after its
    ``qkv_gemms`` projections (QK^T). Empty when neither applies (no attention kernel, and not
    exactly ``layers * layer_gemms + 1`` GEMMs)."""
    roles = [kernel_role(n) for n in names]
    if "attention" not in roles:
        gemms = [i for i, role in enumerate(roles) if role == "gemm"]
        if not (layers and layer_gemms) or len(gemms) != layers * layer_gemms + 1:
            return []
        return [roles[gemms[first] + 1:gemms[first + qkv_gemms]].count("other")
                for first in range(0, layers * layer_gemms, layer_gemms)]
    counts = []
    for i, role in enumerate(roles):
        if role != "attention":
            continue
        gemms = other = 0
        for prev in reversed(roles[:i]):
            if prev == "gemm":
                gemms += 1
                if gemms == qkv_gemms:
                    break
            elif prev != "gemm-aux":
                other += 1
        counts.append(other)
    return counts


def kernel_sequence(step: Callable[[], object]) -> list[tuple[str, float]]:
    """One step's CUDA kernels (name, µs) in launch order (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA
              and not e.name.startswith(("Memcpy", "Memset"))]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in events]


def _compile(model: nn.Module, alt: str, mode: str, device: str) -> Callable:
    kwargs: dict = {"dynamic": False}
    if alt == "rope_compile":
        kwargs["backend"] = common.rope_backend()
        if torch.device(device).type == "cpu":  # torch.compile takes mode or options
            kwargs["options"] = {"devices": ("cpu",)}
    if mode != "default" and "options" not in kwargs:
        kwargs["mode"] = mode
    return torch.compile(model, **kwargs)


def run_case(name: str, s: Size, batch: int, mode: str, device: str, dtype: torch.dtype,
             model: nn.Module, rounds: int, iters: int) -> dict:
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    on_cuda = torch.device(device).type == "cuda"
    row = {"model": LABELS[name], "key": name, "batch": batch, "mode": mode, "error": None}
    qkv_gemms, layer_gemms = GEMM_LAYOUT[name]
    t0 = time.perf_counter()
    torch._dynamo.reset()
    counters["rope_compile"].clear()
    graphs = mode == "reduce-overhead"
    with torch.no_grad():
        ref = make_decoder(name, model, s, batch, device, graphs=False)
        eager = ref.step(model).float()
        del ref
        decoders, fns = {}, {}
        for alt in ALTS:
            decoders[alt] = dec = make_decoder(name, model, s, batch, device, graphs)
            fns[alt] = fn = _compile(model, alt, mode, device)
            _, code = run_and_get_code(lambda dec=dec, fn=fn: dec.step(fn))
            row[f"fused_calls_{alt}"] = count_fused_calls("\n".join(code))
            if alt == "rope_compile":  # the fusions of this compile, before any recompile
                for key, counter in FUSIONS.items():
                    row[key] = int(counters["rope_compile"].get(counter, 0))
                row["graphs_from_cache"] = int(
                    counters["rope_compile"].get("graphs_from_cache", 0))
            dec.step(fn)  # CUDA graphs: warm-up, then recording
            dec.rewind()
            row[f"max_err_{alt}"] = (dec.step(fn).float() - eager).abs().max().item()
        row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
        row["compile_s"] = time.perf_counter() - t0
        if on_cuda:
            for alt in ALTS:
                dec, fn = decoders[alt], fns[alt]
                dec.rewind()
                dec.step(fn)
                seq = kernel_sequence(lambda dec=dec, fn=fn: dec.step(fn))
                row[f"kernels_{alt}"] = len(seq)
                row[f"gpu_ms_{alt}"] = sum(us for _, us in seq) / 1e3
                per_layer = prologue_kernels([n for n, _ in seq], qkv_gemms, layer_gemms,
                                             s.layers)
                row[f"prologue_{alt}"] = per_layer
                row[f"kernel_names_{alt}"] = [n[:80] for n, _ in seq]
        for alt in ALTS:
            row[f"ms_rounds_{alt}"] = []
        if iters + 2 > decoders[ALTS[0]].steps:  # 2 warm-up steps per round
            raise ValueError(f"--iters {iters} needs --cache-len >= {s.prefill + iters + 2}")
        for r in range(rounds):
            for alt in ALTS if r % 2 == 0 else ALTS[::-1]:
                dec, fn = decoders[alt], fns[alt]
                dec.rewind()
                ms, _ = common.time_steps_ms(lambda dec=dec, fn=fn: dec.step(fn), iters, device,
                                             warmup=2)
                row[f"ms_rounds_{alt}"].append(ms)
    for alt in ALTS:
        values = row[f"ms_rounds_{alt}"]
        row[f"ms_{alt}"] = statistics.median(values)
        row[f"ms_spread_{alt}"] = (min(values), max(values))
    row["speedup"] = row["ms_inductor"] / row["ms_rope_compile"]
    row["total_s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    return row


# --------------------------------------------------------------------------------------------
# Reporting


def _per_layer(row: dict, alt: str, layers: int) -> str:
    kernels, prologue = row.get(f"kernels_{alt}"), row.get(f"prologue_{alt}")
    if kernels is None:
        return "-"
    text = f"{kernels} ({kernels / layers:.1f}/layer)"
    if prologue:
        text += f", prologue {statistics.median(prologue):g}"
    return text


def fusions(row: dict) -> str:
    """The fused calls in the generated code and the fusions the passes made."""
    return (f"{row['fused_calls_rope_compile']} (rope {row['rewritten']}, qk-norm "
            f"{row.get('qk_norm_rewritten', 0)}, kv-store {row.get('kv_store_rewritten', 0)})")


def results_table(rows: Sequence[dict], layers: int) -> str:
    headers = ["model", "batch", "mode", "fused calls (rewritten: rope, qk-norm, kv-store)",
               "max abs err, Inductor / ours",
               "kernels/step Inductor", "kernels/step ours", "GPU ms, Inductor / ours",
               "step ms Inductor (spread)", "step ms ours (spread)", "speedup"]
    body = []
    for r in rows:
        head = [r["model"], r["batch"], r["mode"]]
        if r["error"]:
            prefix = "" if r["error"].startswith("skipped") else "error: "
            body.append([*head, prefix + r["error"][:120], *["-"] * 7])
            continue
        gpu = (f"{r['gpu_ms_inductor']:.3f} / {r['gpu_ms_rope_compile']:.3f}"
               if r.get("gpu_ms_inductor") is not None else "-")
        skips = " (cudagraphs skipped!)" if r.get("cudagraph_skips") else ""
        body.append([
            *head[:2], r["mode"] + skips,
            fusions(r),
            f"{r['max_err_inductor']:.3g} / {r['max_err_rope_compile']:.3g}",
            _per_layer(r, "inductor", layers), _per_layer(r, "rope_compile", layers), gpu,
            f"{r['ms_inductor']:.3f} ({r['ms_spread_inductor'][0]:.3f}-"
            f"{r['ms_spread_inductor'][1]:.3f})",
            f"{r['ms_rope_compile']:.3f} ({r['ms_spread_rope_compile'][0]:.3f}-"
            f"{r['ms_spread_rope_compile'][1]:.3f})",
            f"{r['speedup']:.3f}x",
        ])
    return common.markdown_table(headers, body)


LEGEND = (
    "fused calls: fused-op calls and kernel launches in rope_compile's generated code; "
    "rewritten: the passes' counters right after the compile: RoPE pairs fused (rope), and of "
    "those calls, extended over the q/k RMSNorm (qk-norm) and over the KV-cache write "
    "(kv-store). max abs err: the first decode step's logits against eager. kernels/step: "
    "torch.profiler's CUDA kernels in one step (per layer: / layers); prologue: the median over "
    "layers of the non-GEMM kernels between a layer's q/k/v projection GEMM(s) and its "
    "attention kernel (with SDPA's math fallback: its QK^T GEMM). sglang-style: "
    "rope_compile.demo.TinyDecoder (fused qkv GEMM, paged cache, MLP 2 x hidden). GPU "
    "ms: the step's summed kernel durations. step ms: one synchronised step, the median over "
    "interleaved rounds (each the median of its steps) and the min-max of the round medians. "
    "speedup: Inductor / ours."
)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write decode.md and decode.json here")
    p.add_argument("--models", default="sglang,qwen3,llama",
                   help="subset of qwen3,llama,sglang")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8,64; tiny 1,2)")
    p.add_argument("--modes", default="default,reduce-overhead",
                   help="default,reduce-overhead (reduce-overhead needs CUDA)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=20, help="steps per round")
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV-cache rows per sequence (256; tiny 64)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="1 layer, hidden 256 (CPU smoke runs)")
    p.add_argument("--dtype", default=None, choices=sorted(common.DTYPES),
                   help="bf16 (default), fp32 with --tiny")
    p.add_argument("--budget-s", type=float, default=285,
                   help="start no further case once the run would pass this many seconds "
                        "(predicted from the mean case time so far; later cases are reported "
                        "as skipped); 0: no limit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse_args(argv)
    device = args.device or common.default_device()
    size = TINY if args.tiny else Size()
    size = replace(size, **{k: v for k, v in (("layers", args.layers),
                                              ("cache_len", args.cache_len)) if v is not None})
    dtype = common.DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    batches = _ints(args.batches) if args.batches else ([1, 2] if args.tiny else [1, 8, 64])
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in models if m not in LABELS] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown --models/--modes {bad}: models {list(LABELS)}, "
                         f"modes {list(MODES)}")
    if torch.device(device).type != "cuda" and "reduce-overhead" in modes:
        print("reduce-overhead needs CUDA: skipped")
        modes = [m for m in modes if m != "reduce-overhead"]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    meta = common.env_info(device)
    meta.update(size=asdict(size), dtype=str(dtype), batches=batches, modes=modes,
                rounds=args.rounds, iters=args.iters)
    header = (f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, "
              f"{str(dtype).removeprefix('torch.')}; {size.layers} layers, hidden "
              f"{size.hidden}, {size.heads}/{size.kv_heads} heads of {size.head_dim}, "
              f"KV cache {size.cache_len} rows per sequence after a {size.prefill}-token "
              f"prefill; "
              f"{args.rounds} rounds x {args.iters} steps")
    print(header, flush=True)
    t0 = time.perf_counter()
    rows = []
    ran = 0
    for name in models:
        model = build(name, size, device, dtype)
        for batch in batches:
            for mode in modes:
                elapsed = time.perf_counter() - t0
                if args.budget_s and ran and elapsed * (ran + 1) / ran > args.budget_s:
                    rows.append({"model": LABELS[name], "key": name, "batch": batch,
                                 "mode": mode, "error": f"skipped: --budget-s {args.budget_s:g} "
                                 f"(after {elapsed:.0f} s)"})
                    print(f"{LABELS[name]} B={batch} [{mode}]: {rows[-1]['error']}", flush=True)
                    continue
                ran += 1
                try:
                    row = run_case(name, size, batch, mode, device, dtype, model, args.rounds,
                                   args.iters)
                except Exception as err:  # noqa: BLE001 - report and go on
                    traceback.print_exc(limit=-6)
                    row = {"model": LABELS[name], "key": name, "batch": batch, "mode": mode,
                           "error": f"{type(err).__name__}: {err}".replace("\n", " ")[:400]}
                    torch._dynamo.reset()
                rows.append(row)
                print(f"{row['model']} B={batch} [{mode}]: " + (
                    f"ERROR {row['error']}" if row["error"] else
                    f"fused {fusions(row)}, "
                    f"ms {row['ms_inductor']:.3f} / {row['ms_rope_compile']:.3f}, "
                    f"prologue {row.get('prologue_inductor')} / "
                    f"{row.get('prologue_rope_compile')}, {row['total_s']:.1f} s"), flush=True)
        del model
    meta["total_s"] = time.perf_counter() - t0
    text = "\n".join([header, f"total {meta['total_s']:.0f} s", "", LEGEND, "",
                      results_table(rows, size.layers), ""])
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.md").write_text(text)
        (out / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
