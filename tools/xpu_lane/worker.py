"""The XPU lane's worker, run by the lane's own venv (triton-xpu 3.3, pyopencl, Intel's OpenCL
CPU runtime, spirv-dis; no torch): ``python worker.py JOBS.pkl RESULTS.pkl``.

For each configuration (see ``configs.py``): compile the kernel with Intel's Triton backend
for a GPU target to SPIR-V, at the planned sub-group size and at the other one; read the
capabilities with ``spirv-dis`` (``OpCapability Float64`` fails the gate); compile the SPIR-V
to PVC and DG2 machine code with ``ocloc`` (and read its spill report); run it on the OpenCL
CPU device and hand the output storages back. Float arguments are also compiled as fp64 (what
Inductor passes on devices with fp64) for one configuration per family, whose run must give
the same bits.

The kernels are taken from rope_compile's source files (their ``@triton.jit`` functions only),
so that the package, which imports torch, is not imported here.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILES = ("rope_compile/kernels/fp32_rounding.py", "rope_compile/kernels/rope_cache.py",
                "rope_compile/kernels/rope_tables.py", "rope_compile/kernels/rope_kv_store.py")
# The properties torch.xpu.get_device_capability() reports, as Triton reads them; the
# sub-group sizes are the GPUs' (8 is also possible on DG2, Triton uses 16 or 32).
TARGET_PROPS = {"sub_group_sizes": [16, 32], "has_subgroup_2d_block_io": False,
                "has_subgroup_matrix_multiply_accumulate": False,
                "has_bfloat16_conversions": True, "architecture": 0,
                "max_work_group_size": 1024, "max_num_sub_groups": 64}
NATIVE = {"pvc": "pvc", "dg2": "acm-g10"}  # Data Center GPU Max; Arc A770 (DG2-G10)
SPILL = re.compile(r"spilled around (\d+)")

_kernels = None


def _load_kernels():
    """The ``@triton.jit`` functions of rope_compile's kernel files, in one module written to
    a temporary file (Triton reads a kernel's source through inspect)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton  # noqa: F401

    parts = ["import triton", "import triton.language as tl", ""]
    for rel in KERNEL_FILES:
        source = (ROOT / rel).read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d) == "triton.jit" for d in node.decorator_list):
                parts += ["@triton.jit", ast.get_source_segment(source, node), ""]
    path = Path(tempfile.mkdtemp(prefix="xpu_lane_")) / "rope_compile_kernels.py"
    path.write_text("\n".join(parts))
    spec = importlib.util.spec_from_file_location("rope_compile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rope_compile_kernels"] = module
    spec.loader.exec_module(module)
    _kernels = module
    return module


def _stub_arch_parser():
    """The 3.3 backend's constructor builds a C++ helper (it needs the SYCL SDK) only to name
    a numeric architecture; no name is needed to compile SPIR-V."""
    import triton.backends

    init = triton.backends.backends["intel"].compiler.__init__
    init.__globals__["compile_module_from_src"] = lambda src, name: types.SimpleNamespace(
        parse_device_arch=lambda arch: "")


def _constexpr_value(v):
    import triton.language as tl

    if isinstance(v, dict) and "dtype" in v:
        return getattr(tl, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(
            v["dtype"], v["dtype"]))
    return v


