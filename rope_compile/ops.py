"""torch.library registration of every rope_compile op (eleven), by family, and their public
wrappers. Each family has one Triton kernel file in ``rope_compile/kernels/``:

* RoPE from a ``cos_sin_cache`` (``kernels/rope_cache.py``):
  ``fused_qk_rope_with_cos_sin_cache_inplace(q, k, cos_sin_cache, positions, rotary_dim,
  is_neox)``, q ``[T, Hq, rotary_dim]`` and k ``[T, Hk, rotary_dim]`` (usually strided views),
  the op the pair pass emits; and ``rotary_embedding(positions, query, key, head_size,
  cos_sin_cache, is_neox)``, the generic fallback (query/key ``[T, H * head_size]`` or
  ``[..., H, head_size]``, any head size).
* RoPE + KV-cache store, QK-norm + RoPE, and QK-norm + RoPE + KV store, each from a cache or
  from a model's tables (``kernels/rope_kv_store.py``): six ops, the prologue passes' calls.
* RoPE from a model's cos/sin tables, and mRoPE from a cache (``kernels/rope_tables.py``):
  ``fused_qk_rope_with_cos_sin_tables_inplace``, ``fused_qk_mrope_with_cos_sin_cache_inplace``.
* RoPE from the angles of a model's tables (``kernels/rope_tables.py``, cos/sin computed in the
  kernel): ``fused_qk_rope_with_angles_inplace``.

Every op mutates exactly what it writes (q/k, and the KV buffers of the store ops). Kernels: the
Triton launcher for ``cuda`` and ``xpu`` (imported lazily, so the package imports without
Triton), the float32 reference applied in place for ``cpu``. The fake implementations validate
and touch no data. The RoPE ops have a backward (``autograd.py``); the store and norm ops are
inference ops. The drop-ins built on them: ``kv_store.py`` (sglang), ``qk_norm.py`` (vLLM),
``module.py`` (sglang's ``RotaryEmbedding``).

Indices (``docs/index_ranges.md``): every op that takes ``positions`` (rows of a cos/sin cache
of P rows) has ``wrap_negative_positions`` (default False, as sglang's / vLLM's
``cos_sin_cache.index_select(0, positions)``: positions lie in ``[0, P)``; True, as eager
``cos_sin_cache[positions]``: a position in ``[-P, 0)`` is row ``P + position``); every op that
takes ``cache_loc`` (rows of KV buffers of S rows) has ``wrap_negative_cache_loc`` (default
True, as eager ``k_buffer[cache_loc] = k``: ``[-S, S)``; False, as ``index_copy_``:
``[0, S)``). An index outside its range raises ``IndexError`` on the CPU, and on GPUs with
:func:`~rope_compile.validation.set_check_positions` (a device sync); without it the GPU
kernels leave that index's rows untouched (a position: the token's q and k, and its KV-buffer
rows; a cache_loc: its KV-buffer rows) and never read or write outside a tensor.
"""

from __future__ import annotations

import torch

from . import autograd, fast_launch
from .constants import GPU_DEVICE_TYPES
from .reference import rope_reference_
from .validation import (  # noqa: F401  (names and checks re-exported for callers)
    _FUSED,
    _GENERIC,
    FUSED_OP_NAME,
    GENERIC_OP_NAME,
    check_positions_in_range,
    check_positions_on_device_enabled,
    generic_views,
    validate_fused,
)


def _launch_triton(q, k, cos_sin_cache, positions, rotary_dim, is_neox, wrap, op) -> None:
    if check_positions_on_device_enabled():
        check_positions_in_range(op, positions, cos_sin_cache.shape[0], wrap)
    from .kernels.rope_cache import launch_fused_qk_rope

    launch_fused_qk_rope(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                         wrap_positions=wrap)


# The ops are defined on a torch.library.Library rather than with torch.library.custom_op:
# custom_op adds Python autograd / ADInplaceOrView / aliasing-check layers to every call, which
# measured ~350 us of host time per call inside a compiled graph on an H100 host (torch 2.11,
# benchmarks/host_breakdown.py). Here the dispatcher calls the kernels below directly. The
# Autograd kernels (rope_compile/autograd.py, which says why not register_autograd) only
# redispatch below autograd when no input requires grad.
_LIB = torch.library.Library("rope_compile", "DEF")
_WRAP_POSITIONS = "bool wrap_negative_positions=False"
_WRAP_LOC = "bool wrap_negative_cache_loc=True"
_LIB.define(
    "fused_qk_rope_with_cos_sin_cache_inplace(Tensor(a0!) q, Tensor(a1!) k, Tensor cos_sin_cache, "
    f"Tensor positions, int rotary_dim, bool is_neox, {_WRAP_POSITIONS}) -> ()"
)
_LIB.define(
    "rotary_embedding(Tensor positions, Tensor(a1!) query, Tensor(a2!) key, int head_size, "
    f"Tensor cos_sin_cache, bool is_neox, {_WRAP_POSITIONS}) -> ()"
)


