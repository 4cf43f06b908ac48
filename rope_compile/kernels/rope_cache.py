"""The fused Q+K RoPE Triton kernel and its launcher (no op registration here).

One launch rotates both q and k in place. The same source serves CUDA and XPU (Triton's
Intel backend) and, with ``TRITON_INTERPRET=1``, CPU tensors through Triton's interpreter;
the device-specific launch choices live in :func:`device_launch_options` alone.

Shapes and strides (elements; only the last stride must be 1)::

    q      [T, Hq, >= ROT]   strides (q_token_stride, q_head_stride, 1)
    k      [T, Hk, >= ROT]   strides (k_token_stride, k_head_stride, 1)
    cache  [P, ROT]          strides (cache_row_stride, cache_col_stride) = cat(cos, sin),
                             P = num_positions
    pos    [T]               stride pos_stride, int32 or int64

Index rule (:func:`table_row`): row ``pos[t]``, or with WRAP_POSITIONS ``P + pos[t]`` for
``pos[t]`` in ``[-P, 0)`` (eager's ``cache[positions]``). A token whose row is outside
``[0, P)`` is left as it is: its cos/sin and its q and k rows are neither read nor written.

Math, per token t, head h and pair i < ROT/2, with c = cache[row(t), i] and
s = cache[row(t), ROT/2 + i]::

    neox  : (x1, x2) = (x[i], x[i + ROT/2])
    GPT-J : (x1, x2) = (x[2i], x[2i + 1])
    x1' = x1 * c - x2 * s
    x2' = x2 * c + x1 * s

computed in fp32 and rounded once to the tensor's dtype.

Grid: ``(T, HEAD_SPLITS)``. Program ``(t, s)`` loads the token's cos/sin row once, then does
head blocks ``s, s + HEAD_SPLITS, ...`` of q (``Q_ITERS`` of them) and then of k (``K_ITERS``),
each block a ``[BLOCK_H, ROT]`` tile.
Few tokens -> several programs per token for parallelism; many tokens -> one program per token,
so cos/sin are read once per token.
"""

from __future__ import annotations

import contextlib
import sys
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def table_row(index, num_rows, WRAP: tl.constexpr):
    """``(row, in_range)`` of an int64 ``index`` into a table of ``num_rows`` rows: the row is
    ``index``, or with WRAP ``num_rows + index`` for ``index`` in ``[-num_rows, 0)`` (eager
    indexing); ``in_range``: ``0 <= row < num_rows``. The caller masks every access of a row
    out of range, so no index makes a kernel read or write outside its tensors."""
    if WRAP:
        index = tl.where(index < 0, index + num_rows, index)
    return index, (index >= 0) & (index < num_rows)


