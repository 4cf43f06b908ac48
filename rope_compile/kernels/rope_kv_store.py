"""QK-norm + RoPE + KV-cache store: one Triton kernel (constexpr switches) and its launcher.

One launch serves three ops (``rope_compile/ops.py``): RoPE + KV store, QK-norm + RoPE, and
QK-norm + RoPE + KV store. The same source runs on CUDA, XPU and, with ``TRITON_INTERPRET=1``,
on CPU tensors through Triton's interpreter.

Shapes and strides (elements; the last stride of every tensor but the cache must be 1)::

    q         [T, Hq, D]         strides (q_token_stride, q_head_stride, 1)      rotated in place
    k         [T, Hk, D]         strides (k_token_stride, k_head_stride, 1)      rotated in place
    v         [T, Hk, DV]        strides (v_token_stride, v_head_stride, 1)      read (STORE_KV)
    k_buffer  [S, Hk, D]         strides (k_buf_row_stride, k_buf_head_stride, 1)   written rows
    v_buffer  [S, Hk, DV]        strides (v_buf_row_stride, v_buf_head_stride, 1)   written rows
    cache_loc [T]                stride loc_stride, int32/int64, values in [0, S)
    q_weight  [D], k_weight [D]  strides q_w_stride, k_w_stride (NORM)
    cache     [P, ROT]           strides (cache_row_stride, cache_col_stride) = cat(cos, sin)
    pos       [T]                stride pos_stride, int32/int64, values in [0, P)

fp8 buffers are passed as their ``uint8`` view (K_FP8 / V_FP8): the kernel writes the bits.

Math, per token t and head h of q and of k (fp32 throughout; ``round`` = to x's dtype)::

    NORM, Qwen3 form (GEMMA=False): x = round(w * round(x * rsqrt(mean(x^2) + eps)))
    NORM, Gemma form (GEMMA=True):  x = round(x * rsqrt(mean(x^2) + eps) * (1 + w))
    RoPE on x[:ROT], pair i (neox: (i, i + ROT/2), GPT-J: (2i, 2i + 1)), c, s = cache[pos[t]]:
        x1' = x1 * c - x2 * s,  x2' = x2 * c + x1 * s      -> rounded once to x's dtype
    STORE_KV: k_buffer[loc[t], h] = cast(k'[t, h] / k_scale),  v_buffer[loc[t], h] =
        cast(v[t, h] / v_scale)  (k' = the rounded k just written; no division without a scale;
        cast = round to nearest even, fp8 e4m3fn saturating to +-448 as torch 2.13's ``.to``)

The norm's rounding mirrors HF transformers: ``Qwen3RMSNorm`` rounds the normalised value to
the input dtype before the weight multiply (``weight * hidden.to(input_dtype)``) and the product
to the (same) dtype; ``Gemma3RMSNorm`` multiplies by ``1 + weight.float()`` in fp32 and rounds
once. Either way the normalised q/k is rounded to its dtype before RoPE, as eager's separate
norm output is. ``mean`` and ``rsqrt`` are correctly rounded (``div_rn`` / ``sqrt_rn``); the sum
of squares may be added in another order than torch's.

Grid: ``(T, HEAD_SPLITS)``. Program ``(t, s)`` loads the token's cos/sin row (and cache slot)
once, then does head blocks ``s, s + HEAD_SPLITS, ...`` of q (``Q_ITERS`` of them) and then of
k and v (``K_ITERS``), each block ``BLOCK_H`` whole heads.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..triton_kernel import device_launch_options, is_interpreter

# fp8 e4m3fn: the largest finite value (torch's conversion saturates to it).
FP8_E4M3_MAX = 448.0


@triton.jit
def _fp8e4m3fn_bits(x):
    """fp32 -> the uint8 bits of fp8 e4m3fn, as torch 2.13's conversion: round to nearest
    even, subnormals, finite overflow and inf saturate to +-448, NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # Below 2^-6 (subnormal in fp8): adding 2^14 rounds to a multiple of 2^-9, the fp8 step.
    sub = (mag.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    # Normal: rebias the exponent (127 -> 7) and round the mantissa to 3 bits, ties to even.
    normal = (mag - (120 << 23) + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    normal = tl.where(normal == 0x7F, 0x7E, normal)  # a carry into the NaN pattern saturates
    out = tl.where(mag < (121 << 23), sub, normal)
    out = tl.where(mag >= (1087 << 20), tl.where(mag > 0x7F800000, 0x7F, 0x7E), out)  # >= 480
    return (out | tl.where(bits < 0, 0x80, 0)).to(tl.uint8)


@triton.jit
def _to_cache(x, scale, out_ty: tl.constexpr, HAS_SCALE: tl.constexpr, FP8: tl.constexpr):
    """fp32 ``x`` (divided by ``scale``) as stored in a cache of element type ``out_ty``."""
    if HAS_SCALE:
        x = tl.math.div_rn(x, scale)
    if FP8:
        return _fp8e4m3fn_bits(x)
    return x.to(out_ty)


@triton.jit
def _norm(x, r, w, dtype: tl.constexpr, GEMMA: tl.constexpr):
    """RMSNorm of fp32 ``x`` given ``r = rsqrt(mean(x^2) + eps)`` and fp32 weights ``w``,
    rounded as HF's Qwen3RMSNorm (GEMMA=False) or Gemma3RMSNorm (GEMMA=True); fp32 result."""
    if GEMMA:
        return (x * r * (1.0 + w)).to(dtype).to(tl.float32)
    return ((x * r).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)


@triton.jit
def _head_block(
    x_token,  # pointer to x[t, 0, 0]
    x_head_stride,
    first_head,
    num_heads,
    cos,  # [1, HALF_PAD] fp32
    sin,  # [1, HALF_PAD] fp32
    w_ptr,  # norm weight [D] (NORM)
    w_stride,
    eps,
    buf_row,  # pointer to buffer[loc[t], 0, 0] (STORE)
    buf_head_stride,
    scale,
    D: tl.constexpr,
    ROT: tl.constexpr,
    HALF_PAD: tl.constexpr,
    TAIL_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
    NORM: tl.constexpr,
    GEMMA: tl.constexpr,
    STORE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP8: tl.constexpr,
):
    """Norm, rotate and (STORE) cache ``BLOCK_H`` whole heads of one token."""
    HALF: tl.constexpr = ROT // 2
    HAS_TAIL: tl.constexpr = D > ROT
    dtype: tl.constexpr = x_token.dtype.element_ty
    heads = first_head + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    head_mask = heads < num_heads
    rows = x_token + heads.to(tl.int64) * x_head_stride
    i = tl.arange(0, HALF_PAD)[None, :]
    pair_mask = head_mask & (i < HALF)
    # The rotated part as pairs (x1, x2), [BLOCK_H, HALF_PAD] each, and their columns.
    if IS_NEOX:
        c1 = i
        c2 = i + HALF
        x1 = tl.load(rows + c1, mask=pair_mask, other=0.0).to(tl.float32)
        x2 = tl.load(rows + c2, mask=pair_mask, other=0.0).to(tl.float32)
    else:
        # One contiguous row, split into (even, odd) in registers (wide loads, no gathers).
        c1 = 2 * i
        c2 = 2 * i + 1
        j = tl.arange(0, 2 * HALF_PAD)[None, :]
        row_mask = head_mask & (j < ROT)
        x = tl.load(rows + j, mask=row_mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, HALF_PAD, 2)))
    # The pass-through tail x[ROT:D]: normalised (NORM) and/or cached (STORE).
    tcols = ROT + tl.arange(0, TAIL_PAD)[None, :]
    tail_mask = head_mask & (tcols < D)
    if HAS_TAIL and (NORM or STORE):
        xt = tl.load(rows + tcols, mask=tail_mask, other=0.0).to(tl.float32)

    if NORM:
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)  # [BLOCK_H]
        if HAS_TAIL:
            ss += tl.sum(xt * xt, axis=1)
        r = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(ss, D) + eps))[:, None]
        cmask = i < HALF
        x1 = _norm(x1, r, tl.load(w_ptr + c1 * w_stride, mask=cmask, other=0.0).to(tl.float32),
                   dtype, GEMMA)
        x2 = _norm(x2, r, tl.load(w_ptr + c2 * w_stride, mask=cmask, other=0.0).to(tl.float32),
                   dtype, GEMMA)
        if HAS_TAIL:
            wt = tl.load(w_ptr + tcols * w_stride, mask=tcols < D, other=0.0).to(tl.float32)
            xt = _norm(xt, r, wt, dtype, GEMMA)
            tl.store(rows + tcols, xt.to(dtype), mask=tail_mask)

    o1 = (x1 * cos - x2 * sin).to(dtype)
    o2 = (x2 * cos + x1 * sin).to(dtype)
    if IS_NEOX:
        tl.store(rows + c1, o1, mask=pair_mask)
        tl.store(rows + c2, o2, mask=pair_mask)
    else:
        tl.store(rows + j, tl.reshape(tl.join(o1, o2), (BLOCK_H, 2 * HALF_PAD)), mask=row_mask)

    if STORE:
        # The cache row gets the k just written (rounded to k's dtype), divided and cast.
        out_ty: tl.constexpr = buf_row.dtype.element_ty
        brow = buf_row + heads.to(tl.int64) * buf_head_stride
        tl.store(brow + c1, _to_cache(o1.to(tl.float32), scale, out_ty, HAS_SCALE, FP8),
                 mask=pair_mask)
        tl.store(brow + c2, _to_cache(o2.to(tl.float32), scale, out_ty, HAS_SCALE, FP8),
                 mask=pair_mask)
        if HAS_TAIL:
            tl.store(brow + tcols, _to_cache(xt, scale, out_ty, HAS_SCALE, FP8), mask=tail_mask)


