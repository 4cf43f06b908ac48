"""QK-norm + RoPE + KV-cache store: one Triton kernel (constexpr switches) and its launcher.

One launch serves six ops (``rope_compile/ops.py``): RoPE + KV store, QK-norm + RoPE, and
QK-norm + RoPE + KV store, each with cos/sin from sglang's cache (``FROM_CACHE=True``) or from
a model's own per-token tables (``FROM_CACHE=False``, the source of
``rope_compile/kernels/rope_tables.py``). The same source runs on CUDA, XPU and, with
``TRITON_INTERPRET=1``, on CPU tensors through Triton's interpreter.

Shapes and strides (elements; the last stride of q, k, v and the buffers must be 1)::

    q         [T, Hq, D]         strides (q_token_stride, q_head_stride, 1)      rotated in place
    k         [T, Hk, D]         strides (k_token_stride, k_head_stride, 1)      rotated in place
    v         [T, Hk, DV]        strides (v_token_stride, v_head_stride, 1)      read (STORE_KV)
    k_buffer  [Bc, S, Hk, D]     strides (k_buf_batch_stride, k_buf_row_stride,
                                          k_buf_head_stride, 1)                   written rows
    v_buffer  [Bc, S, Hk, DV]    strides (v_buf_batch_stride, ...)                 written rows
              a 3-D [S, Hk, D] buffer is Bc = 1 with batch stride 0; HF's StaticCache key
              cache [B, Hk, L, D] is passed as .permute(0, 2, 1, 3): strides (Hk*L*D, D, L*D, 1)
    cache_loc [R_loc]            stride loc_stride, int32/int64, S = num_slots; R_loc
                                 (loc_rows) divides T, T / R_loc <= Bc (3-D buffers: R_loc = T)
    q_weight  [D] or [Hq*D]      stride q_w_stride (NORM; [Hq*D]: Q_WHOLE, element h*D + c)
    k_weight  [D] or [Hk*D]      stride k_w_stride (NORM; [Hk*D]: K_WHOLE)
    FROM_CACHE:
      cos, sin  the same [P, ROT] cache = cat(cos, sin), strides (cache_row, cache_col) for both,
                                 P = num_positions
      pos       [T]              stride pos_stride, int32/int64
    TABLES (FROM_CACHE=False):
      cos, sin  [R, ROT/2]       strides (cos_row_stride, cos_col_stride), (sin_...): any strides
                                 and float dtype (HF halves, freqs_cis pair picks, expanded rows);
                                 R (num_rows) divides T; pos never read

fp8 buffers are passed as their ``uint8`` view (K_FP8 / V_FP8): the kernel writes the bits.

Index rule (:func:`~rope_compile.kernels.rope_cache.table_row`): the cache row of token t is
``pos[t]`` and its buffer row (slot) ``cache_loc[t % R_loc]``, each wrapped from the end of
its table when negative in ``[-P, 0)`` / ``[-S, 0)`` with WRAP_POSITIONS / WRAP_LOC (eager's
``cache[positions]`` / ``k_buffer[loc] = k``). Out of range: a position outside ``[0, P)``
leaves the token as it is (q, k and its buffer rows neither read nor written); a slot outside
``[0, S)`` skips the token's store (q and k still normalised and rotated).

Math, per token t and head h of q and of k (fp32 throughout; ``round`` = to x's dtype)::

    NORM, r = rsqrt(mean(x^2) + eps), f = w (PLUS_ONE=False) or 1 + w (PLUS_ONE=True):
      twice (ROUND_ONCE=False):   x = round(f * round(x * r))   HF Qwen3 (f = w)
      once  (ROUND_ONCE=True):    x = round(x * r * f)          HF Gemma3 (f = 1 + w), OLMo2 (f = w)
        per head (weight [D]):          mean over x[t, h, :] (D elements), w = w[c]
        whole (Q_WHOLE / K_WHOLE, [H*D]): mean over x[t, :, :] (all H*D elements of the token's
                                        q, or k: HF OLMo2's q_norm / k_norm of the [.., H*D]
                                        projection), w = w[h*D + c]; the same r for every head
    RoPE on x[:ROT], pair i (neox: (i, i + ROT/2), GPT-J: (2i, 2i + 1)), with
        FROM_CACHE: c, s = cache[row(t), i], cache[row(t), ROT/2 + i]   (row(t): pos[t]'s row)
        TABLES:     c, s = cos[t % R, i], sin[t % R, i]
        x1' = x1 * c - x2 * s,  x2' = x2 * c + x1 * s      -> rounded once to x's dtype
    STORE_KV, b = t // R_loc, slot = the row of cache_loc[t % R_loc] (HF StaticCache.update:
    k [B, Hk, L, D] in (b, l) token order, cache_loc = cache_position, R_loc = L):
        k_buffer[b, slot, h] = cast(k'[t, h] / k_scale),  v_buffer[b, slot, h] =
        cast(v[t, h] / v_scale)  (k' = the rounded k just written; no division without a scale;
        cast = round to nearest even, fp8 e4m3fn saturating to +-448 as torch 2.13's ``.to``)

The norm's rounding mirrors HF transformers: ``Qwen3RMSNorm`` rounds the normalised value to
the input dtype before the weight multiply (``weight * hidden.to(input_dtype)``) and the product
to the (same) dtype; ``Gemma3RMSNorm`` multiplies by ``1 + weight.float()`` in fp32 and rounds
once; ``Olmo2RMSNorm`` multiplies by the weight promoted to fp32 and rounds once
(``(weight * hidden).to(input_dtype)``). The ops' ``weight_offset`` is PLUS_ONE, ``round_once``
(None: as the offset says) ROUND_ONCE (:func:`~rope_compile.reference.norm_rounds_once`); twice
with 1 + w is no HF form, the ops refuse it. Either way the normalised q/k is rounded to its
dtype before RoPE, as eager's separate norm output is. ``mean`` and ``rsqrt`` are correctly
rounded (``div_rn``, and :func:`~rope_compile.kernels.fp32_rounding.sqrt_rn`: no fp64); the
sum of squares may be added in another order than torch's. Each rounding to x's dtype that the
math computes on is :func:`~rope_compile.kernels.fp32_rounding.round_to` (integer, so no
fast-math folding removes it). eps and the scales are rounded to fp32 on the host
(:func:`~rope_compile.kernels.fp32_rounding.fp32_value`), so the kernel's float arguments are
the same whether Triton types them fp32 (eager) or Inductor fp64 (devices with fp64).

Grid: ``(T, HEAD_SPLITS)``. Program ``(t, s)`` loads the token's cos/sin row (and cache slot)
once, then does head blocks ``s, s + HEAD_SPLITS, ...`` of q (``Q_ITERS`` of them) and then of
k and v (``K_ITERS``), each block ``BLOCK_H`` whole heads. A whole-projection norm needs every
head of the token in one program: with Q_WHOLE or K_WHOLE, ``HEAD_SPLITS = 1`` and the program
first sums x^2 over all of q's (k's) head blocks, then normalises and rotates them block by block
(each row of q and k is read twice, the second time just after the first).

The launch is described once (:func:`plan_launch`, over :class:`Operand` sizes and strides):
the eager launcher passes tensors, the Inductor lowering (``rope_compile/inductor_lowering.py``)
IR nodes.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..reference import norm_rounds_once
from .fp32_rounding import fp32_value, round_to, sqrt_rn
from .rope_cache import device_launch_options, is_interpreter, table_row

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
def _norm(x, r, w, dtype: tl.constexpr, PLUS_ONE: tl.constexpr, ROUND_ONCE: tl.constexpr):
    """RMSNorm of fp32 ``x`` given ``r = rsqrt(mean(x^2) + eps)`` and fp32 weights ``w``, the
    factor ``f = w`` or (PLUS_ONE) ``1 + w``: ``round(x * r * f)`` (ROUND_ONCE: HF Gemma3RMSNorm,
    Olmo2RMSNorm) or ``round(f * round(x * r))`` (HF Qwen3RMSNorm); fp32 result."""
    if PLUS_ONE:
        w = 1.0 + w
    if ROUND_ONCE:
        return round_to(x * r * w, dtype)
    return round_to(round_to(x * r, dtype) * w, dtype)


@triton.jit
def _head_block(
    x_token,  # pointer to x[t, 0, 0]
    x_head_stride,
    first_head,
    num_heads,
    cos,  # [1, HALF_PAD] fp32
    sin,  # [1, HALF_PAD] fp32
    w_ptr,  # norm weight [D], or [H*D] (WHOLE) (NORM)
    w_stride,
    eps,
    r_whole,  # WHOLE: rsqrt(mean(x[t]^2) + eps) over all the token's heads (fp32 scalar)
    buf_row,  # pointer to buffer[loc[t], 0, 0] (STORE)
    buf_head_stride,
    store_heads,  # STORE: heads < store_heads are stored (0: the token's slot is out of range)
    scale,
    D: tl.constexpr,
    ROT: tl.constexpr,
    HALF_PAD: tl.constexpr,
    TAIL_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
    NORM: tl.constexpr,
    PLUS_ONE: tl.constexpr,  # the norm's factor is 1 + w (else w)
    ROUND_ONCE: tl.constexpr,  # the norm rounds once, after the factor (else before it too)
    WHOLE: tl.constexpr,  # the norm spans all heads (r_whole given, weight [H*D])
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
        if WHOLE:
            # One r for the token (all heads); head h's weights are w[h*D : h*D + D].
            r = r_whole
            w_first = heads * D  # [BLOCK_H, 1]
            cmask = pair_mask
            tmask = tail_mask
        else:
            ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)  # [BLOCK_H]
            if HAS_TAIL:
                ss += tl.sum(xt * xt, axis=1)
            r = tl.math.div_rn(1.0, sqrt_rn(tl.math.div_rn(ss, D) + eps))[:, None]
            w_first = 0
            cmask = i < HALF
            tmask = tcols < D
        w1 = tl.load(w_ptr + (w_first + c1) * w_stride, mask=cmask, other=0.0)
        w2 = tl.load(w_ptr + (w_first + c2) * w_stride, mask=cmask, other=0.0)
        x1 = _norm(x1, r, w1.to(tl.float32), dtype, PLUS_ONE, ROUND_ONCE)
        x2 = _norm(x2, r, w2.to(tl.float32), dtype, PLUS_ONE, ROUND_ONCE)
        if HAS_TAIL:
            wt = tl.load(w_ptr + (w_first + tcols) * w_stride, mask=tmask, other=0.0)
            xt = _norm(xt, r, wt.to(tl.float32), dtype, PLUS_ONE, ROUND_ONCE)
            tl.store(rows + tcols, xt.to(dtype), mask=tail_mask)

    # Rounded to x's dtype as fp32 (what is stored, and what the cache rows are made from).
    o1 = round_to(x1 * cos - x2 * sin, dtype)
    o2 = round_to(x2 * cos + x1 * sin, dtype)
    if IS_NEOX:
        tl.store(rows + c1, o1.to(dtype), mask=pair_mask)
        tl.store(rows + c2, o2.to(dtype), mask=pair_mask)
    else:
        tl.store(rows + j, tl.reshape(tl.join(o1, o2), (BLOCK_H, 2 * HALF_PAD)).to(dtype),
                 mask=row_mask)

    if STORE:
        # The cache row gets the k just written (rounded to k's dtype), divided and cast.
        out_ty: tl.constexpr = buf_row.dtype.element_ty
        stored = heads < store_heads
        brow = buf_row + heads.to(tl.int64) * buf_head_stride
        tl.store(brow + c1, _to_cache(o1, scale, out_ty, HAS_SCALE, FP8),
                 mask=pair_mask & stored)
        tl.store(brow + c2, _to_cache(o2, scale, out_ty, HAS_SCALE, FP8),
                 mask=pair_mask & stored)
        if HAS_TAIL:
            tl.store(brow + tcols, _to_cache(xt, scale, out_ty, HAS_SCALE, FP8),
                     mask=tail_mask & stored)


@triton.jit
def _whole_rsqrt(x_token, x_head_stride, num_heads, eps, D: tl.constexpr, ROT: tl.constexpr,
                 HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                 ITERS: tl.constexpr):
    """``rsqrt(mean(x[t]^2) + eps)`` over all ``num_heads * D`` elements of one token's
    x ``[H, D]`` (``ITERS`` blocks of ``BLOCK_H`` heads, the program's all): fp32 scalar."""
    ss = 0.0
    j = tl.arange(0, 2 * HALF_PAD)[None, :]  # x[:ROT] as one padded row
    tcols = ROT + tl.arange(0, TAIL_PAD)[None, :]  # x[ROT:D]
    for it in tl.static_range(ITERS):
        heads = it * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
        head_mask = heads < num_heads
        rows = x_token + heads.to(tl.int64) * x_head_stride
        x = tl.load(rows + j, mask=head_mask & (j < ROT), other=0.0).to(tl.float32)
        ss += tl.sum(x * x)
        if D > ROT:
            xt = tl.load(rows + tcols, mask=head_mask & (tcols < D), other=0.0).to(tl.float32)
            ss += tl.sum(xt * xt)
    count = tl.cast(num_heads * D, tl.float32)
    return tl.math.div_rn(1.0, sqrt_rn(tl.math.div_rn(ss, count) + eps))


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
    q_ptr, k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, loc_ptr, q_w_ptr, k_w_ptr,
    cos_ptr,  # FROM_CACHE: the cache [P, ROT]; TABLES: cos [R, ROT/2]
    sin_ptr,  # FROM_CACHE: the cache again; TABLES: sin [R, ROT/2]
    pos_ptr,  # FROM_CACHE: positions [T]; TABLES: never read
    q_token_stride, q_head_stride, k_token_stride, k_head_stride,
    v_token_stride, v_head_stride,
    k_buf_batch_stride, k_buf_row_stride, k_buf_head_stride,
    v_buf_batch_stride, v_buf_row_stride, v_buf_head_stride,
    loc_stride,
    loc_rows,  # R_loc: token t writes buffer batch t // R_loc, row cache_loc[t % R_loc]
    q_w_stride, k_w_stride,
    cos_row_stride, cos_col_stride, sin_row_stride, sin_col_stride, pos_stride,
    num_rows,  # TABLES: R, token t reads row t % R; FROM_CACHE: unused
    num_positions,  # FROM_CACHE: P, the cache's rows; TABLES: unused
    num_slots,  # STORE_KV: S, the buffers' rows
    num_q_heads, num_k_heads, eps, k_scale, v_scale,
    D: tl.constexpr,  # q/k head size
    DV: tl.constexpr,  # v head size
    ROT: tl.constexpr,  # rotary_dim <= D
    HALF_PAD: tl.constexpr,  # next_pow2(ROT / 2)
    TAIL_PAD: tl.constexpr,  # next_pow2(max(D - ROT, 1))
    DV_PAD: tl.constexpr,  # next_pow2(DV)
    BLOCK_H: tl.constexpr,  # heads per block
    IS_NEOX: tl.constexpr,
    FROM_CACHE: tl.constexpr,  # cos/sin from cache rows pos[t] (else table rows t % R)
    NORM: tl.constexpr,  # RMSNorm q and k first (per head, or Q_WHOLE / K_WHOLE)
    PLUS_ONE: tl.constexpr,  # weight_offset 1.0: the norm's factor is 1 + w (Gemma)
    ROUND_ONCE: tl.constexpr,  # the norm rounds once, after the factor (Gemma, OLMo2; else Qwen3)
    Q_WHOLE: tl.constexpr,  # q's norm spans all Hq heads (q_weight [Hq*D]; HEAD_SPLITS = 1)
    K_WHOLE: tl.constexpr,  # k's norm spans all Hk heads (k_weight [Hk*D]; HEAD_SPLITS = 1)
    STORE_KV: tl.constexpr,  # write k and v into the cache rows
    HAS_K_SCALE: tl.constexpr,
    HAS_V_SCALE: tl.constexpr,
    K_FP8: tl.constexpr,  # k_buffer is fp8 e4m3fn (passed as uint8)
    V_FP8: tl.constexpr,
    Q_ITERS: tl.constexpr,  # head blocks of q per program
    K_ITERS: tl.constexpr,  # head blocks of k (and v) per program
    WRAP_POSITIONS: tl.constexpr,  # FROM_CACHE: positions in [-P, 0) are rows P + pos
    WRAP_LOC: tl.constexpr,  # STORE_KV: cache_loc in [-S, 0) is slot S + loc
):
    HALF: tl.constexpr = ROT // 2
    # Float arguments may arrive as fp64 scalars (Inductor's launcher types Python floats so):
    # the math, and div_rn/sqrt_rn, are fp32.
    eps = tl.cast(eps, tl.float32)
    k_scale = tl.cast(k_scale, tl.float32)
    v_scale = tl.cast(v_scale, tl.float32)
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    # cos/sin of this token, once for every head of q and k: [1, HALF_PAD] each.
    i = tl.arange(0, HALF_PAD)[None, :]
    # The heads this program rotates and stores: none for a token left as it is.
    q_heads = num_q_heads
    k_heads = num_k_heads
    cmask = i < HALF
    if FROM_CACHE:
        pos = tl.load(pos_ptr + token * pos_stride).to(tl.int64)
        # A position outside the cache: the token is left as it is (q, k, its buffer rows).
        pos, pos_ok = table_row(pos, num_positions, WRAP_POSITIONS)
        q_heads = tl.where(pos_ok, num_q_heads, 0)
        k_heads = tl.where(pos_ok, num_k_heads, 0)
        cmask = i < tl.where(pos_ok, HALF, 0)
        cos_row = cos_ptr + pos * cos_row_stride
        sin_row = sin_ptr + pos * sin_row_stride + HALF * sin_col_stride
    else:
        row = token % num_rows
        cos_row = cos_ptr + row * cos_row_stride
        sin_row = sin_ptr + row * sin_row_stride
    cos = tl.load(cos_row + i * cos_col_stride, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_row + i * sin_col_stride, mask=cmask, other=0.0).to(tl.float32)
    store_heads = 0
    if STORE_KV:
        # Buffer batch t // R_loc, row cache_loc[t % R_loc] (a 3-D buffer: batch stride 0); a
        # slot outside the buffers: nothing stored for this token.
        batch = token // loc_rows
        slot = tl.load(loc_ptr + (token % loc_rows) * loc_stride).to(tl.int64)
        slot, slot_ok = table_row(slot, num_slots, WRAP_LOC)
        store_heads = tl.where(slot_ok, k_heads, 0)
        k_row = k_buf_ptr + batch * k_buf_batch_stride + slot * k_buf_row_stride
        v_row = v_buf_ptr + batch * v_buf_batch_stride + slot * v_buf_row_stride
    else:
        k_row = k_buf_ptr
        v_row = v_buf_ptr

    q_token = q_ptr + token * q_token_stride
    k_token = k_ptr + token * k_token_stride
    v_token = v_ptr + token * v_token_stride
    # Whole-projection norms: the token's r over all its heads first (this program has them all).
    q_r = 0.0
    k_r = 0.0
    if Q_WHOLE:
        q_r = _whole_rsqrt(q_token, q_head_stride, num_q_heads, eps, D, ROT, HALF_PAD, TAIL_PAD,
                           BLOCK_H, Q_ITERS)
    if K_WHOLE:
        k_r = _whole_rsqrt(k_token, k_head_stride, num_k_heads, eps, D, ROT, HALF_PAD, TAIL_PAD,
                           BLOCK_H, K_ITERS)
    for j in tl.static_range(Q_ITERS):
        _head_block(q_token, q_head_stride, (split + j * num_splits) * BLOCK_H, q_heads,
                    cos, sin, q_w_ptr, q_w_stride, eps, q_r, k_row, 0, 0, 1.0, D, ROT,
                    HALF_PAD, TAIL_PAD, BLOCK_H, IS_NEOX, NORM, PLUS_ONE, ROUND_ONCE, Q_WHOLE,
                    False, False, False)
    for j in tl.static_range(K_ITERS):
        first = (split + j * num_splits) * BLOCK_H
        _head_block(k_token, k_head_stride, first, k_heads, cos, sin, k_w_ptr, k_w_stride,
                    eps, k_r, k_row, k_buf_head_stride, store_heads, k_scale, D, ROT, HALF_PAD,
                    TAIL_PAD, BLOCK_H, IS_NEOX, NORM, PLUS_ONE, ROUND_ONCE, K_WHOLE, STORE_KV,
                    HAS_K_SCALE, K_FP8)
        if STORE_KV:
            _copy_v_block(v_token, v_head_stride, first, store_heads, v_row, v_buf_head_stride,
                          v_scale, DV, DV_PAD, BLOCK_H, HAS_V_SCALE, V_FP8)