def _register(name: str, *, cpu, gpu, fake) -> None:
    """CPU kernel, the Triton kernel for CUDA and XPU, and the fake implementation."""
    _LIB.impl(name, cpu, "CPU")
    for dispatch_key in (device.upper() for device in GPU_DEVICE_TYPES):
        _LIB.impl(name, gpu, dispatch_key)
    torch.library.register_fake(f"rope_compile::{name}", fake, lib=_LIB)


def _fused_qk_rope_cpu(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                       wrap_negative_positions=False) -> None:
    validate_fused(q, k, cos_sin_cache, positions, rotary_dim)
    check_positions_in_range(_FUSED, positions, cos_sin_cache.shape[0], wrap_negative_positions)
    rope_reference_(q, k, cos_sin_cache, positions, rotary_dim, is_neox)


def _fused_qk_rope_triton(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                          wrap_negative_positions=False) -> None:
    validate_fused(q, k, cos_sin_cache, positions, rotary_dim)
    _launch_triton(q, k, cos_sin_cache, positions, rotary_dim, is_neox, wrap_negative_positions,
                   _FUSED)


def _fused_qk_rope_fake(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                        wrap_negative_positions=False) -> None:
    validate_fused(q, k, cos_sin_cache, positions, rotary_dim)


_register(_FUSED, cpu=_fused_qk_rope_cpu, gpu=_fused_qk_rope_triton, fake=_fused_qk_rope_fake)
fused_qk_rope_op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default


def _rotary_embedding_cpu(positions, query, key, head_size, cos_sin_cache, is_neox,
                          wrap_negative_positions=False) -> None:
    q, k, pos, rot = generic_views(positions, query, key, head_size, cos_sin_cache)
    check_positions_in_range(_GENERIC, pos, cos_sin_cache.shape[0], wrap_negative_positions)
    rope_reference_(q, k, cos_sin_cache, pos, rot, is_neox)


def _rotary_embedding_triton(positions, query, key, head_size, cos_sin_cache, is_neox,
                             wrap_negative_positions=False) -> None:
    q, k, pos, rot = generic_views(positions, query, key, head_size, cos_sin_cache)
    _launch_triton(q, k, cos_sin_cache, pos, rot, is_neox, wrap_negative_positions, _GENERIC)


def _rotary_embedding_fake(positions, query, key, head_size, cos_sin_cache, is_neox,
                           wrap_negative_positions=False) -> None:
    generic_views(positions, query, key, head_size, cos_sin_cache)


_register(_GENERIC, cpu=_rotary_embedding_cpu, gpu=_rotary_embedding_triton,
          fake=_rotary_embedding_fake)
rotary_embedding_op = torch.ops.rope_compile.rotary_embedding.default
autograd.register(_LIB)


# ---------------------------------------------------------------------------------------------
# RoPE + KV-cache store, and QK-norm + RoPE (+ KV store): one Triton kernel with constexpr
# switches (rope_compile/kernels/rope_kv_store.py, which gives the math and rounding); CPU: the
# float32 reference in place (reference.qk_norm_rope_kv_reference_).
#
# q [T, Hq, D] and k [T, Hk, D] are whole heads (RoPE touches [..., :rotary_dim]; the norm and
# the store the whole head; a norm weight [H*D] normalises all of a token's heads as one row);
# v [T, Hk, Dv]; k_buffer [S, Hk, D] / v_buffer [S, Hk, Dv] get rows
# cache_loc[t] (any row stride, last stride 1; fp16 / bf16 / fp32 / fp8 e4m3fn), the stored
# value being cast(x / scale) in fp32 (no division when the scale is None). Duplicate cache_loc
# values are not checked (a sort, and a device sync on GPUs): which token's row lands is then
# unspecified, as with eager ``k_buffer[cache_loc] = k``. Indices as the module docstring says:
# cache_loc in [-S, S) (wrap_negative_cache_loc, the default) or [0, S), positions in [0, P)
# (the default) or [-P, P) (wrap_negative_positions); out of range: IndexError on the CPU
# always, on GPUs with set_check_positions(True), else the index's rows are left untouched (a
# token with its position out of range: q, k and its buffer rows; a cache_loc: buffer rows).
# These are inference (decode-path) ops: a call with an input that requires grad is refused.

from .reference import qk_norm_rope_kv_reference_  # noqa: E402
from .validation import (  # noqa: E402, F401  (names re-exported for callers)
    _KV_STORE,
    _NORM_ROPE,
    _NORM_ROPE_KV,
    KV_STORE_OP_NAME,
    NORM_ROPE_KV_OP_NAME,
    NORM_ROPE_OP_NAME,
    check_cache_loc_in_range,
    validate_kv_store,
    validate_norm_rope,
)