@triton.jit
def _copy_v_block(v_token, v_head_stride, first_head, num_heads, buf_row, buf_head_stride,
                  scale, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                  HAS_SCALE: tl.constexpr, FP8: tl.constexpr):
    """``v_buffer[loc[t], heads] = cast(v[t, heads] / scale)`` for ``BLOCK_H`` heads."""
    heads = first_head + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, DV_PAD)[None, :]
    mask = (heads < num_heads) & (cols < DV)
    x = tl.load(v_token + heads.to(tl.int64) * v_head_stride + cols, mask=mask, other=0.0)
    out = _to_cache(x.to(tl.float32), scale, buf_row.dtype.element_ty, HAS_SCALE, FP8)
    tl.store(buf_row + heads.to(tl.int64) * buf_head_stride + cols, out, mask=mask)


@triton.jit
def fused_qk_norm_rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, loc_ptr, q_w_ptr, k_w_ptr, cache_ptr, pos_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride,
    v_token_stride, v_head_stride,
    k_buf_row_stride, k_buf_head_stride, v_buf_row_stride, v_buf_head_stride, loc_stride,
    q_w_stride, k_w_stride, cache_row_stride, cache_col_stride, pos_stride,
    num_q_heads, num_k_heads, eps, k_scale, v_scale,
    D: tl.constexpr,  # q/k head size
    DV: tl.constexpr,  # v head size
    ROT: tl.constexpr,  # rotary_dim <= D
    HALF_PAD: tl.constexpr,  # next_pow2(ROT / 2)
    TAIL_PAD: tl.constexpr,  # next_pow2(max(D - ROT, 1))
    DV_PAD: tl.constexpr,  # next_pow2(DV)
    BLOCK_H: tl.constexpr,  # heads per block
    IS_NEOX: tl.constexpr,
    NORM: tl.constexpr,  # RMSNorm q and k per head first
    GEMMA: tl.constexpr,  # (1 + w) weights, one rounding
    STORE_KV: tl.constexpr,  # write k and v into the cache rows
    HAS_K_SCALE: tl.constexpr,
    HAS_V_SCALE: tl.constexpr,
    K_FP8: tl.constexpr,  # k_buffer is fp8 e4m3fn (passed as uint8)
    V_FP8: tl.constexpr,
    Q_ITERS: tl.constexpr,  # head blocks of q per program
    K_ITERS: tl.constexpr,  # head blocks of k (and v) per program
):
    HALF: tl.constexpr = ROT // 2
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    # cos/sin of this token, once for every head of q and k.
    pos = tl.load(pos_ptr + token * pos_stride).to(tl.int64)
    i = tl.arange(0, HALF_PAD)[None, :]
    row = cache_ptr + pos * cache_row_stride
    cos = tl.load(row + i * cache_col_stride, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + (HALF + i) * cache_col_stride, mask=i < HALF, other=0.0).to(tl.float32)
    if STORE_KV:
        slot = tl.load(loc_ptr + token * loc_stride).to(tl.int64)
        k_row = k_buf_ptr + slot * k_buf_row_stride
        v_row = v_buf_ptr + slot * v_buf_row_stride
    else:
        k_row = k_buf_ptr
        v_row = v_buf_ptr

    q_token = q_ptr + token * q_token_stride
    for j in tl.static_range(Q_ITERS):
        _head_block(q_token, q_head_stride, (split + j * num_splits) * BLOCK_H, num_q_heads,
                    cos, sin, q_w_ptr, q_w_stride, eps, k_row, 0, 1.0, D, ROT, HALF_PAD,
                    TAIL_PAD, BLOCK_H, IS_NEOX, NORM, GEMMA, False, False, False)
    k_token = k_ptr + token * k_token_stride
    v_token = v_ptr + token * v_token_stride
    for j in tl.static_range(K_ITERS):
        first = (split + j * num_splits) * BLOCK_H
        _head_block(k_token, k_head_stride, first, num_k_heads, cos, sin, k_w_ptr, k_w_stride,
                    eps, k_row, k_buf_head_stride, k_scale, D, ROT, HALF_PAD, TAIL_PAD,
                    BLOCK_H, IS_NEOX, NORM, GEMMA, STORE_KV, HAS_K_SCALE, K_FP8)
        if STORE_KV:
            _copy_v_block(v_token, v_head_stride, first, num_k_heads, v_row, v_buf_head_stride,
                          v_scale, DV, DV_PAD, BLOCK_H, HAS_V_SCALE, V_FP8)


