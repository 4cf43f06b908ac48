"""The backend on CUDA (run on the device; skipped without a GPU): the rewrite fires with the
default options, the generated code calls the fused op once per layer with no copy of the
projection, and results match eager and plain Inductor."""

from __future__ import annotations

import re

import pytest
import torch
from pass_helpers import FORCE_REWRITE
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from rope_compile.demo import FUSED_OP_CALL, TinyLlama, count_fused_calls

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


# TinyLlama's 3-D GQA SDPA runs as the math fallback in bf16: its q/k upcasts to float32 are
# then the rotated q and k's only readers, and the layout-copy rule leaves the pair to Inductor
# by default (test_layout_copy_rule_skips_tinyllama_bf16_on_cuda). The tests below check the
# rewrite's GPU lowering, so they force it (FORCE_REWRITE).


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
        fused, code = run_and_get_code(
            torch.compile(model, backend="rope_compile", options=FORCE_REWRITE), *args)
    source = "\n".join(code)
    assert count_fused_calls(source) == layers
    # Inductor launches the Triton kernel itself: no op call through the dispatcher.
    assert not FUSED_OP_CALL.search(source)
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
    compiled = torch.compile(model, backend="rope_compile", dynamic=True, options=FORCE_REWRITE)
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
    # mode="reduce-overhead" is Inductor's triton.cudagraphs (torch.compile takes mode or
    # options, not both).
    compiled = torch.compile(model, backend="rope_compile",
                             options={**FORCE_REWRITE, "triton.cudagraphs": True})
    args = _inputs(16, torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            out = compiled(*args)
        torch.testing.assert_close(out, model(*args), atol=3e-2, rtol=3e-2)
    assert counters["rope_compile"]["rewritten"] == 2


def test_layout_copy_rule_skips_tinyllama_bf16_on_cuda():
    """By default the bf16 pair is left to Inductor, counted, and the result is plain
    Inductor's."""
    torch._dynamo.reset()
    counters.clear()
    model = _model(2, torch.bfloat16)
    args = _inputs(37, torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(model, backend="rope_compile")(*args)
        torch.testing.assert_close(out, model(*args), atol=3e-2, rtol=3e-2)
    found = dict(counters["rope_compile"])
    assert not found.get("rewritten"), found
    assert [k for k in found if "only read by layout copies" in k], found


def _fused_launch_args(source: str) -> list[list[str]]:
    """The top-level arguments of each launch of the fused kernel in generated code."""
    launches = []
    for match in re.finditer(r"fused_qk_rope(?:_tables)?_kernel_\d+\.run\(", source):
        depth, start, args = 0, match.end(), []
        for i in range(match.end(), len(source)):
            ch = source[i]
            if ch in "([":
                depth += 1
            elif ch in ")]" and depth:
                depth -= 1
            elif ch == ")":
                args.append(source[start:i].strip())
                break
            elif ch == "," and depth == 0:
                args.append(source[start:i].strip())
                start = i + 1
        launches.append(args)
    return launches


def test_hf_tables_are_read_in_place_on_cuda():
    """HF Llama's cos/sin tables: the pass builds no cos_sin_cache and no positions; every
    layer's launch of the tables kernel reads the model's own cos and sin buffers (the same two
    for all layers, as views), and nothing but the model's table kernel computes them."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    counters.clear()
    layers = 3
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=256, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(device="cuda").eval()
    ids = torch.randint(0, 96, (2, 40), device="cuda")
    with torch.no_grad():
        eager = model(ids).logits
        fused, code = run_and_get_code(torch.compile(model, backend="rope_compile"), ids)
    source = "\n".join(code)
    launches = _fused_launch_args(source)
    assert len(launches) == layers
    assert all("fused_qk_rope_tables_kernel" in source for _ in launches)
    cos_args = {args[2] for args in launches}
    sin_args = {args[3] for args in launches}
    assert len(cos_args) == 1 and len(sin_args) == 1, launches
    assert counters["rope_compile"]["tables built"] == 0
    # No arange positions and no [T, rot] cache were added: no more kernel launches than
    # plain Inductor's code for the same model.
    torch._dynamo.reset()
    with torch.no_grad():
        _, plain_code = run_and_get_code(torch.compile(model), ids)
    plain_launches = len(re.findall(r"\.run\(", "\n".join(plain_code)))
    assert len(re.findall(r"\.run\(", source)) <= plain_launches
    torch.testing.assert_close(fused.logits, eager, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "olmo2"])
def test_hf_static_cache_decode_prologue_on_cuda(name):
    """HF StaticCache decode on CUDA with the default options: each layer's RoPE, its KV-cache
    write and (Qwen3, Gemma3: per head; OLMo2: whole projection) its q/k norm in one call,
    logits and caches equal to eager."""
    from test_pass_kv_store import hf_decode

    expected, got, eager_cache, cache, code, counts = hf_decode(name, device="cuda")
    fused = {"rewritten": 2, "kv_store rewritten": 2}
    if name != "llama":
        fused["qk_norm rewritten"] = 2
    assert {k: counts.get(k) for k in fused} == fused, counts
    assert not {k for k in counts if "error" in k or "skipped" in k or "missed" in k}, counts
    assert "index_copy" not in code and "index_put" not in code
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(cache.layers, eager_cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)