_KV_ARGS = ("Tensor v, Tensor(a2!) k_buffer, Tensor(a3!) v_buffer, Tensor cache_loc")
_NORM_ARGS = "Tensor q_weight, Tensor k_weight, float eps, float weight_offset"
_ROPE_ARGS = "Tensor cos_sin_cache, Tensor positions, int rotary_dim, bool is_neox"
_SCALES = "float? k_scale=None, float? v_scale=None"
# The norm's rounding, last (a default: every call without it keeps its meaning): None, as
# weight_offset says (0.0: x_normed rounded, then times w, rounded: HF Qwen3; 1.0: x_normed *
# (1 + w) rounded once: Gemma3); True: once, after the weight (offset 0.0: HF OLMo2's
# Olmo2RMSNorm); False: twice (offset 0.0 only). reference.norm_rounds_once decides.
_ROUNDING = "bool? round_once=None"
_LIB.define(f"{_KV_STORE}(Tensor(a0!) q, Tensor(a1!) k, {_KV_ARGS}, {_ROPE_ARGS}, {_SCALES}, "
            f"{_WRAP_POSITIONS}, {_WRAP_LOC}) -> ()")
_LIB.define(f"{_NORM_ROPE}(Tensor(a0!) q, Tensor(a1!) k, {_NORM_ARGS}, {_ROPE_ARGS}, "
            f"{_ROUNDING}, {_WRAP_POSITIONS}) -> ()")
_LIB.define(f"{_NORM_ROPE_KV}(Tensor(a0!) q, Tensor(a1!) k, {_KV_ARGS}, {_NORM_ARGS}, "
            f"{_ROPE_ARGS}, {_SCALES}, {_ROUNDING}, {_WRAP_POSITIONS}, {_WRAP_LOC}) -> ()")


def _kv_store_args(q, k, v, k_buffer, v_buffer, cache_loc, cos_sin_cache, positions,
                   rotary_dim, is_neox, k_scale=None, v_scale=None,
                   wrap_negative_positions=False, wrap_negative_cache_loc=True):
    validate_kv_store(q, k, v, k_buffer, v_buffer, cache_loc, cos_sin_cache, positions,
                      rotary_dim, k_scale, v_scale)
    kv = (v, k_buffer, v_buffer, cache_loc, k_scale, v_scale)
    wrap = (wrap_negative_positions, wrap_negative_cache_loc)
    return q, k, cos_sin_cache, positions, rotary_dim, is_neox, None, kv, wrap


def _norm_rope_args(q, k, q_weight, k_weight, eps, weight_offset, cos_sin_cache, positions,
                    rotary_dim, is_neox, round_once=None, wrap_negative_positions=False):
    validate_norm_rope(q, k, q_weight, k_weight, eps, weight_offset, cos_sin_cache, positions,
                       rotary_dim, round_once=round_once)
    norm = (q_weight, k_weight, eps, weight_offset, round_once)
    wrap = (wrap_negative_positions, True)
    return q, k, cos_sin_cache, positions, rotary_dim, is_neox, norm, None, wrap


def _norm_rope_kv_args(q, k, v, k_buffer, v_buffer, cache_loc, q_weight, k_weight, eps,
                       weight_offset, cos_sin_cache, positions, rotary_dim, is_neox,
                       k_scale=None, v_scale=None, round_once=None,
                       wrap_negative_positions=False, wrap_negative_cache_loc=True):
    kv = (v, k_buffer, v_buffer, cache_loc, k_scale, v_scale)
    validate_norm_rope(q, k, q_weight, k_weight, eps, weight_offset, cos_sin_cache, positions,
                       rotary_dim, kv, round_once)
    norm = (q_weight, k_weight, eps, weight_offset, round_once)
    wrap = (wrap_negative_positions, wrap_negative_cache_loc)
    return q, k, cos_sin_cache, positions, rotary_dim, is_neox, norm, kv, wrap


def _check_indices(op, cos_sin_cache, positions, kv, wrap) -> None:
    """``wrap``: (wrap_negative_positions, wrap_negative_cache_loc)."""
    if positions is not None:
        check_positions_in_range(op, positions, cos_sin_cache.shape[0], wrap[0])
    if kv is not None:
        check_cache_loc_in_range(op, kv[3], kv[1].shape[-3], wrap[1])


def _register_kv_op(name: str, args, mutated: tuple[int, ...], tables: bool = False) -> None:
    """CPU, Triton (cuda/xpu), fake and Autograd kernels of ``name``; ``args`` validates the
    op's arguments and returns ``(q, k, cos_sin_cache, positions, rotary_dim, is_neox, norm,
    kv, (wrap_negative_positions, wrap_negative_cache_loc))`` (``tables``: ``(q, k, cos, sin,
    ...)``); ``mutated``: the positions of the arguments the op writes."""

    def cpu(*op_args) -> None:
        q, k, a, b, rot, neox, norm, kv, wrap = args(*op_args)
        if tables:
            _check_indices(name, None, None, kv, wrap)
            qk_norm_rope_kv_tables_reference_(q, k, a, b, rot, neox, norm=norm, kv=kv)
            return
        _check_indices(name, a, b, kv, wrap)
        qk_norm_rope_kv_reference_(q, k, a, b, rot, neox, norm=norm, kv=kv)

    def triton(*op_args) -> None:
        q, k, a, b, rot, neox, norm, kv, wrap = args(*op_args)
        if check_positions_on_device_enabled():
            _check_indices(name, None if tables else a, None if tables else b, kv, wrap)
        from .kernels.rope_kv_store import launch, launch_tables

        (launch_tables if tables else launch)(q, k, a, b, rot, neox, norm=norm, kv=kv,
                                              wrap_positions=wrap[0], wrap_loc=wrap[1])

    def fake(*op_args) -> None:
        args(*op_args)

    _register(name, cpu=cpu, gpu=triton, fake=fake)
    op = getattr(torch.ops.rope_compile, name).default
    below_autograd = torch._C._after_autograd_keyset

    def autograd_kernel(keyset, *op_args) -> None:
        if torch.is_grad_enabled():
            names = [a.name for a, x in zip(op._schema.arguments, op_args, strict=False)
                     if isinstance(x, torch.Tensor) and x.requires_grad]
            if names:
                raise RuntimeError(
                    f"{name}: {', '.join(names)} requires grad, but this op has no gradient "
                    f"(an inference, decode-path op). Call it under torch.no_grad() or "
                    f"torch.inference_mode(), or use RotaryEmbedding.forward_native.")
        op.redispatch(keyset & below_autograd, *op_args)
        torch._C._increment_version(tuple(op_args[i] for i in mutated))

    _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


