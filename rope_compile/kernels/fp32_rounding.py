"""Roundings and the square root the kernels need bit-exact, in fp32 and integer operations only.

Why not ``x.to(tl.bfloat16).to(tl.float32)`` and ``tl.sqrt_rn``: Intel's Triton backend
(triton-xpu 3.3) puts fast-math flags on every arith op, and MLIR then folds the round trip
``extf(truncf(x))`` into ``x``, so a rounding the math needs (HF Qwen3's norm, a model's bf16
tables, the k written to an fp8 cache) silently disappears; and it lowers fp32 ``sqrt_rn`` to a
double-precision software square root, which GPUs without fp64 (Arc A-series) cannot compile.
Both were found by the XPU lane (``tools/xpu_lane``, ``docs/xpu.md``).

Here a rounding is integer arithmetic on the bits (no floating-point identity can remove it),
and the square root takes the backend's fast ``tl.sqrt`` as a guess and picks the correctly
rounded neighbour by exact integer comparisons. Both are what IEEE-754 round-to-nearest-even
gives, so CUDA's results (``cvt.rn``, ``sqrt.rn``) are unchanged.
"""

from __future__ import annotations

import math
import struct

import triton
import triton.language as tl


def fp32_value(x):
    """A float kernel argument rounded to fp32 on the host (to nearest even; past the fp32
    range, inf): the value the kernel computes with whether the argument is typed fp32 or fp64
    (the kernels cast to fp32 first, which then changes nothing). Symbolic values (Inductor's)
    are returned as they are."""
    if not isinstance(x, int | float):
        return x
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # struct refuses what rounds past fp32's largest finite value
        return math.copysign(math.inf, x)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (bf16, fp16; fp32: unchanged) to nearest even, as fp32:
    ``x.to(dtype).to(tl.float32)`` in a form no folding removes."""
    if dtype == tl.bfloat16:
        return _round_bf16(x)
    elif dtype == tl.float16:
        return _round_fp16(x)
    else:
        return x


@triton.jit
def _round_bf16(x):
    bits = x.to(tl.int32, bitcast=True)
    # Round the low 16 bits away, ties to even; a carry moves into the exponent (up to inf).
    out = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, bits | 0x400000, out).to(tl.float32, bitcast=True)


@triton.jit
def _round_fp16(x):
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # Normal fp16 (from 2^-14): the mantissa to 10 bits, ties to even.
    normal = (mag + 0xFFF + ((mag >> 13) & 1)) & -8192
    # Below 2^-14, a multiple of 2^-24 (fp16's subnormal step): one fp32 add of 0.5 rounds the
    # value there, and its low bits count the steps.
    steps = (mag.to(tl.float32, bitcast=True) + 0.5).to(tl.int32, bitcast=True) - 0x3F000000
    sub = (steps.to(tl.float32) * 5.9604644775390625e-08).to(tl.int32, bitcast=True)
    out = tl.where(mag < (113 << 23), sub, normal)
    out = tl.where(mag >= 0x477FF000, 0x7F800000, out)  # from 65520: inf
    out = tl.where(mag > 0x7F800000, mag | 0x400000, out)  # NaN stays NaN
    return (out | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def sqrt_rn(x):
    """Correctly rounded fp32 ``sqrt(x)`` (IEEE-754, as CUDA's ``sqrt.rn``) for any fp32 x,
    without fp64: :func:`nearest_root` of the backend's ``tl.sqrt`` (an approximation on CUDA,
    fast-math on Intel). Subnormal x are scaled by 2^100 first (exactly), the root by 2^-50
    after; 0, negatives, inf and NaN take tl.sqrt's answer (the same)."""
    tiny = x < 1.1754943508222875e-38  # 2^-126
    xs = tl.where(tiny, x * 1.2676506002282294e30, x)  # 2^100
    y = tl.sqrt(xs)
    root = nearest_root(xs, y)
    root = tl.where(tiny, root * 8.881784197001252e-16, root)  # 2^-50
    xb = xs.to(tl.int32, bitcast=True)
    special = (xb <= 0) | (xb >= 0x7F800000)  # +-0, negative, inf, NaN
    return tl.where(special, y, root)


@triton.jit
def nearest_root(x, y):
    """The correctly rounded root of a positive normal fp32 ``x`` from a guess ``y`` at most 4
    ulps off: the float ``r`` with ``m(r - 1)^2 <= x < m(r)^2``, ``m(p)`` the midpoint above p,
    decided in int64. With x = mx * 2^(ex - 150) and p = mp * 2^(ep - 150) (24-bit
    mantissas), ``x >= m(p)^2`` iff ``mx * 2^(ex - 2 ep + 152) >= (2 mp + 1)^2`` (never equal:
    the right side is odd, the left even); r is y - 4 plus the count of candidates
    ``y - 4 .. y + 3`` (as bits) whose upper midpoint squared is at most x."""
    xb = x.to(tl.int32, bitcast=True)
    ex = (xb >> 23) & 0xFF
    mx = ((xb & 0x7FFFFF) | 0x800000).to(tl.int64)
    yb = y.to(tl.int32, bitcast=True)
    below = tl.zeros_like(yb)
    for j in tl.static_range(-4, 4):
        pb = yb + j
        mp = ((pb & 0x7FFFFF) | 0x800000).to(tl.int64)
        shift = tl.minimum(tl.maximum(ex - 2 * ((pb >> 23) & 0xFF) + 152, 0), 40)
        mid = 2 * mp + 1
        below += ((mx << shift.to(tl.int64)) >= mid * mid).to(tl.int32)
    return (yb - 4 + below).to(tl.float32, bitcast=True)
