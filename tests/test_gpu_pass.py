"""The backend on CUDA (run on the device; skipped without a GPU): the rewrite fires with the
default options, the generated code calls the fused op once per layer with no copy of the
projection, and results match eager and plain Inductor."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from rope_compile.demo import FUSED_CALL, TinyLlama, count_fused_calls

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(layers: int, dtype: torch.dtype) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(layers=layers, dtype=dtype).to(device="cuda", dtype=dtype).eval()


def _inputs(tokens: int, dtype: torch.dtype):
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    return positions, torch.randn(tokens, 512, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_backend_rewrites_each_layer_on_cuda(dtype):
    torch._dynamo.reset()
    counters.clear()
    layers = 3
    model = _model(layers, dtype)
    args = _inputs(37, dtype)
    with torch.no_grad():
        eager = model(*args)
        plain = torch.compile(model)(*args)
        fused, code = run_and_get_code(torch.compile(model, backend="rope_compile"), *args)
    source = "\n".join(code)
    assert count_fused_calls(source) == layers
    # Inductor launches the Triton kernel itself: no op call through the dispatcher.
    assert FUSED_CALL not in source
    assert counters["rope_compile"]["rewritten"] == layers
    # No copy of the qkv projection was added for the in-place op.
    assert "as_strided_clone" not in source and "clone_preserve" not in source
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused, eager, atol=tol, rtol=tol)
    torch.testing.assert_close(fused, plain, atol=tol, rtol=tol)


def test_dynamic_tokens_no_recompile_on_cuda():
    torch._dynamo.reset()
    counters.clear()
    model = _model(2, torch.bfloat16)
    compiled = torch.compile(model, backend="rope_compile", dynamic=True)
    with torch.no_grad():
        compiled(*_inputs(64, torch.bfloat16))
        assert counters["rope_compile"]["rewritten"] == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            for tokens in (7, 64, 300):
                args = _inputs(tokens, torch.bfloat16)
                torch.testing.assert_close(compiled(*args), model(*args), atol=3e-2, rtol=3e-2)


def test_reduce_overhead_mode_on_cuda():
    torch._dynamo.reset()
    counters.clear()
    model = _model(2, torch.bfloat16)
    compiled = torch.compile(model, backend="rope_compile", mode="reduce-overhead")
    args = _inputs(16, torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            out = compiled(*args)
        torch.testing.assert_close(out, model(*args), atol=3e-2, rtol=3e-2)
    assert counters["rope_compile"]["rewritten"] == 2