_register_kv_op(_KV_STORE, _kv_store_args, (0, 1, 3, 4))
_register_kv_op(_NORM_ROPE, _norm_rope_args, (0, 1))
_register_kv_op(_NORM_ROPE_KV, _norm_rope_kv_args, (0, 1, 3, 4))
kv_store_op = torch.ops.rope_compile.fused_qk_rope_kv_store_inplace.default
norm_rope_op = torch.ops.rope_compile.fused_qk_norm_rope_inplace.default
norm_rope_kv_op = torch.ops.rope_compile.fused_qk_norm_rope_kv_store_inplace.default

# The same three ops with cos/sin from a model's own tables (token t reads row t % R of cos/sin
# [R, rotary_dim/2], any strides and float dtype: the tables op's source) in place of
# cos_sin_cache and positions. All six KV-store ops take 3-D buffers [S, Hk, D] (rows
# cache_loc[t], cache_loc [T]) or 4-D ones [Bc, S, Hk, D] (HF StaticCache's [B, Hk, L, D] as
# .permute(0, 2, 1, 3)): token t writes batch t // R_loc, row cache_loc[t % R_loc], cache_loc
# [R_loc] with R_loc dividing T (HF: cache_loc = cache_position, tokens in (batch, seq) order).

from .reference import qk_norm_rope_kv_tables_reference_  # noqa: E402
from .validation import (  # noqa: E402, F401  (names re-exported for callers)
    _KV_STORE_TABLES,
    _NORM_ROPE_KV_TABLES,
    _NORM_ROPE_TABLES,
    KV_STORE_TABLES_OP_NAME,
    NORM_ROPE_KV_TABLES_OP_NAME,
    NORM_ROPE_TABLES_OP_NAME,
    validate_kv_store_tables,
    validate_norm_rope_tables,
)

_TABLE_ARGS = "Tensor cos, Tensor sin, int rotary_dim, bool is_neox"
_LIB.define(f"{_KV_STORE_TABLES}(Tensor(a0!) q, Tensor(a1!) k, {_KV_ARGS}, {_TABLE_ARGS}, "
            f"{_SCALES}, {_WRAP_LOC}) -> ()")
_LIB.define(f"{_NORM_ROPE_TABLES}(Tensor(a0!) q, Tensor(a1!) k, {_NORM_ARGS}, {_TABLE_ARGS}, "
            f"{_ROUNDING}) -> ()")
_LIB.define(f"{_NORM_ROPE_KV_TABLES}(Tensor(a0!) q, Tensor(a1!) k, {_KV_ARGS}, {_NORM_ARGS}, "
            f"{_TABLE_ARGS}, {_SCALES}, {_ROUNDING}, {_WRAP_LOC}) -> ()")


def _kv_store_tables_args(q, k, v, k_buffer, v_buffer, cache_loc, cos, sin, rotary_dim,
                          is_neox, k_scale=None, v_scale=None, wrap_negative_cache_loc=True):
    validate_kv_store_tables(q, k, v, k_buffer, v_buffer, cache_loc, cos, sin, rotary_dim,
                             k_scale, v_scale)
    kv = (v, k_buffer, v_buffer, cache_loc, k_scale, v_scale)
    return q, k, cos, sin, rotary_dim, is_neox, None, kv, (False, wrap_negative_cache_loc)


def _norm_rope_tables_args(q, k, q_weight, k_weight, eps, weight_offset, cos, sin, rotary_dim,
                           is_neox, round_once=None):
    validate_norm_rope_tables(q, k, q_weight, k_weight, eps, weight_offset, cos, sin,
                              rotary_dim, round_once=round_once)
    norm = (q_weight, k_weight, eps, weight_offset, round_once)
    return q, k, cos, sin, rotary_dim, is_neox, norm, None, (False, True)


