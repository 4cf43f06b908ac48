"""Helpers shared by ``bench_op.py`` and ``bench_e2e.py``: inputs, timing, reporting.

Nothing here imports Triton at import time, so a script can still set ``TRITON_INTERPRET=1``
after importing this module (the interpreter is chosen when Triton is first imported).

Timing methods
--------------
* :func:`time_cuda_graph_us` (GPU): our own CUDA-graph timer, not
  ``triton.testing.do_bench_cudagraph``, because we rotate among several input buffers. It
  captures ``n_calls`` calls (call ``i`` uses buffer ``i % len(fns)``) in one graph, replays the
  graph ``replays`` times, times each replay with ``torch.cuda.Event`` and returns the median
  replay time divided by ``n_calls``: GPU time per call with no CPU launch overhead.
* :func:`time_perf_counter_us` (CPU / Triton interpreter): ``time.perf_counter`` around each call.
* :func:`host_time_us`: a loop of calls timed with ``time.perf_counter``, synchronising only at
  the end. For tiny problems this is the CPU cost of one call (launch overhead).
"""

from __future__ import annotations

import importlib
import math
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# The repository root, so that ``rope_compile`` and ``passes`` import from this working tree even
# when the package is not installed (the scripts run as ``python benchmarks/bench_*.py``).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
POS_DTYPES = {"int64": torch.int64, "int32": torch.int32}

# Relative spacing of floating-point numbers: ulp(x) <= EPS * |x|.
_EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def l2_cache_bytes(device: str | torch.device) -> int:
    """The GPU's L2 size (0 on CPU; 50 MiB if torch does not report it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def sets_beyond_l2(set_bytes: int, device: str | torch.device, max_sets: int = 20) -> int:
    """How many input sets of ``set_bytes`` each together make 3x the L2, so that rotating over
    them the L2 cannot serve every call (at least 1, at most ``max_sets``; 1 on the CPU)."""
    return max(1, min(max_sets, -(-3 * l2_cache_bytes(device) // max(1, set_bytes))))


def module_version(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", "?")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def env_info(device: str | torch.device) -> dict:
    """Device name and library versions, for the reports."""
    device = torch.device(device)
    info = {
        "device": device.type,
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": module_version("triton"),
        "flashinfer": module_version("flashinfer"),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["l2_mib"] = round(l2_cache_bytes(device) / 2**20, 1)
    return info


# --------------------------------------------------------------------------------------------
# RoPE inputs
# --------------------------------------------------------------------------------------------


@dataclass
class RopeInputs:
    """q and k as views of one qkv projection output ``[T, (Hq + 2 Hk) * D]`` (as in sglang)."""

    qkv: torch.Tensor  # [T, (Hq + 2 Hk) * D]
    q2d: torch.Tensor  # [T, Hq * D]   strided view
    k2d: torch.Tensor  # [T, Hk * D]   strided view
    q3: torch.Tensor  # [T, Hq, D]
    k3: torch.Tensor  # [T, Hk, D]
    q_rot: torch.Tensor  # [T, Hq, rot]
    k_rot: torch.Tensor  # [T, Hk, rot]
    v: torch.Tensor  # [T, Hk * D]
    positions: torch.Tensor  # [T]

    @property
    def nbytes(self) -> int:
        return (self.qkv.numel() * self.qkv.element_size()
                + self.positions.numel() * self.positions.element_size())


def make_rope_inputs(
    num_tokens: int,
    num_q_heads: int,
    num_k_heads: int,
    head_size: int,
    rotary_dim: int,
    dtype: torch.dtype,
    pos_dtype: torch.dtype,
    device: str | torch.device,
    max_position: int,
    seed: int,
) -> RopeInputs:
    """Random qkv (standard normal) and random positions in ``[0, max_position)``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d = head_size
    width = (num_q_heads + 2 * num_k_heads) * d
    qkv = torch.randn(num_tokens, width, generator=gen, device=device, dtype=torch.float32)
    qkv = qkv.to(dtype)
    q2d, k2d, v = qkv.split([num_q_heads * d, num_k_heads * d, num_k_heads * d], dim=-1)
    q3 = q2d.view(num_tokens, num_q_heads, d)
    k3 = k2d.view(num_tokens, num_k_heads, d)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen, device=device,
                              dtype=pos_dtype)
    return RopeInputs(qkv, q2d, k2d, q3, k3, q3[..., :rotary_dim], k3[..., :rotary_dim], v,
                      positions)


def tolerance(dtype: torch.dtype, ref_max_abs: float, ulps: float) -> float:
    """``ulps`` units in the last place of the largest reference magnitude (at least of 1)."""
    return ulps * _EPS[dtype] * max(1.0, ref_max_abs)


