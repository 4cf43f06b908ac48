"""Leak checks: many calls of the eager op and of a compiled RoPE model keep memory flat.

* ``test_eager_op_no_object_growth``: 100k calls of
  ``rope_compile.fused_qk_rope_with_cos_sin_cache_inplace`` on tiny CPU tensors (about 0.12 ms
  a call on a 2-core CI machine, so about 12 s). The count is calibrated: if 1000 timed calls
  say 100k would take longer than ``EAGER_BUDGET_S``, fewer are made (never under 20k). The
  number of live Python objects (``gc.get_objects()``) after the loop may exceed the number
  before by at most ``OBJECT_TOLERANCE``.
* ``test_eager_op_no_traced_memory_growth``: the same under ``tracemalloc`` (about 0.3 ms a
  call, so a shorter loop, 20k calls by default, calibrated the same way): the current traced
  memory may grow by at most ``TRACED_TOLERANCE`` bytes (a leak of 4 bytes a call would show).
  The generic op (``rotary_embedding``) is checked the same way with a quarter of the calls.
* ``test_compiled_model_no_growth``: 1000 steps of a tiny ``RotaryEmbedding.forward_native``
  compiled with ``backend="rope_compile"`` (the fused op on CPU), both measures.
* ``test_gpu_op_no_memory_growth`` (``@pytest.mark.gpu``, skipped without CUDA / XPU): 100k calls
  on the device; ``memory_allocated`` must not move.

Counts and per-call times are printed after the pytest summary ("rope fuzz figures").
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import fuzz_programs as fp
import pytest
import torch

import rope_compile

EAGER_CALLS = 100_000
EAGER_BUDGET_S = 20.0
TRACED_CALLS = 20_000
TRACED_BUDGET_S = 8.0
MIN_CALLS = 20_000
COMPILED_STEPS = 1000
OBJECT_TOLERANCE = 50  # live objects
TRACED_TOLERANCE = 64 * 1024  # bytes


@pytest.fixture(scope="module", autouse=True)
def _report_stats(request):
    fp.report_stats_at_exit(request.config)


def _tiny_problem(device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = (torch.rand(2, 2, 16, generator=g) * 2 - 1).to(device)
    k = (torch.rand(2, 1, 16, generator=g) * 2 - 1).to(device)
    cache = rope_compile.compute_cos_sin_cache(8, 32).to(device)  # [32, 8]
    positions = torch.tensor([3, 17]).to(device)
    return q, k, cache, positions


def _fused_call(q, k, cache, positions):
    rot = cache.shape[1]
    fused = rope_compile.fused_qk_rope_with_cos_sin_cache_inplace

    def call():
        fused(q[..., :rot], k[..., :rot], cache, positions, rot, True)

    return call


def _generic_call(q, k, cache, positions):
    generic = rope_compile.rotary_embedding
    head_size = q.shape[-1]

    def call():
        generic(positions, q, k, head_size, cache, False)

    return call


def _calibrated(call, wanted: int, budget_s: float) -> tuple[int, float]:
    """(calls to make, seconds per call): ``wanted`` unless 1000 timed calls say it would take
    longer than ``budget_s``; never fewer than ``min(wanted, MIN_CALLS // 4)``."""
    for _ in range(200):  # warm up (dispatcher caches, lazy imports)
        call()
    start = time.perf_counter()
    for _ in range(1000):
        call()
    per_call = (time.perf_counter() - start) / 1000
    return max(min(wanted, MIN_CALLS // 4), min(wanted, int(budget_s / per_call))), per_call


def _live_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def _run(call, n: int) -> None:
    for _ in range(n):
        call()


def _check_objects(call, n: int, what: str) -> int:
    before = _live_objects()
    _run(call, n)
    growth = _live_objects() - before
    assert growth <= OBJECT_TOLERANCE, f"{what}: {growth} more live objects after {n} calls"
    return growth


def _check_traced(call, n: int, what: str) -> int:
    tracemalloc.start()
    try:
        _run(call, 500)  # first traced calls allocate lazily created state
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        _run(call, n)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth <= TRACED_TOLERANCE, f"{what}: traced memory grew {growth} B in {n} calls"
    return growth


def test_eager_op_no_object_growth():
    q, k, cache, positions = _tiny_problem()
    call = _fused_call(q, k, cache, positions)
    n, per_call = _calibrated(call, EAGER_CALLS, EAGER_BUDGET_S)
    assert n >= MIN_CALLS, f"the op takes {per_call * 1e6:.0f} us a call: too slow for the check"
    growth = _check_objects(call, n, "fused op")
    fp.record("memory.eager_fused_op", calls=n, per_call_us=round(per_call * 1e6),
              object_growth=growth)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()


def test_eager_op_no_traced_memory_growth():
    q, k, cache, positions = _tiny_problem()
    for name, make, wanted in (("fused", _fused_call, TRACED_CALLS),
                               ("generic", _generic_call, TRACED_CALLS // 4)):
        call = make(q, k, cache, positions)
        n, per_call = _calibrated(call, wanted, TRACED_BUDGET_S * wanted / TRACED_CALLS)
        growth = _check_traced(call, n, f"{name} op")
        fp.record(f"memory.traced_{name}_op", calls=n, per_call_us=round(per_call * 1e6),
                  traced_growth_bytes=growth)


def test_compiled_model_no_growth():
    from torch._dynamo.utils import counters

    from rope_compile.module import RotaryEmbedding

    rope = RotaryEmbedding(128, 64, 64, 10000.0, True, torch.float32)

    def step(positions, q, k):
        return rope.forward_native(positions, q, k)

    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([1, 5, 9])
    q = torch.rand(3, 2 * 128, generator=g) * 2 - 1
    k = torch.rand(3, 128, generator=g) * 2 - 1
    eager = step(positions, q, k)

    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = torch.compile(step, backend="rope_compile", options={"devices": ("cpu",)})
            out = compiled(positions, q, k)
        assert counters["rope_compile"]["rewritten"] == 1, dict(counters["rope_compile"])
        for o, e in zip(out, eager, strict=True):
            torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
        del out

        def call():
            compiled(positions, q, k)

        n, per_call = _calibrated(call, COMPILED_STEPS, 10.0)
        objects = _check_objects(call, n, "compiled model")
        traced = _check_traced(call, n, "compiled model")
        fp.record("memory.compiled_model", steps=n, per_step_us=round(per_call * 1e6),
                  object_growth=objects, traced_growth_bytes=traced)
    finally:
        torch._dynamo.reset()
        counters.clear()


@pytest.mark.gpu
def test_gpu_op_no_memory_growth(gpu_device):
    backend = getattr(torch, gpu_device)
    q, k, cache, positions = _tiny_problem(gpu_device)
    call = _fused_call(q, k, cache, positions)
    _run(call, 1000)
    backend.synchronize()
    before = backend.memory_allocated()
    objects_before = _live_objects()
    _run(call, EAGER_CALLS)
    backend.synchronize()
    # Not above: an earlier test's tensors (same xdist worker) may be collected meanwhile.
    assert backend.memory_allocated() <= before, "device memory grew"
    assert _live_objects() - objects_before <= OBJECT_TOLERANCE
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