def _norm_rope_kv_tables_args(q, k, v, k_buffer, v_buffer, cache_loc, q_weight, k_weight, eps,
                              weight_offset, cos, sin, rotary_dim, is_neox, k_scale=None,
                              v_scale=None, round_once=None, wrap_negative_cache_loc=True):
    kv = (v, k_buffer, v_buffer, cache_loc, k_scale, v_scale)
    validate_norm_rope_tables(q, k, q_weight, k_weight, eps, weight_offset, cos, sin,
                              rotary_dim, kv, round_once)
    norm = (q_weight, k_weight, eps, weight_offset, round_once)
    return q, k, cos, sin, rotary_dim, is_neox, norm, kv, (False, wrap_negative_cache_loc)


_register_kv_op(_KV_STORE_TABLES, _kv_store_tables_args, (0, 1, 3, 4), tables=True)
_register_kv_op(_NORM_ROPE_TABLES, _norm_rope_tables_args, (0, 1), tables=True)
_register_kv_op(_NORM_ROPE_KV_TABLES, _norm_rope_kv_tables_args, (0, 1, 3, 4), tables=True)
kv_store_tables_op = torch.ops.rope_compile.fused_qk_rope_kv_store_tables_inplace.default
norm_rope_tables_op = torch.ops.rope_compile.fused_qk_norm_rope_tables_inplace.default
norm_rope_kv_tables_op = torch.ops.rope_compile.fused_qk_norm_rope_kv_store_tables_inplace.default


def fused_qk_rope_kv_store_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    cache_loc: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    k_scale: float | None = None,
    v_scale: float | None = None,
    *,
    wrap_negative_positions: bool = False,
    wrap_negative_cache_loc: bool = True,
) -> None:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hk, D]`` in place and write the rotated k and v
    ``[T, Hk, Dv]`` into rows ``cache_loc`` of k_buffer ``[S, Hk, D]`` / v_buffer
    ``[S, Hk, Dv]`` (``x / scale`` in fp32, cast to the buffer's dtype), in one launch.

    Indices (the module docstring): positions in ``[0, P)`` (``[-P, P)`` with
    ``wrap_negative_positions``), cache_loc in ``[-S, S)`` as eager ``k_buffer[cache_loc] = k``
    (``[0, S)`` without ``wrap_negative_cache_loc``); out of range: ``IndexError`` on the CPU
    (GPUs: with ``set_check_positions(True)``, else those rows are left untouched)."""
    kv_store_op(q, k, v, k_buffer, v_buffer, cache_loc, cos_sin_cache, positions, rotary_dim,
                is_neox, k_scale, v_scale, wrap_negative_positions, wrap_negative_cache_loc)


def fused_qk_norm_rope_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    *,
    round_once: bool | None = None,
    wrap_negative_positions: bool = False,
) -> None:
    """RMSNorm of q ``[T, Hq, D]`` and k ``[T, Hk, D]``, then RoPE, in place, in one launch.

    Each weight's shape says what it normalises: ``[D]``, each head over D (HF Qwen3 / Gemma3
    ``q_norm``); ``[H*D]``, all H heads of a token together (HF OLMo2's norm of the whole
    projection, weight element ``h*D + c``), independently for q and k (they coincide when
    H == 1). ``weight_offset`` 0.0: ``x * w``; 1.0: ``x * (1 + w)``, Gemma. The rounding, with
    ``xn = x * rsqrt(mean(x^2) + eps)`` in float32 and ``round`` to x's dtype:

    * ``round_once=None`` (default): as the offset says, offset 0.0 ``round(w * round(xn))``
      (HF ``Qwen3RMSNorm``), 1.0 ``round(xn * (1 + w))`` (HF ``Gemma3RMSNorm``);
    * ``round_once=True``: ``round(xn * (offset + w))``, the weight in float32; offset 0.0 is
      HF ``Olmo2RMSNorm`` (``(weight * xn).to(dtype)``);
    * ``round_once=False``: ``round(w * round(xn))``, offset 0.0 only (1.0 is refused).

    In float32 all forms with the same offset agree. Positions as
    :func:`fused_qk_rope_kv_store_inplace`'s (a token out of range is left as it is)."""
    norm_rope_op(q, k, q_weight, k_weight, eps, weight_offset, cos_sin_cache, positions,
                 rotary_dim, is_neox, round_once, wrap_negative_positions)


def fused_qk_norm_rope_kv_store_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    cache_loc: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    k_scale: float | None = None,
    v_scale: float | None = None,
    *,
    round_once: bool | None = None,
    wrap_negative_positions: bool = False,
    wrap_negative_cache_loc: bool = True,
) -> None:
    """:func:`fused_qk_norm_rope_inplace` (``round_once`` as there), then the KV store of
    :func:`fused_qk_rope_kv_store_inplace` (indices as there), in one launch."""
    norm_rope_kv_op(q, k, v, k_buffer, v_buffer, cache_loc, q_weight, k_weight, eps,
                    weight_offset, cos_sin_cache, positions, rotary_dim, is_neox, k_scale,
                    v_scale, round_once, wrap_negative_positions, wrap_negative_cache_loc)