# ---------------------------------------------------------------------------------------------
# The one description of a launch: runtime arguments (in the signature's order, a test checks
# it: the eleven tensors, then the integers and floats; everything else is a constexpr), the
# constexprs and the grid. The eager launcher passes tensors, the Inductor lowering IR nodes.

RUNTIME_ARGS = (
    "q_ptr", "k_ptr", "v_ptr", "k_buf_ptr", "v_buf_ptr", "loc_ptr", "q_w_ptr", "k_w_ptr",
    "cos_ptr", "sin_ptr", "pos_ptr",
    "q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
    "v_token_stride", "v_head_stride",
    "k_buf_batch_stride", "k_buf_row_stride", "k_buf_head_stride",
    "v_buf_batch_stride", "v_buf_row_stride", "v_buf_head_stride",
    "loc_stride", "loc_rows", "q_w_stride", "k_w_stride",
    "cos_row_stride", "cos_col_stride", "sin_row_stride", "sin_col_stride", "pos_stride",
    "num_rows", "num_positions", "num_slots", "num_q_heads", "num_k_heads", "eps", "k_scale",
    "v_scale",
)
NUM_TENSOR_ARGS = 11

# Launch heuristics: as rope_cache's (a tile of at most _MAX_TILE_ELEMS elements, fewer for
# few tokens; head splits until about _TARGET_PROGRAMS programs are in flight). A whole-
# projection norm has one program per token (no head splits): with few tokens a larger tile,
# all of a token's heads in one block where they fit in _WHOLE_TILE_ELEMS, so the program does
# not walk its heads in many small blocks one after another (a sweep of BLOCK_H on an H200
# chose it; the kernel is latency-bound there).
_MAX_TILE_ELEMS = 2048
_SMALL_TILE_ELEMS = 512
_WHOLE_TILE_ELEMS = 4096
_SMALL_TOKENS = 256
_TARGET_PROGRAMS = 2048


