"""Real model code on the GPU: HF Llama, HF Phi (partial rotary), HF GPT-NeoX (per-head qkv,
partial rotary) and a gpt-fast-style Transformer, random weights, bf16.

    python benchmarks/bench_models.py [--out DIR] [--tokens 512] [--layers 4]

For each: fused RoPE kernels in the generated code (one per layer expected), max abs error of
the logits/output against eager, and plain Inductor vs backend="rope_compile", both in default
mode: the forward time (CUDA events, median over interleaved rounds), the GPU kernel time per
forward (summed kernel durations, torch.profiler: the GPU's share whatever the host does), the
kernels per forward, and which kernels differ. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rope_compile.demo import count_fused_calls  # noqa: E402


def _hf_models(layers: int):
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    common = {"vocab_size": 1024, "hidden_size": 2048, "num_hidden_layers": layers,
              "num_attention_heads": 16, "max_position_embeddings": 4096}
    yield "HF Llama (GQA 16/4, head 128)", LlamaForCausalLM(LlamaConfig(
        **common, intermediate_size=5632, num_key_value_heads=4, head_dim=128,
        attn_implementation="sdpa"))
    yield "HF Phi (rotary 64 of 128)", PhiForCausalLM(PhiConfig(
        **common, intermediate_size=5632, partial_rotary_factor=0.5,
        attn_implementation="sdpa"))
    yield "HF GPT-NeoX (rotary 32 of 128)", GPTNeoXForCausalLM(GPTNeoXConfig(
        **common, intermediate_size=5632, rotary_pct=0.25, attn_implementation="sdpa"))


def _time_ms(fn, args, iters: int = 20) -> float:
    times = []
    for _ in range(3):
        fn(*args)
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _output(result):
    return result.logits if hasattr(result, "logits") else result


def _kernel_diff(plain, fused) -> str:
    """The kernels that run in only one of the two (Inductor's RoPE kernels and ours)."""
    import common

    theirs, ours, names = common.differing_kernels(plain.us_per_name, fused.us_per_name)
    return f"{theirs:.1f} -> {ours:.1f} us: " + ", ".join(n[:48] for n in names)


def run(name, model, args, rounds: int = 5, dump_code: str | None = None) -> dict:
    """Fused-kernel count, error, and plain Inductor vs rope_compile (default mode): ms per
    synchronised forward (median over interleaved rounds), GPU kernel ms per forward (summed
    kernel durations from torch.profiler), kernels per forward and the kernels that differ."""
    import common  # benchmarks/ is sys.path[0] when run as a script
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad():
        eager = _output(model(*args)).float()
        plain = torch.compile(model)
        _, plain_code = run_and_get_code(plain, *args)
        fused = torch.compile(model, backend=common.rope_backend())
        out, code = run_and_get_code(fused, *args)
        if dump_code:
            stem = Path(dump_code) / re.sub(r"\W+", "_", name).strip("_")
            stem.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{stem}.inductor.py").write_text("\n".join(plain_code))
            Path(f"{stem}.rope_compile.py").write_text("\n".join(code))
        fns = {"plain": plain, "fused": fused}
        ms = {k: [] for k in fns}
        for r in range(rounds):
            for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                ms[key].append(_time_ms(fns[key], args))
        prof = {k: common.profile_gpu_kernels(lambda f=f: f(*args), 5, "cuda")
                for k, f in fns.items()}
        row = {
            "model": name,
            "fused kernels": count_fused_calls("\n".join(code)),
            "max |err| vs eager": (_output(out).float() - eager).abs().max().item(),
            "plain Inductor ms": statistics.median(ms["plain"]),
            "rope_compile ms": statistics.median(ms["fused"]),
        }
    row["speedup"] = row["plain Inductor ms"] / row["rope_compile ms"]
    row["GPU kernel ms plain / rope_compile"] = (
        f"{prof['plain'].gpu_us / 1e3:.3f} / {prof['fused'].gpu_us / 1e3:.3f}")
    row["kernels plain / rope_compile"] = f"{prof['plain'].count:.0f} / {prof['fused'].count:.0f}"
    row["kernels that differ"] = _kernel_diff(prof["plain"], prof["fused"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dump-code", default=None,
                        help="write each model's generated code (plain and rope_compile) here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    ids = torch.randint(0, 1024, (1, args.tokens), device="cuda")
    for name, model in _hf_models(args.layers):
        model = model.to(device="cuda", dtype=torch.bfloat16).eval()
        model.config.use_cache = False
        try:
            rows.append(run(name, model, (ids,), dump_code=args.dump_code))
        except Exception as err:  # report and go on with the other models
            print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            import traceback

            traceback.print_exc(limit=-8)
        del model
    from test_gpt_fast import Transformer

    model = Transformer(layers=args.layers, dim=2048, n_head=16, n_kv=4).cuda()
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(1, min(args.tokens, 256), 2048, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(x.shape[1], device="cuda")
    rows.append(run("gpt-fast Transformer (GQA 16/4)", model, (x, pos),
                    dump_code=args.dump_code))
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                         for v in row.values()) + " |")
    table = "\n".join(lines)
    header = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
              f"{args.layers} layers, {args.tokens} tokens (gpt-fast: <= 256)")
    print(header)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "models.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