def fused_qk_rope_kv_store_tables_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    cache_loc: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    k_scale: float | None = None,
    v_scale: float | None = None,
    *,
    wrap_negative_cache_loc: bool = True,
) -> None:
    """:func:`fused_qk_rope_kv_store_inplace` with token t rotated by row ``t % R`` of
    ``cos``/``sin`` ``[R, rotary_dim/2]`` (any strides); k_buffer/v_buffer ``[S, Hk, D]``
    (cache_loc ``[T]``) or ``[Bc, S, Hk, D]`` (token t -> batch ``t // R_loc``, row
    ``cache_loc[t % R_loc]``; cache_loc as there: ``wrap_negative_cache_loc=False`` is HF
    ``StaticCache``'s ``index_copy_``)."""
    kv_store_tables_op(q, k, v, k_buffer, v_buffer, cache_loc, cos, sin, rotary_dim, is_neox,
                       k_scale, v_scale, wrap_negative_cache_loc)


def fused_qk_norm_rope_tables_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    *,
    round_once: bool | None = None,
) -> None:
    """:func:`fused_qk_norm_rope_inplace` with cos/sin tables ``[R, rotary_dim/2]``."""
    norm_rope_tables_op(q, k, q_weight, k_weight, eps, weight_offset, cos, sin, rotary_dim,
                        is_neox, round_once)


def fused_qk_norm_rope_kv_store_tables_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    cache_loc: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    k_scale: float | None = None,
    v_scale: float | None = None,
    *,
    round_once: bool | None = None,
    wrap_negative_cache_loc: bool = True,
) -> None:
    """:func:`fused_qk_norm_rope_kv_store_inplace` with cos/sin tables ``[R, rotary_dim/2]``."""
    norm_rope_kv_tables_op(q, k, v, k_buffer, v_buffer, cache_loc, q_weight, k_weight, eps,
                           weight_offset, cos, sin, rotary_dim, is_neox, k_scale, v_scale,
                           round_once, wrap_negative_cache_loc)


def fused_qk_rope_with_cos_sin_cache_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    *,
    wrap_negative_positions: bool = False,
) -> None:
    """Rotate ``q`` ``[T, Hq, rotary_dim]`` and ``k`` ``[T, Hk, rotary_dim]`` in place, in one
    kernel launch. Drop-in for ``sgl_kernel``'s function of the same name.

    Positions lie in ``[0, P)`` (``[-P, P)`` with ``wrap_negative_positions``, as eager
    ``cos_sin_cache[positions]``); out of range: ``IndexError`` on the CPU, and on GPUs with
    ``set_check_positions(True)``; else the token's q and k are left as they are.
    Eager calls on GPU tensors take :mod:`rope_compile.fast_launch` where nothing needs the
    dispatcher; the result is the same either way."""
    if wrap_negative_positions or not fast_launch.try_fused(q, k, cos_sin_cache, positions,
                                                            rotary_dim, is_neox):
        fused_qk_rope_op(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                         wrap_negative_positions)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    *,
    wrap_negative_positions: bool = False,
) -> None:
    """Generic in-place RoPE of query/key ``[T, H * head_size]``, any head size and any even
    ``rotary_dim = cos_sin_cache.shape[1] <= head_size``
    (the counterpart of ``torch.ops.sgl_kernel.rotary_embedding``); positions as
    :func:`fused_qk_rope_with_cos_sin_cache_inplace`'s."""
    if wrap_negative_positions or not fast_launch.try_generic(positions, query, key, head_size,
                                                              cos_sin_cache, is_neox):
        rotary_embedding_op(positions, query, key, head_size, cos_sin_cache, is_neox,
                            wrap_negative_positions)


# ---------------------------------------------------------------------------------------------
# Q+K RoPE from per-token cos/sin tables, and mRoPE from a cache (rope_compile/kernels/
# rope_tables.py: one Triton kernel serves both; CPU: the float32 reference in place).
#
# * ``fused_qk_rope_with_cos_sin_tables_inplace(q, k, cos, sin, rotary_dim, is_neox,
#   mrope_section=None)``: token t rotated by row ``t % R`` of cos/sin ``[R, rotary_dim/2]``
#   (pair tables) or ``[R, rotary_dim]`` (full tables, one value per feature: HF's
#   ``x * cos + rotate_half(x) * sin`` for any cos/sin), ``[3, R, ...]``, one per mRoPE stream,
#   with ``mrope_section``: the model's own HF / gpt-fast tables, with no ``[T, rotary_dim]``
#   cache or positions built.
# * ``fused_qk_mrope_with_cos_sin_cache_inplace(q, k, cos_sin_cache, positions, rotary_dim,
#   is_neox, mrope_section, wrap_negative_positions=False, mrope_interleaved=False)``:
#   Qwen2-VL's multimodal RoPE (sglang's MRotaryEmbedding), positions ``[3, T]`` (or ``[T]``,
#   text only); streams by sections, or interleaved (Qwen3-VL).