class Operand(NamedTuple):
    """A kernel tensor argument: what is passed (a tensor, or an Inductor IR node), its sizes
    and its strides (elements)."""

    ptr: object
    size: tuple
    stride: tuple


def tensor_operand(x: torch.Tensor) -> Operand:
    return Operand(x, tuple(x.shape), tuple(x.stride()))


class FromCache(NamedTuple):
    """cos/sin from sglang's cache ``[P, ROT]`` = cat(cos, sin), row ``positions[t]``."""

    cache: Operand
    positions: Operand


class FromTables(NamedTuple):
    """cos/sin from a model's own tables ``[R, ROT/2]``, row ``t % R``."""

    cos: Operand
    sin: Operand


class KVLaunchPlan(NamedTuple):
    """``fused_qk_norm_rope_kv_kernel[grid](**args, **constexprs, **options)``."""

    grid: tuple  # (T, head_splits); T may be symbolic (the lowering)
    args: dict  # RUNTIME_ARGS -> value, in order
    constexprs: dict
    options: dict  # num_warps


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == getattr(torch, "float8_e4m3fn", None)


def _buffer_strides(buf: Operand) -> tuple:
    """(batch, row, head) strides of a ``[S, H, D]`` (batch stride 0) or ``[Bc, S, H, D]``
    buffer."""
    return (0, *buf.stride[:2]) if len(buf.size) == 3 else tuple(buf.stride[:3])