# The kernel's runtime arguments, in its signature's order (a test checks it): the ten
# tensors, then the integers and floats. Everything else is a constexpr.
RUNTIME_ARGS = (
    "q_ptr", "k_ptr", "v_ptr", "k_buf_ptr", "v_buf_ptr", "loc_ptr", "q_w_ptr", "k_w_ptr",
    "cache_ptr", "pos_ptr",
    "q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
    "v_token_stride", "v_head_stride",
    "k_buf_row_stride", "k_buf_head_stride", "v_buf_row_stride", "v_buf_head_stride",
    "loc_stride", "q_w_stride", "k_w_stride", "cache_row_stride", "cache_col_stride",
    "pos_stride", "num_q_heads", "num_k_heads", "eps", "k_scale", "v_scale",
)
NUM_TENSOR_ARGS = 10

# Launch heuristics: as triton_kernel's (a tile of at most _MAX_TILE_ELEMS elements, fewer for
# few tokens; head splits until about _TARGET_PROGRAMS programs are in flight).
_MAX_TILE_ELEMS = 2048
_SMALL_TILE_ELEMS = 512
_SMALL_TOKENS = 256
_TARGET_PROGRAMS = 2048


class KVLaunchPlan(NamedTuple):
    """The one description of a launch: ``fused_qk_norm_rope_kv_kernel[grid](**args,
    **constexprs, **options)``."""

    grid: tuple[int, int]
    args: dict  # RUNTIME_ARGS -> value, in order
    constexprs: dict
    options: dict  # num_warps