from .reference import mrope_cache_reference_, rope_tables_reference_  # noqa: E402
from .validation import (  # noqa: E402, F401  (names re-exported for callers)
    _MROPE,
    _TABLES,
    MROPE_OP_NAME,
    TABLES_OP_NAME,
    validate_qk_mrope_cache,
    validate_qk_rope_tables,
)

_LIB.define(
    "fused_qk_rope_with_cos_sin_tables_inplace(Tensor(a0!) q, Tensor(a1!) k, Tensor cos, "
    "Tensor sin, int rotary_dim, bool is_neox, int[]? mrope_section=None) -> ()"
)
_LIB.define(
    "fused_qk_mrope_with_cos_sin_cache_inplace(Tensor(a0!) q, Tensor(a1!) k, "
    "Tensor cos_sin_cache, Tensor positions, int rotary_dim, bool is_neox, "
    f"int[] mrope_section, {_WRAP_POSITIONS}, bool mrope_interleaved=False) -> ()"
)


def _qk_rope_tables_cpu(q, k, cos, sin, rotary_dim, is_neox, mrope_section=None) -> None:
    validate_qk_rope_tables(q, k, cos, sin, rotary_dim, mrope_section)
    rope_tables_reference_(q, k, cos, sin, rotary_dim, is_neox, mrope_section)


def _qk_rope_tables_triton(q, k, cos, sin, rotary_dim, is_neox, mrope_section=None) -> None:
    validate_qk_rope_tables(q, k, cos, sin, rotary_dim, mrope_section)
    from .kernels.rope_tables import launch_qk_rope_tables

    launch_qk_rope_tables(q, k, cos, sin, rotary_dim, is_neox, mrope_section)


def _qk_rope_tables_fake(q, k, cos, sin, rotary_dim, is_neox, mrope_section=None) -> None:
    validate_qk_rope_tables(q, k, cos, sin, rotary_dim, mrope_section)


def _qk_mrope_cache_cpu(q, k, cos_sin_cache, positions, rotary_dim, is_neox, mrope_section,
                        wrap_negative_positions=False, mrope_interleaved=False) -> None:
    validate_qk_mrope_cache(q, k, cos_sin_cache, positions, rotary_dim, mrope_section,
                            mrope_interleaved)
    check_positions_in_range(_MROPE, positions, cos_sin_cache.shape[0], wrap_negative_positions)
    mrope_cache_reference_(q, k, cos_sin_cache, positions, rotary_dim, is_neox, mrope_section,
                           mrope_interleaved)


def _qk_mrope_cache_triton(q, k, cos_sin_cache, positions, rotary_dim, is_neox, mrope_section,
                           wrap_negative_positions=False, mrope_interleaved=False) -> None:
    validate_qk_mrope_cache(q, k, cos_sin_cache, positions, rotary_dim, mrope_section,
                            mrope_interleaved)
    if check_positions_on_device_enabled():
        check_positions_in_range(_MROPE, positions, cos_sin_cache.shape[0],
                                 wrap_negative_positions)
    from .kernels.rope_tables import launch_qk_mrope_cache

    launch_qk_mrope_cache(q, k, cos_sin_cache, positions, rotary_dim, is_neox, mrope_section,
                          wrap_negative_positions, mrope_interleaved)


def _qk_mrope_cache_fake(q, k, cos_sin_cache, positions, rotary_dim, is_neox, mrope_section,
                         wrap_negative_positions=False, mrope_interleaved=False) -> None:
    validate_qk_mrope_cache(q, k, cos_sin_cache, positions, rotary_dim, mrope_section,
                            mrope_interleaved)


_register(_TABLES, cpu=_qk_rope_tables_cpu, gpu=_qk_rope_tables_triton,
          fake=_qk_rope_tables_fake)
_register(_MROPE, cpu=_qk_mrope_cache_cpu, gpu=_qk_mrope_cache_triton, fake=_qk_mrope_cache_fake)
qk_rope_tables_op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default
qk_mrope_cache_op = torch.ops.rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace.default
autograd.register_tables(_LIB)


def fused_qk_rope_with_cos_sin_tables_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    mrope_section: list[int] | None = None,
) -> None:
    """Rotate ``q`` ``[T, Hq, >= rotary_dim]`` and ``k`` ``[T, Hk, >= rotary_dim]`` in place in
    one kernel launch, token t by row ``t % R`` of ``cos``/``sin`` ``[R, rotary_dim/2]`` (R
    divides T; any strides), or of ``[3, R, rotary_dim/2]`` streams split by ``mrope_section``.

    The tables' last dim picks their form. ``rotary_dim/2`` (pair tables): one cos and one sin
    per pair. ``rotary_dim`` (full tables): one per rotated feature; pair i with feature
    columns (a, b) = (i, i + rotary_dim/2) (neox) or (2i, 2i + 1) (GPT-J) becomes
    ``x_a' = x_a * cos[a] - x_b * sin[a]``, ``x_b' = x_b * cos[b] + x_a * sin[b]``: exactly HF's
    ``x * cos + rotate_half(x) * sin`` (``rotate_every_two`` for GPT-J) for any cos/sin,
    equal halves or not. With ``mrope_section`` both columns of pair i come from stream(i).
    """
    sections = None if mrope_section is None else list(mrope_section)
    qk_rope_tables_op(q, k, cos, sin, rotary_dim, is_neox, sections)


