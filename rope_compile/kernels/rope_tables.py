"""Fused Q+K RoPE reading per-token cos/sin tables, the angles they are computed from, or a
cache through multi-row positions (mRoPE), and its launcher (no op registration here).

One launch rotates both q and k in place, as :mod:`rope_compile.kernels.rope_cache` does, but the
cos/sin of a token come from one of three sources, chosen by the constexprs ``FROM_CACHE`` and
``FROM_ANGLES``:

* TABLES (``FROM_CACHE=False``): the model's own tables, e.g. HF transformers' ``cos``/``sin``
  halves or gpt-fast's ``freqs_cis[..., 0]``/``[..., 1]``; token ``t`` reads row ``t % R``
  (a table broadcast over the batch has ``R = seq_len`` rows while ``T = batch * seq_len``).
  No ``[T, ROT]`` cache and no ``arange(T)`` positions are built. Two table forms, by the
  tables' last dim (the constexpr ``FULL_TABLES``): pair tables ``ROT/2`` wide (one cos and
  one sin per pair) or full tables ``ROT`` wide (one per rotated feature: HF's whole
  ``cos``/``sin``, exact even when their halves differ, as for tables that are graph inputs).
* ANGLES (``FROM_ANGLES=True``): the angles HF's rotary module takes cos/sin of (``freqs =
  inv_freq (x) positions``, fp32, ``[R, ROT/2]``), row ``t % R`` as for TABLES; cos/sin are
  computed here exactly as the model's elementwise chain ``(cos(freqs) * attention_scaling)
  .to(dtype)`` computes its table (which Inductor would otherwise materialise in a kernel of
  its own), so that no table is built.
* CACHE (``FROM_CACHE=True``): sglang's ``cos_sin_cache`` with one row of positions per stream
  (Qwen2-VL's multimodal RoPE: temporal, height and width positions).

Shapes and strides (elements; only the last stride of q and k must be 1)::

    q          [T, Hq, >= ROT]     strides (q_token_stride, q_head_stride, 1)
    k          [T, Hk, >= ROT]     strides (k_token_stride, k_head_stride, 1)
    TABLES:
      cos      [S, R, W]           strides (cos_stream_stride, cos_row_stride, cos_col_stride)
      sin      [S, R, W]           strides (sin_stream_stride, sin_row_stride, sin_col_stride)
                                   W = ROT/2 (pair tables) or ROT (full tables, FULL_TABLES);
                                   any strides: a [:, :ROT/2] slice, a (cos, sin) pair pick of
                                   [R, ROT/2, 2] (column stride 2), an expanded row (stride 0)
      pos      unused (any pointer), R = num_rows divides T
    ANGLES:
      cos, sin the same angles [S, R, ROT/2], fp32, strides (cos_stream_stride, cos_row_stride,
               cos_col_stride) for both (any strides: HF's freqs is a transposed mm output)
      pos      unused (any pointer), R = num_rows divides T
    CACHE:
      cos, sin the same [P, ROT] cache = cat(cos, sin), strides (0, row, col) for both,
               P = num_positions
      pos      [S, T]              strides (pos_stream_stride, pos_token_stride), int32/int64;
                                   row(st, t) = pos[st, t], or with WRAP_POSITIONS P + pos for
                                   pos in [-P, 0) (:func:`.rope_cache.table_row`)

CACHE: a token with a row outside ``[0, P)`` in any of its S streams is left as it is (no
cos/sin read, no head of q or k read or written).

S (``NUM_STREAMS``) is 1 or 3. The stream of pair column ``i`` is 0 with one stream; with three
(mRoPE sections ``(s0, s1, s2)``, ``s0 + s1 + s2 = ROT/2``) it is 0 for ``i < s0``
(``SECTION_1_START``), 1 for ``i < s0 + s1`` (``SECTION_2_START``) and 2 after.

Math, per token t, head h and pair i < ROT/2, with st = stream(i)::

    neox  : (a, b) = (i, i + ROT/2)               GPT-J : (a, b) = (2i, 2i + 1)
    (x1, x2) = (x[a], x[b])
    pair TABLES: c1 = c2 = cos[st, t % R, i]      s1 = s2 = sin[st, t % R, i]
    full TABLES: c1 = cos[st, t % R, a]           s1 = sin[st, t % R, a]
                 c2 = cos[st, t % R, b]           s2 = sin[st, t % R, b]
    ANGLES     : c1 = c2 = round(cos(A) * cos_scale)  s1 = s2 = round(sin(A) * sin_scale)
                 with A = angles[st, t % R, i], cos/sin and * in fp32 (tl.cos / tl.sin: what
                 Inductor's code for that chain uses), round = to TABLE_DTYPE and back (the
                 dtype the model casts its table to; fp32: no rounding)
    CACHE      : c1 = c2 = cache[row(st, t), i]   s1 = s2 = cache[row(st, t), ROT/2 + i]
    x1' = x1 * c1 - x2 * s1
    x2' = x2 * c2 + x1 * s2

computed in fp32 and rounded once to the tensor's dtype (the tables may have another dtype).
Full tables are HF's ``x * cos + rotate_half(x) * sin`` (neox) and ``x * cos +
rotate_every_two(x) * sin`` (GPT-J) for any cos/sin; with equal halves (equal pair columns)
they are the pair-table math. The stream of both columns of pair i is stream(i).

Grid: ``(T, HEAD_SPLITS)``, cut as :func:`rope_compile.kernels.rope_cache.launch_shape` cuts the
first kernel's: program ``(t, s)`` loads the token's ROT/2 cos and sin once (full tables: the
ROT/2 of columns a and the ROT/2 of columns b of each), then rotates head blocks ``s, s +
HEAD_SPLITS, ...`` of q (``Q_ITERS``) and of k (``K_ITERS``), each a ``[BLOCK_H, ROT]`` tile
(the first kernel's ``_rotate_head_block``, one cos/sin per feature column).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .fp32_rounding import fp32_value, round_to
from .rope_cache import (
    LaunchShape,
    _rotate_head_block,  # the shared [BLOCK_H, ROT] tile rotation
    is_interpreter,
    table_row,
)
from .rope_cache import launch_shape as head_launch_shape


@triton.jit
def fused_qk_rope_tables_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,  # TABLES: cos [S, R, ROT/2] (or [S, R, ROT]: FULL_TABLES); CACHE: the cache [P, ROT]
    sin_ptr,  # TABLES: sin [S, R, ROT/2] (or [S, R, ROT]: FULL_TABLES); CACHE: the cache again
    #           ANGLES: cos_ptr = sin_ptr = the angles [S, R, ROT/2] (read through cos_ptr)
    pos_ptr,  # CACHE: positions [S, T]; TABLES, ANGLES: never read
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cos_stream_stride,
    cos_row_stride,
    cos_col_stride,
    sin_stream_stride,
    sin_row_stride,
    sin_col_stride,
    pos_stream_stride,
    pos_token_stride,
    num_rows,  # TABLES, ANGLES: R, token t reads row t % R; CACHE: unused
    num_positions,  # CACHE: P, the cache's rows; else unused
    num_q_heads,
    num_k_heads,
    cos_scale,  # ANGLES: the factor of cos(angle) (HF's attention_scaling); else unused
    sin_scale,  # ANGLES: the factor of sin(angle); else unused
    ROT: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr,
    Q_ITERS: tl.constexpr,
    K_ITERS: tl.constexpr,
    WRAP_POSITIONS: tl.constexpr,  # CACHE: positions in [-P, 0) are rows P + pos
    FROM_CACHE: tl.constexpr,
    FULL_TABLES: tl.constexpr,  # TABLES only: cos/sin [S, R, ROT], one value per feature
    FROM_ANGLES: tl.constexpr,  # cos/sin computed from angles [S, R, ROT/2]
    TABLE_DTYPE: tl.constexpr,  # ANGLES: the dtype cos/sin are rounded to (tl.float32: none)
    NUM_STREAMS: tl.constexpr,
    SECTION_1_START: tl.constexpr,  # s0 of mrope_section (s0, s1, s2)
    SECTION_2_START: tl.constexpr,  # s0 + s1
    MROPE_INTERLEAVED: tl.constexpr,  # streams interleaved by column (Qwen3-VL)
):
    HALF: tl.constexpr = ROT // 2
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    i = tl.arange(0, HALF_PAD)  # pair column
    cmask = i < HALF
    # Stream of each column: the mRoPE section it lies in; 0 everywhere with one stream.
    if NUM_STREAMS == 3 and MROPE_INTERLEAVED:
        # Qwen3-VL (sglang's apply_interleaved_rope): stream 1 at i % 3 == 1, i < 3 * s1;
        # stream 2 at i % 3 == 2, i < 3 * s2; stream 0 elsewhere. s1 = S2_START - S1_START,
        # s2 = HALF - S2_START.
        third = i % 3
        in_1 = (third == 1) & (i < 3 * (SECTION_2_START - SECTION_1_START))
        in_2 = (third == 2) & (i < 3 * (HALF - SECTION_2_START))
        stream = in_1.to(tl.int64) + 2 * in_2.to(tl.int64)
    elif NUM_STREAMS == 3:
        stream = (i >= SECTION_1_START).to(tl.int64) + (i >= SECTION_2_START).to(tl.int64)
    else:
        stream = tl.zeros([HALF_PAD], dtype=tl.int64)

    if FROM_ANGLES:
        # The model's table entry, computed: round(cos(A) * scale) in fp32, A = angles[st, t % R,
        # i]. Inductor's launcher may pass the scales as fp64: cast first.
        cos_scale = tl.cast(cos_scale, tl.float32)
        sin_scale = tl.cast(sin_scale, tl.float32)
        row = token % num_rows
        angle_offsets = stream * cos_stream_stride + row * cos_row_stride + i * cos_col_stride
        angle = tl.load(cos_ptr + angle_offsets, mask=cmask, other=0.0).to(tl.float32)
        cos = round_to(tl.cos(angle) * cos_scale, TABLE_DTYPE)
        sin = round_to(tl.sin(angle) * sin_scale, TABLE_DTYPE)
    else:
        if FROM_CACHE:
            # Every stream's position of this token in range, or the token is left as it is:
            # no cos/sin read (cmask), no head of q or k.
            streams = tl.arange(0, 4)
            every = tl.load(pos_ptr + streams * pos_stream_stride + token * pos_token_stride,
                            mask=streams < NUM_STREAMS, other=0).to(tl.int64)
            _, ok = table_row(every, num_positions, WRAP_POSITIONS)
            in_range = tl.sum(((streams < NUM_STREAMS) & ~ok).to(tl.int32), axis=0) == 0
            num_q_heads = tl.where(in_range, num_q_heads, 0)
            num_k_heads = tl.where(in_range, num_k_heads, 0)
            cmask = i < tl.where(in_range, HALF, 0)
            # Row of column i: positions[stream(i), t] (three distinct addresses at most).
            row = tl.load(pos_ptr + stream * pos_stream_stride + token * pos_token_stride,
                          mask=cmask, other=0).to(tl.int64)
            row, _ = table_row(row, num_positions, WRAP_POSITIONS)
            cos_offsets = row * cos_row_stride + i * cos_col_stride
            sin_offsets = row * sin_row_stride + (HALF + i) * sin_col_stride
        elif FULL_TABLES:
            # Feature columns (a, b) of pair i: (i, i + ROT/2) neox, (2i, 2i + 1) GPT-J; both in
            # stream(i). cos/sin below hold the columns a, cos_b/sin_b the columns b.
            row = token % num_rows
            if IS_NEOX:
                col_a = i
                col_b = i + HALF
            else:
                col_a = 2 * i
                col_b = 2 * i + 1
            cos_base = stream * cos_stream_stride + row * cos_row_stride
            sin_base = stream * sin_stream_stride + row * sin_row_stride
            cos_offsets = cos_base + col_a * cos_col_stride
            sin_offsets = sin_base + col_a * sin_col_stride
            cos_b = tl.load(cos_ptr + cos_base + col_b * cos_col_stride, mask=cmask,
                            other=0.0).to(tl.float32)
            sin_b = tl.load(sin_ptr + sin_base + col_b * sin_col_stride, mask=cmask,
                            other=0.0).to(tl.float32)
        else:
            row = token % num_rows
            cos_offsets = stream * cos_stream_stride + row * cos_row_stride + i * cos_col_stride
            sin_offsets = stream * sin_stream_stride + row * sin_row_stride + i * sin_col_stride
        # cos/sin of this token: loaded once, reused for every head of q and k.
        cos = tl.load(cos_ptr + cos_offsets, mask=cmask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + sin_offsets, mask=cmask, other=0.0).to(tl.float32)
    if not FULL_TABLES:  # one cos/sin per pair: both columns of a pair use it
        cos_b = cos
        sin_b = sin

    q_token = q_ptr + token * q_token_stride
    for j in tl.static_range(Q_ITERS):
        _rotate_head_block(q_token, q_head_stride, (split + j * num_splits) * BLOCK_H,
                           num_q_heads, cos, sin, cos_b, sin_b, ROT, HALF_PAD, BLOCK_H, IS_NEOX)
    k_token = k_ptr + token * k_token_stride
    for j in tl.static_range(K_ITERS):
        _rotate_head_block(k_token, k_head_stride, (split + j * num_splits) * BLOCK_H,
                           num_k_heads, cos, sin, cos_b, sin_b, ROT, HALF_PAD, BLOCK_H, IS_NEOX)


# ---------------------------------------------------------------------------------------------
# The one description of a launch: runtime arguments (in the signature's order, a test checks
# it), the constexprs and the grid. The eager launcher passes tensors and their strides, the
# Inductor lowering IR nodes and theirs.

RUNTIME_ARGS = ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "pos_ptr",
                "q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
                "cos_stream_stride", "cos_row_stride", "cos_col_stride",
                "sin_stream_stride", "sin_row_stride", "sin_col_stride",
                "pos_stream_stride", "pos_token_stride",
                "num_rows", "num_positions", "num_q_heads", "num_k_heads", "cos_scale",
                "sin_scale")

# ANGLES: the dtypes a model's table may be cast to (TABLE_DTYPE; float32 rounds nothing).
TABLE_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                torch.bfloat16: tl.bfloat16}


def _with_stream_dim(size, stride) -> tuple:
    """``(stream, row, col)`` strides of a table ``[R, n]`` (one stream) or ``[S, R, n]``."""
    return (0, *stride) if len(size) == 2 else tuple(stride)


def tables_runtime_args(q, k, cos, sin, *, q_stride, k_stride, cos_size, cos_stride,
                        sin_stride, num_q_heads, num_k_heads, cos_scale=1.0,
                        sin_scale=1.0) -> dict:
    """``RUNTIME_ARGS`` -> value for the TABLES source: cos/sin ``[R, W]`` or ``[3, R, W]``,
    W = ROT/2 or ROT (same sizes; ``sin_stride`` of sin's own layout). The ANGLES source
    passes the angles as cos and sin, and its scales."""
    cos_strides = _with_stream_dim(cos_size, cos_stride)
    sin_strides = _with_stream_dim(cos_size, sin_stride)
    values = (q, k, cos, sin, cos,  # pos_ptr: never read, any tensor of the launch
              q_stride[0], q_stride[1], k_stride[0], k_stride[1],
              *cos_strides, *sin_strides, 0, 0,
              cos_size[-2], 0, num_q_heads, num_k_heads, fp32_value(cos_scale),
              fp32_value(sin_scale))
    return dict(zip(RUNTIME_ARGS, values, strict=True))


def angles_runtime_args(q, k, angles, *, q_stride, k_stride, angles_size, angles_stride,
                        num_q_heads, num_k_heads, cos_scale, sin_scale) -> dict:
    """``RUNTIME_ARGS`` -> value for the ANGLES source: angles ``[R, ROT/2]`` or
    ``[3, R, ROT/2]``, read through cos_ptr (sin_ptr: the same tensor)."""
    return tables_runtime_args(q, k, angles, angles, q_stride=q_stride, k_stride=k_stride,
                               cos_size=angles_size, cos_stride=angles_stride,
                               sin_stride=angles_stride, num_q_heads=num_q_heads,
                               num_k_heads=num_k_heads, cos_scale=cos_scale,
                               sin_scale=sin_scale)


def cache_runtime_args(q, k, cos_sin_cache, positions, *, q_stride, k_stride, cache_size,
                       cache_stride, positions_size, positions_stride, num_q_heads,
                       num_k_heads) -> dict:
    """``RUNTIME_ARGS`` -> value for the CACHE source: positions ``[T]`` (every stream reads it)
    or ``[S, T]``."""
    cache_strides = (0, *cache_stride)
    pos_strides = (0, *positions_stride) if len(positions_size) == 1 else tuple(positions_stride)
    values = (q, k, cos_sin_cache, cos_sin_cache, positions,
              q_stride[0], q_stride[1], k_stride[0], k_stride[1],
              *cache_strides, *cache_strides, *pos_strides,
              1, cache_size[0], num_q_heads, num_k_heads, 1.0, 1.0)
    return dict(zip(RUNTIME_ARGS, values, strict=True))


def launch_shape(num_tokens: int, num_q_heads: int, num_k_heads: int, rotary_dim: int,
                 is_neox: bool, device_type: str, elem_bytes: int, *, from_cache: bool,
                 mrope_section=None, full_tables: bool = False,
                 angles_table_dtype: torch.dtype | None = None,
                 wrap_positions: bool = False, mrope_interleaved: bool = False) -> LaunchShape:
    """The first kernel's head tiling and warps (``num_tokens`` may be a hint), plus the cos/sin
    source constexprs. ``wrap_positions`` (CACHE): negative positions index from the cache's
    end; ``mrope_section`` ``(s0, s1, s2)`` or None (one stream);
    ``full_tables``: TABLES ``ROT`` wide (one cos/sin per feature), not ``ROT/2``;
    ``angles_table_dtype``: the ANGLES source, cos/sin rounded to that dtype;
    ``mrope_interleaved``: the streams interleaved by column (Qwen3-VL), not sectioned."""
    if full_tables and from_cache:
        raise ValueError("rope_tables: full_tables is a TABLES form; the CACHE has pair columns")
    from_angles = angles_table_dtype is not None
    if from_angles and (from_cache or full_tables):
        raise ValueError("rope_tables: the ANGLES source has pair columns and no cache")
    if wrap_positions and not from_cache:
        raise ValueError("rope_tables: wrap_positions is a CACHE option (no positions here)")
    shape = head_launch_shape(num_tokens, num_q_heads, num_k_heads, rotary_dim, is_neox,
                              device_type, elem_bytes, wrap_positions=wrap_positions)
    half = rotary_dim // 2
    s0, s1, _ = mrope_section if mrope_section is not None else (half, 0, 0)
    source = {
        "FROM_CACHE": bool(from_cache),
        "FULL_TABLES": bool(full_tables),
        "FROM_ANGLES": from_angles,
        "TABLE_DTYPE": TABLE_DTYPES[angles_table_dtype] if from_angles else tl.float32,
        "NUM_STREAMS": 1 if mrope_section is None else 3,
        "SECTION_1_START": int(s0),
        "SECTION_2_START": int(s0) + int(s1),
        "MROPE_INTERLEAVED": bool(mrope_interleaved) and mrope_section is not None,
    }
    return LaunchShape(shape.head_splits, {**shape.constexprs, **source}, shape.options)


def _launch(q, k, args: dict, shape: LaunchShape) -> None:
    if q.device.type == "cpu" and not is_interpreter():
        raise RuntimeError(
            "rope_tables: q is a CPU tensor; the Triton kernel runs on CPU tensors only under "
            "the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    grid = (q.shape[0], shape.head_splits)
    # Triton launches on the current device; a tensor on another one needs a guard.
    guard = contextlib.nullcontext()
    if q.device.type != "cpu":
        guard = torch.get_device_module(q.device).device(q.device.index)
    with guard:
        fused_qk_rope_tables_kernel[grid](*args.values(), **shape.constexprs, **shape.options)


def launch_qk_rope_tables(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, rotary_dim: int, is_neox: bool,
                          mrope_section=None) -> None:
    """Rotate ``q[..., :rotary_dim]`` and ``k[..., :rotary_dim]`` in place, token t by row
    ``t % R`` of cos/sin ``[R, rotary_dim/2]`` (pair tables) or ``[R, rotary_dim]`` (full
    tables), ``[3, R, ...]`` with ``mrope_section``. Arguments are assumed valid (the op layer
    validates)."""
    if q.shape[0] == 0:
        return
    args = tables_runtime_args(q, k, cos, sin, q_stride=q.stride(), k_stride=k.stride(),
                               cos_size=cos.shape, cos_stride=cos.stride(),
                               sin_stride=sin.stride(), num_q_heads=q.shape[1],
                               num_k_heads=k.shape[1])
    shape = launch_shape(q.shape[0], q.shape[1], k.shape[1], rotary_dim, is_neox,
                         q.device.type, q.element_size(), from_cache=False,
                         mrope_section=mrope_section, full_tables=cos.shape[-1] == rotary_dim)
    _launch(q, k, args, shape)


def launch_qk_rope_angles(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor,
                          cos_scale: float, sin_scale: float, table_dtype: torch.dtype,
                          rotary_dim: int, is_neox: bool, mrope_section=None) -> None:
    """Rotate ``q[..., :rotary_dim]`` and ``k[..., :rotary_dim]`` in place, token t by
    ``round(cos(A) * cos_scale)``, ``round(sin(A) * sin_scale)`` of the angles ``A`` in row
    ``t % R`` of ``angles`` ``[R, rotary_dim/2]`` (``[3, R, ...]`` with ``mrope_section``),
    rounded to ``table_dtype``. Arguments are assumed valid (the op layer validates)."""
    if q.shape[0] == 0:
        return
    args = angles_runtime_args(q, k, angles, q_stride=q.stride(), k_stride=k.stride(),
                               angles_size=angles.shape, angles_stride=angles.stride(),
                               num_q_heads=q.shape[1], num_k_heads=k.shape[1],
                               cos_scale=float(cos_scale), sin_scale=float(sin_scale))
    shape = launch_shape(q.shape[0], q.shape[1], k.shape[1], rotary_dim, is_neox,
                         q.device.type, q.element_size(), from_cache=False,
                         mrope_section=mrope_section, angles_table_dtype=table_dtype)
    _launch(q, k, args, shape)


def launch_qk_mrope_cache(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                          positions: torch.Tensor, rotary_dim: int, is_neox: bool,
                          mrope_section, wrap_positions: bool = False,
                          mrope_interleaved: bool = False) -> None:
    """Rotate ``q[..., :rotary_dim]`` and ``k[..., :rotary_dim]`` in place, pair column i of
    token t by cache row ``positions[stream(i), t]`` (positions ``[3, T]``, or ``[T]`` for
    every stream; ``wrap_positions``: a position in ``[-P, 0)`` is row ``P + position``;
    ``mrope_interleaved``: stream(i) by the interleaved rule, not by sections). A
    token with a position outside the cache is left as it is. Arguments are assumed valid (the
    op layer validates)."""
    if q.shape[0] == 0:
        return
    args = cache_runtime_args(q, k, cos_sin_cache, positions, q_stride=q.stride(),
                              k_stride=k.stride(), cache_size=cos_sin_cache.shape,
                              cache_stride=cos_sin_cache.stride(),
                              positions_size=positions.shape,
                              positions_stride=positions.stride(), num_q_heads=q.shape[1],
                              num_k_heads=k.shape[1])
    shape = launch_shape(q.shape[0], q.shape[1], k.shape[1], rotary_dim, is_neox,
                         q.device.type, q.element_size(), from_cache=True,
                         mrope_section=mrope_section, wrap_positions=wrap_positions,
                         mrope_interleaved=mrope_interleaved)
    _launch(q, k, args, shape)
