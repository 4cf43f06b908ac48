"""Where the host time of a compiled step goes (cProfile), plain Inductor vs rope_compile.

    python benchmarks/profile_host.py [--tokens 16] [--layers 4]

Prints the per-step host time of both and the top functions by cumulative time for
rope_compile. A diagnostic, not a benchmark table.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rope_compile.demo import TinyLlama  # noqa: E402


def step_us(fn, args, iters: int) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    model = TinyLlama(layers=args.layers, dtype=torch.bfloat16).cuda().to(torch.bfloat16).eval()
    inputs = (torch.randint(0, 4096, (args.tokens,), device="cuda"),
              torch.randn(args.tokens, 512, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        plain = torch.compile(model)
        fused = torch.compile(model, backend="rope_compile")
        print(f"plain inductor: {step_us(plain, inputs, args.iters):.1f} us/step")
        print(f"rope_compile:   {step_us(fused, inputs, args.iters):.1f} us/step")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            fused(*inputs)
        torch.cuda.synchronize()
        prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