def abs_max(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def max_abs_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    return (got.float() - want.float()).abs().max().item()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_cuda_graph_us(
    fns: Sequence[Callable[[], object]], n_calls: int = 20, replays: int = 10
) -> tuple[float, list[float]]:
    """Median GPU µs per call: ``n_calls`` calls (rotating over ``fns``) captured in one CUDA
    graph, the graph replayed ``replays`` times, each replay timed with CUDA events."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        for i in range(max(3, len(fns))):
            fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA Graph is empty.*")
        with torch.cuda.graph(graph):
            for i in range(n_calls):
                fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / n_calls)
    del graph
    return statistics.median(samples), samples


def time_perf_counter_us(
    fns: Sequence[Callable[[], object]], repeats: int = 10, device: str = "cpu"
) -> tuple[float, list[float]]:
    """Median wall µs per call (each call synchronised), rotating over ``fns``."""
    fns[0]()
    synchronize(device)
    samples = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples), samples


def host_time_us(fn: Callable[[], object], iters: int, device: str, warmup: int = 5) -> float:
    """Wall µs per call of ``iters`` back-to-back calls, synchronising only at the end."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e6 / iters


def measure_copy_bandwidth(
    device: str | torch.device, nbytes: int | None = None, repeats: int = 10
) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    Copies a ``nbytes`` buffer (default 1 GiB on GPU, 64 MiB on CPU) into another, median of
    ``repeats`` timings of 5 back-to-back copies."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 64 * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    per_sample = 5
    samples = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_sample):
                dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(per_sample):
                dst.copy_(src)
            seconds = time.perf_counter() - t0
        samples.append(2 * src.numel() * 4 * per_sample / seconds)
    del src, dst
    return statistics.median(samples[1:])  # the first is a warm-up


def time_steps_ms(
    step: Callable[[], object], steps: int, device: str, warmup: int = 3
) -> tuple[float, list[float]]:
    """Median wall ms of one synchronised ``step()`` (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(steps):
        if torch.device(device).type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def rope_backend():
    """The rope_compile backend: by name when registered (entry point), else the function."""
    import rope_compile.backend as backend_module  # also imports the pass

    try:
        if "rope_compile" in torch._dynamo.list_backends(exclude_tags=()):
            return "rope_compile"
    except Exception:  # noqa: BLE001 - a broken entry point: use the function itself
        pass
    return backend_module.rope_compile_backend


# Kernels that are neither RoPE/norm/cache work nor a copy: GEMMs (a projection) and attention.
GEMM_OR_ATTENTION_KERNEL = re.compile(
    r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|flash|fmha|attention|cudnn|sdpa", re.I)


@dataclass
class KernelProfile:
    """CUDA kernels of one step, averaged over the profiled steps."""

    count: float  # kernels launched per step
    gpu_us: float  # their summed durations per step: GPU busy time, whatever the host does
    per_name: dict[str, float]  # launches per step, by kernel name
    us_per_name: dict[str, float]  # µs per step, by kernel name

    def us_outside_gemm_and_attention(self) -> float:
        """µs per step of the kernels other than GEMMs and attention."""
        return sum(us for name, us in self.us_per_name.items()
                   if not GEMM_OR_ATTENTION_KERNEL.search(name))


def profile_gpu_kernels(step: Callable[[], object], steps: int, device: str
                        ) -> KernelProfile | None:
    """Profile ``steps`` calls of ``step()`` with ``torch.profiler`` and average its CUDA kernel
    events per step (memcpy / memset events are not counted). Kernels replayed from CUDA graphs
    are reported by CUPTI as kernels too. ``None`` on CPU."""
    if torch.device(device).type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    per_name: dict[str, float] = {}
    us_per_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            per_name[e.name] = per_name.get(e.name, 0.0) + 1.0 / steps
            us_per_name[e.name] = us_per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / steps
    return KernelProfile(sum(per_name.values()), sum(us_per_name.values()), per_name,
                         us_per_name)


def quietest_profiles(steps: dict[str, Callable[[], object]], profile_steps: int,
                      device: str, rounds: int = 2) -> dict[str, KernelProfile | None]:
    """Per alternative, of ``rounds`` interleaved profiles the one with the least GPU time
    (``None`` where there is no profile: the CPU).

    One-time work caught by a profile only adds kernels (an H200 run once showed ~870
    launches of an int fill kernel and 10 ms of GPU time in plain Inductor's first profile of
    a 1.6 ms forward), so the least is the forward's own."""
    best: dict[str, KernelProfile | None] = {}
    for r in range(rounds):
        for alt in steps if r % 2 == 0 else list(steps)[::-1]:
            prof = profile_gpu_kernels(steps[alt], profile_steps, device)
            if alt not in best or (prof is not None and prof.gpu_us < best[alt].gpu_us):
                best[alt] = prof
    return best


def _kernel_family(name: str) -> str:
    """A kernel name without Inductor's numbering (``triton_poi_fused_mul_silu_4`` and ``_2``
    are the same kernel in two graphs) or launch arguments."""
    return re.sub(r"_\d+$", "", name.split("(")[0])


def differing_kernels(base: dict[str, float], other: dict[str, float]
                      ) -> tuple[float, float, list[str]]:
    """Kernel families that run in only one of two profiles (``KernelProfile.us_per_name``):
    their summed µs per step in ``base``, in ``other``, and their names. Comparing plain
    Inductor with rope_compile, these are the kernels the rewrite removed and added (the RoPE
    kernels, whatever Inductor named them)."""
    def families(us):
        out: dict[str, float] = {}
        for name, t in us.items():
            out[_kernel_family(name)] = out.get(_kernel_family(name), 0.0) + t
        return out

    a, b = families(base), families(other)
    names = sorted(set(a) ^ set(b))
    return sum(a.get(n, 0.0) for n in names), sum(b.get(n, 0.0) for n in names), names


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell: ``-`` for None, fewer decimals for large values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.{max(0, digits - 1)}f}"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A compact (unpadded) markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