def _cache_view(buf: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The buffer as the kernel writes it (fp8 as its uint8 bits), and whether it is fp8."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None and buf.dtype == fp8:
        return buf.view(torch.uint8), True
    return buf, False


def plan_launch(q, k, cos_sin_cache, positions, rotary_dim, is_neox, *, norm=None, kv=None,
                block_h=None, head_splits=None, num_warps=None) -> KVLaunchPlan:
    """Plan one launch for q ``[T, Hq, D]``, k ``[T, Hk, D]`` (arguments already validated).

    ``norm``: ``(q_weight, k_weight, eps, weight_offset)`` or None; ``kv``: ``(v, k_buffer,
    v_buffer, cache_loc, k_scale, v_scale)`` or None. ``block_h``, ``head_splits`` and
    ``num_warps`` override the heuristics (for benchmarks)."""
    num_tokens, num_q_heads, head_size = q.shape
    num_k_heads = k.shape[1]
    max_heads = max(num_q_heads, num_k_heads, 1)
    if kv is not None:
        v, k_buffer, v_buffer, cache_loc, k_scale, v_scale = kv
        k_buffer, k_fp8 = _cache_view(k_buffer)
        v_buffer, v_fp8 = _cache_view(v_buffer)
        v_dim = v.shape[2]
    else:  # placeholders, never read (STORE_KV is off)
        v = k_buffer = v_buffer = cache_loc = q
        k_scale = v_scale = None
        k_fp8 = v_fp8 = False
        v_dim = 1
    if norm is not None:
        q_weight, k_weight, eps, weight_offset = norm
    else:
        q_weight = k_weight = cos_sin_cache
        eps, weight_offset = 0.0, 0.0

    width = triton.next_power_of_2(max(head_size, v_dim))
    tile = _SMALL_TILE_ELEMS if num_tokens <= _SMALL_TOKENS else _MAX_TILE_ELEMS
    block_h = block_h or min(triton.next_power_of_2(max_heads), max(1, tile // width))
    head_blocks = triton.cdiv(max_heads, block_h)
    head_splits = head_splits or max(
        1, min(head_blocks, triton.cdiv(_TARGET_PROGRAMS, max(num_tokens, 1))))
    options = device_launch_options(q.device.type, block_h * width, q.element_size())
    if num_warps is not None:
        options["num_warps"] = num_warps

    values = (
        q, k, v, k_buffer, v_buffer, cache_loc, q_weight, k_weight, cos_sin_cache, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        cache_loc.stride(0), q_weight.stride(0), k_weight.stride(0),
        cos_sin_cache.stride(0), cos_sin_cache.stride(1), positions.stride(0),
        num_q_heads, num_k_heads, float(eps),
        1.0 if k_scale is None else float(k_scale), 1.0 if v_scale is None else float(v_scale),
    )
    constexprs = {
        "D": head_size,
        "DV": v_dim,
        "ROT": rotary_dim,
        "HALF_PAD": triton.next_power_of_2(rotary_dim // 2),
        "TAIL_PAD": triton.next_power_of_2(max(head_size - rotary_dim, 1)),
        "DV_PAD": triton.next_power_of_2(v_dim),
        "BLOCK_H": block_h,
        "IS_NEOX": bool(is_neox),
        "NORM": norm is not None,
        "GEMMA": float(weight_offset) == 1.0,
        "STORE_KV": kv is not None,
        "HAS_K_SCALE": k_scale is not None,
        "HAS_V_SCALE": v_scale is not None,
        "K_FP8": k_fp8,
        "V_FP8": v_fp8,
        "Q_ITERS": triton.cdiv(triton.cdiv(num_q_heads, block_h), head_splits),
        "K_ITERS": triton.cdiv(triton.cdiv(num_k_heads, block_h), head_splits),
    }
    return KVLaunchPlan((num_tokens, head_splits), dict(zip(RUNTIME_ARGS, values, strict=True)),
                        constexprs, options)


def launch(q, k, cos_sin_cache, positions, rotary_dim, is_neox, *, norm=None, kv=None,
           **overrides) -> None:
    """Norm (``norm``), rotate q and k in place and store k, v (``kv``) with one launch; see
    :func:`plan_launch`. Runs on CPU tensors only under the Triton interpreter."""
    if q.shape[0] == 0:
        return
    if q.device.type == "cpu" and not is_interpreter():
        raise RuntimeError(
            "rope_kv_store.launch: q is a CPU tensor; the Triton kernel runs on CPU tensors "
            "only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    plan = plan_launch(q, k, cos_sin_cache, positions, rotary_dim, is_neox, norm=norm, kv=kv,
                       **overrides)
    guard = contextlib.nullcontext()
    if q.device.type != "cpu":
        device_module = torch.get_device_module(q.device)
        if q.device.index != device_module.current_device():
            guard = device_module.device(q.device.index)  # Triton launches on the current one
    with guard:
        fused_qk_norm_rope_kv_kernel[plan.grid](**plan.args, **plan.constexprs, **plan.options)
