"""Compile every launch configuration of the XPU lane's list for NVIDIA GPUs, without a GPU.

    python -m tools.cuda_compile_check [--arch 90] [--only NAME]

The XPU lane (``tools/xpu_lane``) lists every launch configuration the planners emit; the same
kernels, signatures and constexprs are compiled here by the installed Triton for a CUDA target
(``GPUTarget("cuda", ARCH, 32)``: TTIR, TTGIR, LLVM IR, PTX, and a cubin by the ``ptxas`` that
Triton's wheel carries), with CUDA's launch options (``device_launch_options("cuda", ...)``
through the planners' own choice of warps). What this proves: each kernel source compiles for
sm_ARCH under this Triton (a frontend error, a type error in a mask, an unsupported op would
fail here before a GPU host sees it). What it does not: that the code runs or is right on a
GPU, or that another Triton version (the GPU host's) compiles it.
Exit status 1 if any configuration fails to compile; the last line is ``N compiled, M failed``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", default="")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tools.xpu_lane import worker
    from tools.xpu_lane.configs import configs

    start = time.perf_counter()
    kernels = worker._load_kernels()
    done, failed, seen = 0, [], set()
    for config in configs():
        if args.only not in config.name:
            continue
        job = config.to_json()
        key = (job["kernel"], repr(sorted(job["signature"].items())),
               repr(sorted(job["constexprs"].items())), job["options"]["num_warps"])
        if key in seen:
            continue
        seen.add(key)
        fn = getattr(kernels, job["kernel"])
        constexprs = {k: worker._constexpr_value(v) for k, v in job["constexprs"].items()}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
        try:
            compiled = triton.compile(
                ASTSource(fn, job["signature"], constexprs, attrs),
                target=GPUTarget("cuda", args.arch, 32),
                options={"num_warps": job["options"]["num_warps"]})
            assert compiled.asm.get("cubin"), "no cubin"
            done += 1
        except Exception as err:  # report every failure, not only the first
            failed.append(config.name)
            print(f"FAILED {config.name}: {type(err).__name__}: {err}".splitlines()[0])
            traceback.print_exc(limit=1)
    print(f"cuda sm_{args.arch}, triton {triton.__version__}: {done + len(failed)} distinct "
          f"configurations in {time.perf_counter() - start:.0f} s")
    print(f"{done} compiled, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