def compile_spirv(job: dict, threads_per_warp: int, float_type: str = "fp32"):
    """SPIR-V bytes and metadata of one configuration."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_load_kernels(), job["kernel"])
    signature = {k: (float_type if k in job["floats"] else v)
                 for k, v in job["signature"].items()}
    constexprs = {k: _constexpr_value(v) for k, v in job["constexprs"].items()}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
    src = ASTSource(fn, signature, constexprs, attrs)
    options = {"num_warps": job["options"]["num_warps"], "threads_per_warp": threads_per_warp}
    kernel = triton.compile(src, target=GPUTarget("xpu", TARGET_PROPS, 32), options=options)
    return kernel.asm["spv"], kernel.metadata


def capabilities(spirv: bytes, workdir: Path) -> list[str]:
    path = workdir / "k.spv"
    path.write_bytes(spirv)
    text = subprocess.run(["spirv-dis", str(path)], check=True, capture_output=True,
                          text=True).stdout
    return re.findall(r"OpCapability (\w+)", text)


def native(spirv: bytes, device: str, workdir: Path) -> dict:
    """``ocloc`` on the SPIR-V for one GPU: ok, spilled bytes, the log's error lines."""
    path = workdir / f"{device}.spv"
    path.write_bytes(spirv)
    proc = subprocess.run(["ocloc", "compile", "-file", str(path), "-spirv_input", "-device",
                           NATIVE[device], "-out_dir", str(workdir / device), "-q"],
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    spills = [int(s) for s in SPILL.findall(log)]
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    return {"ok": proc.returncode == 0, "spill": max(spills, default=0),
            "log": "\n".join(errors)[:2000]}


def compile_job(job: dict) -> dict:
    """One configuration: SPIR-V at both sub-group sizes, the gate, ocloc, the run."""
    _stub_arch_parser()
    out = {"name": job["name"], "error": None}
    warnings.filterwarnings("ignore", message="Non-empty compiler output")
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            tpw = job["options"]["threads_per_warp"]
            spirv, meta = compile_spirv(job, tpw)
            out["spirv"] = spirv
            out["meta"] = {"shared": meta.shared, "threads_per_warp": meta.threads_per_warp,
                           "num_warps": meta.num_warps, "name": meta.name}
            out["capabilities"] = capabilities(spirv, workdir)
            other = 16 if tpw == 32 else 32
            out["other_sub_group"] = other
            out["other_capabilities"] = capabilities(compile_spirv(job, other)[0], workdir)
            out["native"] = {dev: native(spirv, dev, workdir) for dev in NATIVE}
            spirv_fp64 = None
            if job.get("fp64_check") and job["floats"]:
                spirv_fp64 = compile_spirv(job, tpw, "fp64")[0]
    except Exception as e:  # reported per configuration; the lane fails on it
        out["error"] = f"{type(e).__name__}: {e}"[:3000]
        return out
    out["compile_s"] = time.perf_counter() - start
    if job.get("run"):
        try:
            ctx = _cl_context()[0]
            out["outputs"] = run_job(job, spirv, out["meta"], ctx)
            if spirv_fp64 is not None:
                out["outputs_fp64"] = run_job(job, spirv_fp64, out["meta"], ctx, "fp64")
        except Exception as e:
            out["run_error"] = f"{type(e).__name__}: {e}"[:3000]
    out.pop("spirv")
    out["total_s"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------------------------
# Running on the OpenCL CPU device.

_DROP_CAPABILITIES = {5892}  # KernelAttributesINTEL: the CPU runtime refuses it
_DROP_EXECUTION_MODES = {5893}  # MaxWorkgroupSizeINTEL


def strip_for_cpu(spirv: bytes) -> bytes:
    """The SPIR-V without the Intel GPU kernel attributes the CPU runtime does not take."""
    words = list(struct.unpack(f"<{len(spirv) // 4}I", spirv))
    out, i = words[:5], 5
    while i < len(words):
        count, opcode = words[i] >> 16, words[i] & 0xFFFF
        inst = words[i:i + count]
        drop = ((opcode == 17 and inst[1] in _DROP_CAPABILITIES)  # OpCapability
                or (opcode == 16 and inst[2] in _DROP_EXECUTION_MODES))  # OpExecutionMode
        if opcode == 10:  # OpExtension
            name = struct.pack(f"<{count - 1}I", *inst[1:]).split(b"\0")[0]
            drop = name == b"SPV_INTEL_kernel_attributes"
        if not drop:
            out += inst
        i += count
    return struct.pack(f"<{len(out)}I", *out)


_context = None


def _cl_context():
    """This process's OpenCL context on the CPU device (one per worker process)."""
    global _context
    if _context is None:
        import pyopencl as cl

        device = cl.get_platforms()[0].get_devices()[0]
        _context = (cl.Context([device]), device)
    return _context


def run_job(job: dict, spirv: bytes, meta: dict, ctx, float_type="fp32") -> dict:
    """Run one configuration on its problem; the storages after the run, by index."""
    import numpy as np
    import pyopencl as cl

    run = job["run"]
    storages = [np.frombuffer(bytearray(s), dtype=np.uint8) for s in run["storages"]]
    queue = cl.CommandQueue(ctx)
    program = cl.Program(ctx, strip_for_cpu(spirv)).build()
    kernel = getattr(program, meta["name"])
    scalar = {"i32": np.int32, "i64": np.int64, "i1": np.int8, "fp32": np.float32,
              "fp64": np.float64}
    index = 0
    for name, ty in job["signature"].items():
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            storage, offset = run["pointers"][name]
            kernel.set_arg(index, cl.SVM(storages[storage][offset:]))
        else:
            ty = float_type if name in job["floats"] else ty
            kernel.set_arg(index, scalar[ty](run["scalars"][name]))
        index += 1
    if meta["shared"]:
        kernel.set_arg(index, cl.LocalMemory(meta["shared"]))
    lanes = meta["num_warps"] * meta["threads_per_warp"]
    grid_x, grid_y = run["grid"]
    cl.enqueue_nd_range_kernel(queue, kernel, (grid_x * lanes, grid_y, 1), (lanes, 1, 1))
    queue.finish()
    wanted = {o["storage"] for o in run["outputs"].values()}
    return {i: storages[i].tobytes() for i in wanted}


def main(jobs_path: str, results_path: str) -> None:
    with open(jobs_path, "rb") as f:
        jobs = pickle.load(f)
    workers = int(os.environ.get("XPU_LANE_JOBS", os.cpu_count() or 1))
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(compile_job, jobs))
    print(f"xpu lane: compiled and ran {len(jobs)} configurations in "
          f"{time.perf_counter() - start:.0f} s ({workers} processes; runs on "
          f"{_cl_context()[1].name.strip()}, OpenCL CPU)", flush=True)
    with open(results_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