def plan_launch(q: Operand, k: Operand, rope, rotary_dim, is_neox, *, norm=None, kv=None,
                fp8=(False, False), device_type, elem_bytes, wrap_positions=False,
                wrap_loc=True, num_tokens_hint=None, block_h=None, head_splits=None,
                num_warps=None) -> KVLaunchPlan:
    """Plan one launch for q ``[T, Hq, D]``, k ``[T, Hk, D]`` (arguments already validated).

    ``rope``: :class:`FromCache` or :class:`FromTables`; ``norm``: ``(q_weight, k_weight, eps,
    weight_offset[, round_once])`` or None (the ops' arguments: PLUS_ONE, ROUND_ONCE), a weight
    ``[D]`` per head or ``[H*D]`` over the whole projection (then one program per token:
    ``head_splits`` is 1 whatever is asked); ``kv``: ``(v,
    k_buffer, v_buffer, cache_loc, k_scale, v_scale)`` or None (tensors as :class:`Operand`;
    fp8 buffers as their uint8 views, ``fp8`` saying which). ``wrap_positions`` /
    ``wrap_loc``: negative positions / cache_loc index from the end of the cos/sin cache / of
    the buffers (WRAP_POSITIONS, WRAP_LOC). ``num_tokens_hint``: a concrete T for the
    heuristics when ``q.size[0]`` is symbolic. ``block_h``, ``head_splits`` and ``num_warps``
    override the heuristics (benchmarks)."""
    num_tokens = q.size[0]
    num_q_heads, head_size, num_k_heads = int(q.size[1]), int(q.size[2]), int(k.size[1])
    tokens = num_tokens if num_tokens_hint is None else num_tokens_hint
    max_heads = max(num_q_heads, num_k_heads, 1)
    if kv is not None:
        v, k_buffer, v_buffer, cache_loc, k_scale, v_scale = kv
        v_dim, loc_rows = int(v.size[2]), cache_loc.size[0]
    else:  # placeholders, never read (STORE_KV is off)
        v = k_buffer = v_buffer = cache_loc = Operand(q.ptr, (0, 0, 0), (0, 0, 0))
        k_scale = v_scale = None
        v_dim, loc_rows = 1, 1
        fp8 = (False, False)
    if isinstance(rope, FromCache):
        cos = sin = rope.cache
        positions, num_rows, num_positions = rope.positions, 1, rope.cache.size[0]
    else:
        cos, sin = rope
        positions, num_rows = Operand(cos.ptr, (0,), (0,)), cos.size[0]  # never read
        num_positions = 0
    if norm is not None:
        q_weight, k_weight, eps, weight_offset, round_once = (*norm, None)[:5]
        # [H*D] (H > 1): one norm over the token's heads; [D]: per head (the same when H = 1).
        q_whole = int(q_weight.size[0]) != head_size
        k_whole = int(k_weight.size[0]) != head_size
    else:
        q_weight = k_weight = Operand(cos.ptr, (0,), (0,))  # never read
        eps, weight_offset, round_once = 0.0, 0.0, None
        q_whole = k_whole = False

    width = triton.next_power_of_2(max(head_size, v_dim))
    tile = _SMALL_TILE_ELEMS if tokens <= _SMALL_TOKENS else _MAX_TILE_ELEMS
    if (q_whole or k_whole) and tokens <= _SMALL_TOKENS:
        tile = _WHOLE_TILE_ELEMS
    block_h = block_h or min(triton.next_power_of_2(max_heads), max(1, tile // width))
    head_blocks = triton.cdiv(max_heads, block_h)
    head_splits = head_splits or max(
        1, min(head_blocks, triton.cdiv(_TARGET_PROGRAMS, max(tokens, 1))))
    if q_whole or k_whole:
        head_splits = 1  # a whole-projection norm reads all of the token's heads in one program
    # The norm reduces over each head before it rotates: two vectors per lane (4 warps for a
    # 2048-element tile, not 8) measured about 7% faster at 4096 tokens on an H200
    # (benchmarks/results/sweep_prologue_h200.md); the rotation alone keeps one.
    options = device_launch_options(device_type, block_h * width, elem_bytes,
                                    vectors_per_lane=2 if norm is not None else 1)
    if num_warps is not None:
        options["num_warps"] = num_warps

    values = (
        q.ptr, k.ptr, v.ptr, k_buffer.ptr, v_buffer.ptr, cache_loc.ptr, q_weight.ptr,
        k_weight.ptr, cos.ptr, sin.ptr, positions.ptr,
        q.stride[0], q.stride[1], k.stride[0], k.stride[1], v.stride[0], v.stride[1],
        *_buffer_strides(k_buffer), *_buffer_strides(v_buffer),
        cache_loc.stride[0], loc_rows, q_weight.stride[0], k_weight.stride[0],
        cos.stride[0], cos.stride[1], sin.stride[0], sin.stride[1], positions.stride[0],
        num_rows, num_positions, k_buffer.size[-3], num_q_heads, num_k_heads, fp32_value(eps),
        1.0 if k_scale is None else fp32_value(k_scale),
        1.0 if v_scale is None else fp32_value(v_scale),
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
        "FROM_CACHE": isinstance(rope, FromCache),
        "NORM": norm is not None,
        "PLUS_ONE": float(weight_offset) == 1.0,
        "ROUND_ONCE": norm_rounds_once(weight_offset, round_once),
        "Q_WHOLE": q_whole,
        "K_WHOLE": k_whole,
        "STORE_KV": kv is not None,
        "HAS_K_SCALE": k_scale is not None,
        "HAS_V_SCALE": v_scale is not None,
        "K_FP8": bool(fp8[0]),
        "V_FP8": bool(fp8[1]),
        "Q_ITERS": triton.cdiv(triton.cdiv(num_q_heads, block_h), head_splits),
        "K_ITERS": triton.cdiv(triton.cdiv(num_k_heads, block_h), head_splits),
        "WRAP_POSITIONS": bool(wrap_positions) and isinstance(rope, FromCache),
        "WRAP_LOC": bool(wrap_loc) and kv is not None,
    }
    return KVLaunchPlan((num_tokens, head_splits),
                        dict(zip(RUNTIME_ARGS, values, strict=True)), constexprs, options)


def _cache_view(buf: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The buffer as the kernel writes it (fp8 as its uint8 bits), and whether it is fp8."""
    if is_fp8(buf.dtype):
        return buf.view(torch.uint8), True
    return buf, False


def plan_tensor_launch(q, k, rope, rotary_dim, is_neox, *, norm=None, kv=None,
                       **overrides) -> KVLaunchPlan:
    """:func:`plan_launch` for torch tensors: ``rope`` is ``FromCache(cache, positions)`` or
    ``FromTables(cos, sin)`` of tensors; ``norm`` / ``kv`` as there, of tensors."""
    fp8 = (False, False)
    if kv is not None:
        v, k_buffer, v_buffer, cache_loc, k_scale, v_scale = kv
        (k_buffer, k_fp8), (v_buffer, v_fp8) = _cache_view(k_buffer), _cache_view(v_buffer)
        fp8 = (k_fp8, v_fp8)
        kv = (*(tensor_operand(x) for x in (v, k_buffer, v_buffer, cache_loc)), k_scale, v_scale)
    if norm is not None:
        norm = (tensor_operand(norm[0]), tensor_operand(norm[1]), *norm[2:])
    rope = type(rope)(*(tensor_operand(x) for x in rope))
    return plan_launch(tensor_operand(q), tensor_operand(k), rope, rotary_dim, is_neox,
                       norm=norm, kv=kv, fp8=fp8, device_type=q.device.type,
                       elem_bytes=q.element_size(), **overrides)


def _launch(q, k, rope, rotary_dim, is_neox, norm, kv, overrides) -> None:
    if q.shape[0] == 0:
        return
    if q.device.type == "cpu" and not is_interpreter():
        raise RuntimeError(
            "rope_kv_store.launch: q is a CPU tensor; the Triton kernel runs on CPU tensors "
            "only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    plan = plan_tensor_launch(q, k, rope, rotary_dim, is_neox, norm=norm, kv=kv, **overrides)
    guard = contextlib.nullcontext()
    if q.device.type != "cpu":
        device_module = torch.get_device_module(q.device)
        if q.device.index != device_module.current_device():
            guard = device_module.device(q.device.index)  # Triton launches on the current one
    with guard:
        fused_qk_norm_rope_kv_kernel[plan.grid](**plan.args, **plan.constexprs, **plan.options)


def launch(q, k, cos_sin_cache, positions, rotary_dim, is_neox, *, norm=None, kv=None,
           **overrides) -> None:
    """Norm (``norm``), rotate q and k in place by cache rows ``positions`` and store k, v
    (``kv``) with one launch; see :func:`plan_launch` (``overrides``: its ``wrap_positions``,
    ``wrap_loc`` and launch overrides). Indices are not read on the host: out-of-range ones
    skip their rows (the module docstring's index rule). Runs on CPU tensors only under the
    Triton interpreter."""
    _launch(q, k, FromCache(cos_sin_cache, positions), rotary_dim, is_neox, norm, kv, overrides)


def launch_tables(q, k, cos, sin, rotary_dim, is_neox, *, norm=None, kv=None,
                  **overrides) -> None:
    """:func:`launch` with token t rotated by row ``t % R`` of cos/sin ``[R, rotary_dim/2]``."""
    _launch(q, k, FromTables(cos, sin), rotary_dim, is_neox, norm, kv, overrides)
