"""rope-compile: one fused, in-place Q+K RoPE kernel for torch.compile (XPU and CUDA via Triton).

Public API:

* :func:`fused_qk_rope_with_cos_sin_cache_inplace` and :func:`rotary_embedding`: the in-place ops
  (``torch.ops.rope_compile.*``), drop-ins for sgl_kernel's.
* :func:`fused_qk_rope_with_cos_sin_tables_inplace` (a model's own per-token cos/sin tables) and
  :func:`fused_qk_mrope_with_cos_sin_cache_inplace` (Qwen2-VL's multimodal RoPE).
* :class:`RotaryEmbedding`: sglang's module.
* ``torch.compile(model, backend="rope_compile")``: the backend (``rope_compile.backend``);
  ``backend=rope_compile.backend(**options)`` checks the options at once.
* :func:`explain`: what the passes fuse in a model, and why not the rest (``print`` it).
* :mod:`rope_compile.passes`: the compiler passes (the repository's top-level ``passes/``
  folder, installed under this package by a setuptools ``package-dir`` mapping, so that no
  top-level ``passes`` lands in site-packages).
"""

# The one place the version is written (pyproject.toml reads it from here).
__version__ = "0.1.0"

from . import _checkout  # noqa: F401  (finds rope_compile.passes in a source checkout)
from .module import FUSED_HEAD_SIZES, RotaryEmbedding, apply_rotary_emb
from .ops import (
    FUSED_OP_NAME,
    GENERIC_OP_NAME,
    MROPE_OP_NAME,
    TABLES_OP_NAME,
    fused_qk_mrope_with_cos_sin_cache_inplace,
    fused_qk_rope_with_cos_sin_cache_inplace,
    fused_qk_rope_with_cos_sin_tables_inplace,
    rotary_embedding,
)
from .reference import compute_cos_sin_cache, rope_reference
from .validation import set_check_positions

__all__ = [
    "FUSED_HEAD_SIZES",
    "FUSED_OP_NAME",
    "GENERIC_OP_NAME",
    "MROPE_OP_NAME",
    "RotaryEmbedding",
    "TABLES_OP_NAME",
    "apply_rotary_emb",
    "compute_cos_sin_cache",
    "fused_qk_mrope_with_cos_sin_cache_inplace",
    "fused_qk_rope_with_cos_sin_cache_inplace",
    "fused_qk_rope_with_cos_sin_tables_inplace",
    "rope_reference",
    "rotary_embedding",
    "set_check_positions",
]

# RoPE + KV-cache store and QK-norm + RoPE, one launch each (rope_compile/kernels/rope_kv_store.py),
# and the sglang / vLLM drop-ins built on them (rope_compile/kv_store.py and qk_norm.py).
from .kv_store import FusedSetKVBufferArg, apply_rope_with_cos_sin_cache_inplace  # noqa: E402
from .ops import (  # noqa: E402
    KV_STORE_OP_NAME,
    KV_STORE_TABLES_OP_NAME,
    NORM_ROPE_KV_OP_NAME,
    NORM_ROPE_KV_TABLES_OP_NAME,
    NORM_ROPE_OP_NAME,
    NORM_ROPE_TABLES_OP_NAME,
    fused_qk_norm_rope_inplace,
    fused_qk_norm_rope_kv_store_inplace,
    fused_qk_norm_rope_kv_store_tables_inplace,
    fused_qk_norm_rope_tables_inplace,
    fused_qk_rope_kv_store_inplace,
    fused_qk_rope_kv_store_tables_inplace,
)
from .qk_norm import fused_qk_norm_rope  # noqa: E402

__all__ += [
    "KV_STORE_OP_NAME",
    "NORM_ROPE_KV_OP_NAME",
    "NORM_ROPE_OP_NAME",
    "FusedSetKVBufferArg",
    "apply_rope_with_cos_sin_cache_inplace",
    "fused_qk_norm_rope",
    "fused_qk_norm_rope_inplace",
    "fused_qk_norm_rope_kv_store_inplace",
    "fused_qk_rope_kv_store_inplace",
    # ... with a model's own cos/sin tables (row t % R), as the tables op reads them
    "KV_STORE_TABLES_OP_NAME",
    "NORM_ROPE_KV_TABLES_OP_NAME",
    "NORM_ROPE_TABLES_OP_NAME",
    "fused_qk_norm_rope_kv_store_tables_inplace",
    "fused_qk_norm_rope_tables_inplace",
    "fused_qk_rope_kv_store_tables_inplace",
]

# Q+K RoPE from the angles of a model's cos/sin tables (HF's fp32 freqs): cos/sin computed in
# the kernel as the model's chain computes its table, which is then never built.
from .ops import ANGLES_OP_NAME, fused_qk_rope_with_angles_inplace  # noqa: E402

__all__ += ["ANGLES_OP_NAME", "fused_qk_rope_with_angles_inplace"]


def __getattr__(name: str):
    """``rope_compile.backend`` (the backend module, callable as its factory) and
    ``rope_compile.explain``: they load Inductor and the passes, so on first use only."""
    import importlib

    if name == "backend":
        return importlib.import_module(".backend", __name__)
    if name == "explain":
        return importlib.import_module(".explain_report", __name__).explain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