@triton.jit
def _rotate_head_block(
    token_ptr,  # pointer to x[t, 0, 0]
    head_stride,
    first_head,
    num_heads,
    cos_a,  # [HALF_PAD] fp32: cos of each pair's first column a
    sin_a,  # [HALF_PAD] fp32
    cos_b,  # [HALF_PAD] fp32: cos of its second column b (cos_a again for one cos per pair)
    sin_b,  # [HALF_PAD] fp32
    ROT: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Rotate heads ``[first_head, first_head + BLOCK_H)`` of one token in place:
    ``x1' = x1 * cos_a - x2 * sin_a``, ``x2' = x2 * cos_b + x1 * sin_b`` (one cos/sin per pair:
    the callers pass ``cos_a`` as ``cos_b`` and ``sin_a`` as ``sin_b``, the same values)."""
    HALF: tl.constexpr = ROT // 2
    heads = first_head + tl.arange(0, BLOCK_H)
    # int64 so that huge head strides times head indices cannot overflow.
    rows = token_ptr + heads[:, None].to(tl.int64) * head_stride  # [BLOCK_H, 1]
    head_mask = heads[:, None] < num_heads
    if IS_NEOX:
        # Two contiguous half-rows: x1 = x[:HALF], x2 = x[HALF:ROT].
        cols = tl.arange(0, HALF_PAD)[None, :]
        mask = head_mask & (cols < HALF)
        x1 = tl.load(rows + cols, mask=mask).to(tl.float32)
        x2 = tl.load(rows + HALF + cols, mask=mask).to(tl.float32)
        out1 = x1 * cos_a[None, :] - x2 * sin_a[None, :]
        out2 = x2 * cos_b[None, :] + x1 * sin_b[None, :]
        dtype = token_ptr.dtype.element_ty
        tl.store(rows + cols, out1.to(dtype), mask=mask)
        tl.store(rows + HALF + cols, out2.to(dtype), mask=mask)
    else:
        # One contiguous row of ROT elements, split into (even, odd) pairs in registers, so the
        # global accesses stay wide instead of two stride-2 gathers.
        cols = tl.arange(0, 2 * HALF_PAD)[None, :]
        mask = head_mask & (cols < ROT)
        x = tl.load(rows + cols, mask=mask).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, HALF_PAD, 2)))
        out1 = x1 * cos_a[None, :] - x2 * sin_a[None, :]
        out2 = x2 * cos_b[None, :] + x1 * sin_b[None, :]
        out = tl.reshape(tl.join(out1, out2), (BLOCK_H, 2 * HALF_PAD))
        tl.store(rows + cols, out.to(token_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_qk_rope_kernel(
    q_ptr,
    k_ptr,
    cache_ptr,
    pos_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cache_row_stride,
    cache_col_stride,
    pos_stride,
    num_positions,  # P: the cache's rows
    num_q_heads,
    num_k_heads,
    ROT: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
    Q_ITERS: tl.constexpr,
    K_ITERS: tl.constexpr,
    WRAP_POSITIONS: tl.constexpr,  # positions in [-P, 0) are rows P + pos (else out of range)
):
    HALF: tl.constexpr = ROT // 2
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    # cos/sin of this token: loaded once, reused for every head of q and k. A position
    # outside the cache leaves the token as it is: no cos/sin read, no head of q or k.
    pos = tl.load(pos_ptr + token * pos_stride).to(tl.int64)
    pos, in_range = table_row(pos, num_positions, WRAP_POSITIONS)
    num_q_heads = tl.where(in_range, num_q_heads, 0)
    num_k_heads = tl.where(in_range, num_k_heads, 0)
    i = tl.arange(0, HALF_PAD)
    row = cache_ptr + pos * cache_row_stride
    # No column when out of range (not `& in_range`: Triton's interpreter refuses a mask of a
    # scalar and a vector predicate).
    cmask = i < tl.where(in_range, HALF, 0)
    cos = tl.load(row + i * cache_col_stride, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(row + (HALF + i) * cache_col_stride, mask=cmask, other=0.0).to(tl.float32)

    # Head blocks split, split + num_splits, ...; unrolled (the counts are compile-time), so
    # the loads of every block can be in flight together. Blocks past the last head are masked.
    q_token = q_ptr + token * q_token_stride
    for j in tl.static_range(Q_ITERS):
        _rotate_head_block(q_token, q_head_stride, (split + j * num_splits) * BLOCK_H,
                           num_q_heads, cos, sin, cos, sin, ROT, HALF_PAD, BLOCK_H,
                           IS_NEOX)
    k_token = k_ptr + token * k_token_stride
    for j in tl.static_range(K_ITERS):
        _rotate_head_block(k_token, k_head_stride, (split + j * num_splits) * BLOCK_H,
                           num_k_heads, cos, sin, cos, sin, ROT, HALF_PAD, BLOCK_H,
                           IS_NEOX)


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton's interpreter module needs NumPy, which an install does not bring: it is never
    imported here. ``@triton.jit`` imports it when the interpreter is on, so a kernel can be an
    ``InterpretedFunction`` only once that module is loaded."""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    return interpreter is not None and isinstance(fused_qk_rope_kernel,
                                                  interpreter.InterpretedFunction)


# Launch heuristics (from the H100 sweep in benchmarks/bench_op.py --sweep): a tile holds at
# most _MAX_TILE_ELEMS elements (_SMALL_TILE_ELEMS for few tokens, so more programs share the
# work), and programs per token are added until about _TARGET_PROGRAMS are in flight.
_MAX_TILE_ELEMS = 2048
_SMALL_TILE_ELEMS = 512
_SMALL_TOKENS = 256
_TARGET_PROGRAMS = 2048


def device_launch_options(device_type: str, tile_elems: int, elem_bytes: int,
                          vectors_per_lane: int = 1) -> dict:
    """The one place for device-specific launch options (warps per program).

    A warp moves 32 lanes x one 16-byte vector; ``vectors_per_lane`` vectors per lane per
    tile (1: the rotation alone; 2: kernels that also reduce over the tile, the QK-norm, where
    fewer warps with more work each measured faster: an H200 sweep of
    ``benchmarks/sweep_prologue_kernel.py``), 4 to 8 warps.
    Intel GPUs (``xpu``) map a Triton warp to a sub-group: sub-groups of 16 lanes, one vector
    per lane (``vectors_per_lane`` is CUDA's measurement), 4 to 8 of them. At 32 lanes ocloc
    reports register spills on PVC for the QK-norm kernels (122 bytes for the Qwen3 form in
    bf16, 4 warps); the XPU lane (``tools/xpu_lane``) fails on any PVC spill at these options.
    """
    lanes = 16 if device_type == "xpu" else 32
    if device_type == "xpu":
        vectors_per_lane = 1
    vec = max(1, 16 // elem_bytes) * max(1, vectors_per_lane)
    warps = max(4, min(8, triton.next_power_of_2(max(1, tile_elems // (lanes * vec)))))
    if device_type == "xpu":
        return {"num_warps": warps, "threads_per_warp": lanes}
    return {"num_warps": warps}


def choose_config(num_tokens: int, num_q_heads: int, num_k_heads: int, rotary_dim: int) -> dict:
    """Heads per program, programs per token (head splits) and tile size for a problem."""
    half_pad = triton.next_power_of_2(rotary_dim // 2)
    max_heads = max(num_q_heads, num_k_heads, 1)
    tile = _SMALL_TILE_ELEMS if num_tokens <= _SMALL_TOKENS else _MAX_TILE_ELEMS
    block_h = min(triton.next_power_of_2(max_heads), max(1, tile // (2 * half_pad)))
    head_blocks = triton.cdiv(max_heads, block_h)
    head_splits = max(1, min(head_blocks, triton.cdiv(_TARGET_PROGRAMS, max(num_tokens, 1))))
    return {"half_pad": half_pad, "block_h": block_h, "head_splits": head_splits}


# The kernel's runtime arguments, in its signature's order (a test checks it against the
# signature): the four tensors, then the integers. Everything else is a constexpr.
RUNTIME_ARGS = ("q_ptr", "k_ptr", "cache_ptr", "pos_ptr",
                "q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
                "cache_row_stride", "cache_col_stride", "pos_stride", "num_positions",
                "num_q_heads", "num_k_heads")


def runtime_args(q, k, cos_sin_cache, positions, *, q_stride, k_stride, cache_stride,
                 positions_stride, num_positions, num_q_heads, num_k_heads) -> dict:
    """``RUNTIME_ARGS`` -> value, in order. The tensors may be torch tensors or Inductor IR
    nodes (the lowering), so their strides, the cache's rows and head counts are passed in."""
    values = (q, k, cos_sin_cache, positions, q_stride[0], q_stride[1], k_stride[0],
              k_stride[1], cache_stride[0], cache_stride[1], positions_stride[0],
              num_positions, num_q_heads, num_k_heads)
    return dict(zip(RUNTIME_ARGS, values, strict=True))


class LaunchShape(NamedTuple):
    """How one launch is cut: ``grid = (num_tokens, head_splits)``, the constexprs and the
    options (warps). The one place that maps sizes to them (eager launch, fast path, Inductor
    lowering and benchmarks all build from :func:`launch_shape`)."""

    head_splits: int
    constexprs: dict
    options: dict


def launch_shape(num_tokens: int, num_q_heads: int, num_k_heads: int, rotary_dim: int,
                 is_neox: bool, device_type: str, elem_bytes: int, *,
                 wrap_positions: bool = False, block_h: int | None = None,
                 head_splits: int | None = None, num_warps: int | None = None) -> LaunchShape:
    """``num_tokens`` may be a hint (the lowering's symbolic token count);
    ``wrap_positions``: negative positions index from the cache's end (WRAP_POSITIONS);
    ``block_h``, ``head_splits`` and ``num_warps`` override the heuristics (for benchmarks)."""
    cfg = choose_config(num_tokens, num_q_heads, num_k_heads, rotary_dim)
    block_h = block_h or cfg["block_h"]
    head_splits = head_splits or cfg["head_splits"]
    options = device_launch_options(device_type, block_h * 2 * cfg["half_pad"], elem_bytes)
    if num_warps is not None:
        options["num_warps"] = num_warps
    constexprs = {
        "ROT": rotary_dim,
        "HALF_PAD": cfg["half_pad"],
        "BLOCK_H": block_h,
        "IS_NEOX": bool(is_neox),
        # Head blocks each program walks, for q and for k.
        "Q_ITERS": triton.cdiv(triton.cdiv(num_q_heads, block_h), head_splits),
        "K_ITERS": triton.cdiv(triton.cdiv(num_k_heads, block_h), head_splits),
        "WRAP_POSITIONS": bool(wrap_positions),
    }
    return LaunchShape(head_splits, constexprs, options)


class LaunchPlan(NamedTuple):
    """Everything one launch needs besides the four tensors: ``fused_qk_rope_kernel[grid](q, k,
    cos_sin_cache, positions, *ints, **constexprs, **options)``."""

    grid: tuple[int, int]
    ints: tuple[int, ...]  # the integer arguments, in the kernel's order
    constexprs: dict
    options: dict  # num_warps


def plan_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    *,
    wrap_positions: bool = False,
    block_h: int | None = None,
    head_splits: int | None = None,
    num_warps: int | None = None,
) -> LaunchPlan:
    """Grid, integer arguments, constexprs and options for q ``[T, Hq, D]``, k ``[T, Hk, D]``.
    ``wrap_positions``: as :func:`launch_shape`; ``block_h``, ``head_splits`` and
    ``num_warps`` override the heuristics (for benchmarks)."""
    num_tokens, num_q_heads, num_k_heads = q.shape[0], q.shape[1], k.shape[1]
    shape = launch_shape(num_tokens, num_q_heads, num_k_heads, rotary_dim, is_neox,
                         q.device.type, q.element_size(), wrap_positions=wrap_positions,
                         block_h=block_h, head_splits=head_splits, num_warps=num_warps)
    args = runtime_args(q, k, cos_sin_cache, positions, q_stride=q.stride(),
                        k_stride=k.stride(), cache_stride=cos_sin_cache.stride(),
                        positions_stride=positions.stride(),
                        num_positions=cos_sin_cache.shape[0], num_q_heads=num_q_heads,
                        num_k_heads=num_k_heads)
    ints = tuple(args.values())[4:]
    return LaunchPlan((num_tokens, shape.head_splits), ints, shape.constexprs, shape.options)


def launch_fused_qk_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    *,
    wrap_positions: bool = False,
    block_h: int | None = None,
    head_splits: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Rotate ``q[..., :rotary_dim]`` and ``k[..., :rotary_dim]`` in place with one launch.

    q is ``[T, Hq, D]`` and k ``[T, Hk, D]`` with ``D >= rotary_dim`` and last stride 1; arguments
    are assumed valid (the op layer validates; positions are not read on the host: a token
    whose position is outside the cache is left as it is, and with ``wrap_positions`` a
    position in ``[-P, 0)`` is row ``P + position``). Runs on CPU tensors only under the Triton
    interpreter, and on q's device whatever the current device is. ``block_h``, ``head_splits``
    and ``num_warps`` override the heuristics (for benchmarks).
    """
    if q.shape[0] == 0:
        return
    if q.device.type == "cpu" and not is_interpreter():
        raise RuntimeError(
            "launch_fused_qk_rope: q is a CPU tensor; the Triton kernel runs on CPU tensors only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
    plan = plan_launch(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                       wrap_positions=wrap_positions, block_h=block_h, head_splits=head_splits,
                       num_warps=num_warps)
    run_plan(plan, q, k, cos_sin_cache, positions)


def run_plan(plan: LaunchPlan, q, k, cos_sin_cache, positions):
    """Launch ``plan`` through Triton's JIT (compiling on first use) on q's device; returns the
    compiled kernel, which :mod:`rope_compile.fast_launch` relaunches (None under the
    interpreter)."""
    guard = contextlib.nullcontext()
    if q.device.type != "cpu":
        device_module = torch.get_device_module(q.device)
        if q.device.index != device_module.current_device():
            # Triton launches on the current device; a tensor on another one needs a guard.
            guard = device_module.device(q.device.index)
    with guard:
        return fused_qk_rope_kernel[plan.grid](q, k, cos_sin_cache, positions, *plan.ints,
                                               **plan.constexprs, **plan.options)