def fused_qk_mrope_with_cos_sin_cache_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    mrope_section: list[int],
    *,
    wrap_negative_positions: bool = False,
    mrope_interleaved: bool = False,
) -> None:
    """Multimodal RoPE (Qwen2-VL; sglang's ``MRotaryEmbedding``) of ``q`` and ``k`` in place, in
    one kernel launch: pair column i of token t is rotated by ``cos_sin_cache`` row
    ``positions[stream(i), t]``, stream 0, 1 or 2 by the ``mrope_section`` ``(s0, s1, s2)``
    (summing to ``rotary_dim/2``) that i lies in; with ``mrope_interleaved`` (Qwen3-VL, sglang's
    ``apply_interleaved_rope``) stream 1 where ``i % 3 == 1 and i < 3 * s1``, stream 2 where
    ``i % 3 == 2 and i < 3 * s2``, else stream 0. ``positions`` ``[3, T]``, or ``[T]`` (text
    only: every stream the same), in ``[0, P)`` (``[-P, P)`` with ``wrap_negative_positions``,
    as sglang's native ``cos_sin_cache[positions]``); a token with any of its positions out of
    range: ``IndexError`` on the CPU (GPUs: with ``set_check_positions(True)``, else the token
    is left as it is)."""
    qk_mrope_cache_op(q, k, cos_sin_cache, positions, rotary_dim, is_neox, list(mrope_section),
                      wrap_negative_positions, mrope_interleaved)


# ---------------------------------------------------------------------------------------------
# Q+K RoPE from the ANGLES of a model's cos/sin tables (HF's ``freqs = inv_freq (x) positions``,
# fp32 ``[R, rotary_dim/2]``, any strides): the kernel computes each cos/sin as the model's
# chain does, ``(cos(freqs) * cos_scale).to(table_dtype)``, so the table is never built (one
# kernel less per forward than reading it). Same kernel as the tables op (its ANGLES source);
# CPU: the tables reference on the table computed as eager computes it.

from .reference import rope_angles_reference_  # noqa: E402
from .validation import (  # noqa: E402, F401  (names re-exported for callers)
    _ANGLES,
    ANGLES_OP_NAME,
    ANGLES_TABLE_DTYPES,
    validate_qk_rope_angles,
)

_LIB.define(
    f"{_ANGLES}(Tensor(a0!) q, Tensor(a1!) k, Tensor angles, float cos_scale, float sin_scale, "
    "ScalarType table_dtype, int rotary_dim, bool is_neox, int[]? mrope_section=None) -> ()"
)


def _qk_rope_angles_cpu(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                        mrope_section=None) -> None:
    validate_qk_rope_angles(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim,
                            mrope_section)
    rope_angles_reference_(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                           mrope_section)


def _qk_rope_angles_triton(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                           mrope_section=None) -> None:
    validate_qk_rope_angles(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim,
                            mrope_section)
    from .kernels.rope_tables import launch_qk_rope_angles

    launch_qk_rope_angles(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                          mrope_section)


def _qk_rope_angles_fake(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                         mrope_section=None) -> None:
    validate_qk_rope_angles(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim,
                            mrope_section)


_register(_ANGLES, cpu=_qk_rope_angles_cpu, gpu=_qk_rope_angles_triton,
          fake=_qk_rope_angles_fake)
qk_rope_angles_op = torch.ops.rope_compile.fused_qk_rope_with_angles_inplace.default
autograd.register_angles(_LIB)


def fused_qk_rope_with_angles_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    angles: torch.Tensor,
    cos_scale: float,
    sin_scale: float,
    table_dtype: torch.dtype,
    rotary_dim: int,
    is_neox: bool,
    mrope_section: list[int] | None = None,
) -> None:
    """Rotate ``q`` ``[T, Hq, >= rotary_dim]`` and ``k`` ``[T, Hk, >= rotary_dim]`` in place in
    one kernel launch, token t by the angles in row ``t % R`` of ``angles`` (float32
    ``[R, rotary_dim/2]``, R divides T, any strides; ``[3, R, rotary_dim/2]`` streams split by
    ``mrope_section``): exactly :func:`fused_qk_rope_with_cos_sin_tables_inplace` with the pair
    tables ``cos = (torch.cos(angles) * cos_scale).to(table_dtype)`` and ``sin = (torch.sin(
    angles) * sin_scale).to(table_dtype)`` (fp32 math; ``table_dtype`` float32, float16 or
    bfloat16), which are computed in the kernel and never stored. HF's rotary modules give
    ``angles = freqs``, ``cos_scale = sin_scale = attention_scaling``, ``table_dtype = x.dtype``.
    GPU kernels take cos/sin from Triton's ``tl.cos``/``tl.sin``, as Inductor's own code for the
    chain does; the CPU kernel from ``torch.cos``/``torch.sin``."""
    sections = None if mrope_section is None else list(mrope_section)
    qk_rope_angles_op(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                      sections)
