"""Host-time breakdown of one fused RoPE call (diagnostic): raw Triton launch, launcher,
validation, registered op, public function (eager fast path on and off), flashinfer's call if
importable, and a compiled 4-layer step with and without the rewrite (interleaved rounds,
median).

    python benchmarks/host_breakdown.py
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rope_compile.ops as ops  # noqa: E402
from rope_compile import fast_launch  # noqa: E402
from rope_compile.demo import TinyLlama  # noqa: E402
from rope_compile.kernels import rope_cache as tk  # noqa: E402
from rope_compile.reference import compute_cos_sin_cache  # noqa: E402


@contextmanager
def fast_launch_off():
    fast_launch.set_fast_launch(False)
    try:
        yield
    finally:
        fast_launch.set_fast_launch(True)


def per_call_us(fn, iters=2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    T, hq, hk, d = 1, 32, 8, 128
    qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], -1)
    q, k = q.view(T, hq, d), k.view(T, hk, d)
    cache = compute_cos_sin_cache(d, 4096).cuda()
    pos = torch.randint(0, 4096, (T,), device="cuda")
    args = (q, k, cache, pos, d, True)
    plan = tk.plan_launch(q, k, cache, pos, d, True)

    def raw():
        tk.fused_qk_rope_kernel[plan.grid](q, k, cache, pos, *plan.ints, **plan.constexprs,
                                           **plan.options)

    rows = {
        "raw kernel[grid](...)": raw,
        "launch_fused_qk_rope": lambda: tk.launch_fused_qk_rope(*args),
        "validation only": lambda: ops.validate_fused(q, k, cache, pos, d),
        "torch.ops op": lambda: torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(
            *args),
        "public function (fast path)": lambda: ops.fused_qk_rope_with_cos_sin_cache_inplace(
            *args),
        "public function, fast path off": lambda: ops.fused_qk_rope_with_cos_sin_cache_inplace(
            *args),
        "empty torch op (aten.add_ of 1 elem)": lambda: pos[:1].add_(0),
    }
    try:
        from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace as fi

        q2d, k2d = q.view(T, hq * d), k.view(T, hk * d)
        rows["flashinfer apply_rope_with_cos_sin_cache_inplace"] = lambda: fi(
            pos, q2d, k2d, d, cache, True)
    except Exception as err:  # noqa: BLE001 - not installed or not built
        print(f"flashinfer: n/a ({type(err).__name__})")
    # Interleaved rounds: the host's drift falls on every row alike.
    times = {name: [] for name in rows}
    for _ in range(5):
        for name, fn in rows.items():
            # The switch is outside the timed loop, so that row times only the call.
            with fast_launch_off() if name == "public function, fast path off" else nullcontext():
                times[name].append(per_call_us(fn))
    for name, got in times.items():
        print(f"{name:<50} {statistics.median(got):8.1f} us/call "
              f"(rounds {min(got):.1f}-{max(got):.1f})")

    model = TinyLlama(layers=4, dtype=torch.bfloat16).cuda().to(torch.bfloat16).eval()
    inputs = (torch.randint(0, 4096, (16,), device="cuda"),
              torch.randn(16, 512, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        steps = {"compiled step, plain inductor": torch.compile(model),
                 "compiled step, rope_compile": torch.compile(model, backend="rope_compile")}
        times = {name: [] for name in steps}
        for _ in range(5):
            for name, fn in steps.items():
                times[name].append(per_call_us(lambda fn=fn: fn(*inputs), 300))
        for name, got in times.items():
            print(f"{name:<50} {statistics.median(got):8.1f} us/step "
                  f"(rounds {min(got):.1f}-{max(got):.1f})")


if __name__ == "__main__":
    main()
