"""Argument checks shared by the ops' eager kernels and fake implementations.

They read only metadata (shapes, strides, dtypes, devices), never data, so the fake
implementations can run them and torch.compile reports bad input at trace time.
The data-dependent checks, indices in range, are :func:`check_positions_in_range` and
:func:`check_cache_loc_in_range` (the rule: ``docs/index_ranges.md``).
"""

from __future__ import annotations

import os

import torch

from .layout import may_share_memory

# The ops' names (torch.ops.rope_compile.*), used in their messages.
FUSED_OP_NAME = "rope_compile::fused_qk_rope_with_cos_sin_cache_inplace"
GENERIC_OP_NAME = "rope_compile::rotary_embedding"
_FUSED = "fused_qk_rope_with_cos_sin_cache_inplace"
_GENERIC = "rotary_embedding"

# Opt-in bounds check of positions on GPU kernels: it reads positions back to the host (a
# device sync), so it is off unless asked for. The CPU kernel always checks.
_check_positions_on_device = os.environ.get("ROPE_COMPILE_CHECK_POSITIONS", "0") == "1"


def set_check_positions(enabled: bool) -> None:
    """Make GPU kernels raise ``IndexError`` for positions outside the cos/sin cache and
    cache_loc outside the KV buffers (as the CPU kernels always do).

    Also enabled by the environment variable ``ROPE_COMPILE_CHECK_POSITIONS=1``. Each call then
    synchronises with the device, so leave it off in production: without it the kernels leave
    the rows of an out-of-range index untouched (``docs/index_ranges.md``).
    """
    global _check_positions_on_device
    _check_positions_on_device = bool(enabled)


def check_positions_on_device_enabled() -> bool:
    return _check_positions_on_device


def _is_int(value) -> bool:
    # SymInt: sizes are symbolic under dynamic-shape tracing.
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _fail(op: str, message: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{op}: {message}")


def _check_rows_divide_tokens(op: str, what: str, rows: int, num_tokens: int,
                              meaning: str) -> None:
    """``rows`` (of a table, of cache_loc) divides ``num_tokens`` (0 rows only for 0 tokens)."""
    if (rows == 0 and num_tokens != 0) or (rows != 0 and num_tokens % rows != 0):
        _fail(op, f"{what} ({rows}) must divide the number of tokens ({num_tokens}): "
                  f"{meaning}")


def check_rope_operands(
    op: str,
    named_xs: tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]],
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    head_size: int,
) -> None:
    """Checks common to both ops. ``named_xs`` are the two tensors rotated, ``(name, tensor)``,
    already viewed as ``[num_tokens, num_heads, head_size]`` (the callers check that)."""
    (a_name, a), (b_name, b) = named_xs
    for name, x in named_xs:
        if not x.dtype.is_floating_point:
            _fail(op, f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if a.dtype != b.dtype:
        _fail(op, f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")
    if not cos_sin_cache.dtype.is_floating_point:
        _fail(op, f"cos_sin_cache must be floating point, got dtype {cos_sin_cache.dtype}")
    if positions.dtype not in (torch.int32, torch.int64):
        _fail(op, f"positions must be int32 or int64, got dtype {positions.dtype}")
    devices = {x.device for x in (a, b, cos_sin_cache, positions)}
    if len(devices) != 1:
        _fail(
            op,
            f"{a_name}, {b_name}, cos_sin_cache and positions must be on one device, got "
            f"{a.device}, {b.device}, {cos_sin_cache.device} and {positions.device}",
        )
    if not _is_int(rotary_dim) or rotary_dim <= 0 or rotary_dim % 2:
        _fail(op, f"rotary_dim must be a positive even integer, got {rotary_dim!r}")
    if rotary_dim > head_size:
        _fail(op, f"rotary_dim ({rotary_dim}) must not exceed the head size ({head_size})")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim:
        _fail(
            op,
            f"cos_sin_cache must be [max_position, rotary_dim={rotary_dim}], "
            f"got shape {tuple(cos_sin_cache.shape)}",
        )
    if a.shape[0] != b.shape[0]:
        _fail(
            op,
            f"{a_name} and {b_name} must have the same number of tokens, "
            f"got {a.shape[0]} and {b.shape[0]}",
        )
    if positions.numel() != a.shape[0]:
        _fail(
            op,
            f"positions must hold one position per token ({a.shape[0]}), "
            f"got {positions.numel()} (shape {tuple(positions.shape)})",
        )
    for name, x in named_xs:
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            _fail(op, f"{name} must have last stride 1, got strides {tuple(x.stride())}")
        if any(n > 1 and s == 0 for n, s in zip(x.shape, x.stride(), strict=True)):
            _fail(op, f"{name} must not be expanded (a stride-0 dim writes one element "
                      f"several times), got strides {tuple(x.stride())}")
    a_rot, b_rot = a[..., :rotary_dim], b[..., :rotary_dim]
    if may_share_memory(a_rot, b_rot, unknown=True):
        _fail(op, f"{a_name} and {b_name} overlap in memory; rotating them in place would "
                  f"rotate the shared elements twice")
    for read_name, read in (("cos_sin_cache", cos_sin_cache), ("positions", positions)):
        for name, x in ((a_name, a_rot), (b_name, b_rot)):
            if may_share_memory(read, x, unknown=False):
                _fail(op, f"{read_name} overlaps {name} in memory; the op would read "
                          f"{read_name} while it rotates {name} in place")


def _check_index_range(op: str, name: str, index: torch.Tensor, num_rows: int,
                       wrap_negative: bool, rows: str) -> None:
    """Raise ``IndexError`` if ``index`` has a value outside ``[0, num_rows)``, or outside
    ``[-num_rows, num_rows)`` with ``wrap_negative`` (reads data)."""
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    first = -num_rows if wrap_negative else 0
    if low < first or high >= num_rows:
        raise IndexError(f"{op}: {name} must lie in [{first}, {num_rows}) ({rows}), got values "
                         f"in [{low}, {high}]")


def check_positions_in_range(op: str, positions: torch.Tensor, max_position: int,
                             wrap_negative: bool = False) -> None:
    """Raise ``IndexError`` if a position is outside ``[0, max_position)`` (``[-max_position,
    max_position)`` with ``wrap_negative``: eager's ``cache[positions]``) (reads data)."""
    _check_index_range(op, "positions", positions, max_position, wrap_negative,
                       "the cos_sin_cache rows" + (", negative ones from the end"
                                                   if wrap_negative else ""))


# ---------------------------------------------------------------------------------------------
# QK-norm / RoPE + KV-cache store ops (rope_compile/kernels/rope_kv_store.py)

KV_STORE_OP_NAME = "rope_compile::fused_qk_rope_kv_store_inplace"
NORM_ROPE_OP_NAME = "rope_compile::fused_qk_norm_rope_inplace"
NORM_ROPE_KV_OP_NAME = "rope_compile::fused_qk_norm_rope_kv_store_inplace"
_KV_STORE = "fused_qk_rope_kv_store_inplace"
_NORM_ROPE = "fused_qk_norm_rope_inplace"
_NORM_ROPE_KV = "fused_qk_norm_rope_kv_store_inplace"
# The same three with cos/sin from a model's own tables [R, rotary_dim/2] (row t % R).
KV_STORE_TABLES_OP_NAME = "rope_compile::fused_qk_rope_kv_store_tables_inplace"
NORM_ROPE_TABLES_OP_NAME = "rope_compile::fused_qk_norm_rope_tables_inplace"
NORM_ROPE_KV_TABLES_OP_NAME = "rope_compile::fused_qk_norm_rope_kv_store_tables_inplace"
_KV_STORE_TABLES = "fused_qk_rope_kv_store_tables_inplace"
_NORM_ROPE_TABLES = "fused_qk_norm_rope_tables_inplace"
_NORM_ROPE_KV_TABLES = "fused_qk_norm_rope_kv_store_tables_inplace"


def kv_cache_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes a KV-cache buffer may have (fp8 e4m3fn where this torch has it)."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    return (torch.float16, torch.bfloat16, torch.float32) + ((fp8,) if fp8 else ())


def _is_number(value) -> bool:
    return isinstance(value, (int, float, torch.SymFloat, torch.SymInt)) and not isinstance(
        value, bool)


def _finite(value) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _check_whole_heads(op, q, k, cos_sin_cache, positions, rotary_dim) -> None:
    """q ``[T, Hq, D]`` and k ``[T, Hk, D]`` (whole heads: the norm writes them all, the store
    reads k's tail), besides the RoPE checks of :func:`check_rope_operands`."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        _fail(op, f"positions must be 1-D [num_tokens], got "
                  f"{tuple(getattr(positions, 'shape', ()))}")
    _check_head_shapes(op, q, k)
    check_rope_operands(op, (("q", q), ("k", k)), cos_sin_cache, positions, rotary_dim,
                        q.shape[2])
    if may_share_memory(q, k, unknown=True):
        _fail(op, "q and k overlap in memory; the op writes both in place")
    _check_kv_reads(op, (("cos_sin_cache", cos_sin_cache), ("positions", positions)),
                 (("q", q), ("k", k)))


def _check_head_shapes(op, q, k) -> None:
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            _fail(op, f"{name} must be [num_tokens, num_heads, head_size], got shape "
                      f"{tuple(getattr(x, 'shape', ()))}")
    if q.shape[2] != k.shape[2]:
        _fail(op, f"q and k must have the same head size, got {q.shape[2]} and {k.shape[2]}")


def _check_whole_heads_tables(op, q, k, cos, sin, rotary_dim) -> None:
    """:func:`_check_whole_heads` with cos/sin tables ``[R, rotary_dim/2]`` (any strides and
    float dtype, R dividing T: token t reads row t % R) in place of the cache and positions."""
    _check_head_shapes(op, q, k)
    _check_rotated_qk(op, q, k, rotary_dim)
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or not table.dtype.is_floating_point:
            _fail(op, f"{name} must be a floating-point tensor, got "
                      f"{getattr(table, 'dtype', type(table).__name__)}")
        if table.dim() != 2 or table.shape[1] != rotary_dim // 2:
            _fail(op, f"{name} must be [rows, rotary_dim/2 = {rotary_dim // 2}], got shape "
                      f"{tuple(table.shape)}")
    if cos.shape != sin.shape:
        _fail(op, f"cos and sin must have the same shape, got {tuple(cos.shape)} and "
                  f"{tuple(sin.shape)}")
    num_tokens, rows = q.shape[0], cos.shape[0]
    _check_rows_divide_tokens(op, "the number of cos/sin rows", rows, num_tokens,
                              "token t is rotated by row t % rows")
    _check_reads(op, q, k, rotary_dim, (("cos", cos), ("sin", sin)))
    if may_share_memory(q, k, unknown=True):
        _fail(op, "q and k overlap in memory; the op writes both in place")
    _check_kv_reads(op, (("cos", cos), ("sin", sin)), (("q", q), ("k", k)))


def _check_kv_reads(op, reads, writes) -> None:
    """No tensor the op reads shares memory with one it writes."""
    for read_name, read in reads:
        for name, x in writes:
            if may_share_memory(read, x, unknown=False):
                _fail(op, f"{read_name} overlaps {name} in memory; the op would read "
                          f"{read_name} while it writes {name}")


def _check_norm(op, q, k, q_weight, k_weight, eps, weight_offset, round_once) -> None:
    """Each weight ``[D]`` (a norm per head) or ``[H*D]`` (one norm over the token's H heads
    of q, or of k: HF OLMo2's whole-projection q_norm / k_norm), floating point, on q's
    device; eps, the weight offset and the rounding (``round_once``: None, True or False;
    False, rounding before the weight, only with offset 0.0)."""
    head_size = q.shape[2]
    for name, w, heads in (("q_weight", q_weight, q.shape[1]),
                           ("k_weight", k_weight, k.shape[1])):
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] not in (
                head_size, heads * head_size):
            _fail(op, f"{name} must be [head_size={head_size}] (a norm per head) or "
                      f"[num_heads * head_size={heads * head_size}] (one norm over all of a "
                      f"token's heads), got shape {tuple(getattr(w, 'shape', ()))}")
        if not w.dtype.is_floating_point:
            _fail(op, f"{name} must be floating point, got dtype {w.dtype}")
        if w.device != q.device:
            _fail(op, f"{name} must be on q's device ({q.device}), got {w.device}")
    if not _is_number(eps) or not _finite(eps) or eps < 0:
        _fail(op, f"eps must be a finite number >= 0, got {eps!r}")
    if weight_offset not in (0.0, 1.0) or isinstance(weight_offset, bool):
        _fail(op, f"weight_offset must be 0.0 (x * w, Qwen3/Llama) or 1.0 (x * (1 + w), "
                  f"Gemma), got {weight_offset!r}")
    if round_once is not None and not isinstance(round_once, bool):
        _fail(op, f"round_once must be None (as weight_offset says), True (one rounding, "
                  f"after the weight) or False (x_normed rounded before the weight), got "
                  f"{round_once!r}")
    if round_once is False and weight_offset == 1.0:
        _fail(op, "round_once=False (x_normed rounded before the weight, HF Qwen3) is defined "
                  "only with weight_offset=0.0; weight_offset=1.0 (HF Gemma3's x * (1 + w)) "
                  "rounds once: pass round_once=None or True")
    _check_kv_reads(op, (("q_weight", q_weight), ("k_weight", k_weight)), (("q", q), ("k", k)))


def _check_kv_store(op, q, k, v, k_buffer, v_buffer, cache_loc, k_scale, v_scale,
                    reads) -> None:
    """v ``[T, Hk, Dv]``, k_buffer ``[S, Hk, D]`` or ``[Bc, S, Hk, D]``, v_buffer likewise
    (``Dv``), cache_loc ``[R_loc]``: token t writes batch ``t // R_loc``, row
    ``cache_loc[t % R_loc]`` (R_loc divides T, T / R_loc <= Bc; 3-D buffers: R_loc = T),
    scales; ``reads``: the other tensors the op reads, ``(name, tensor)``."""
    num_tokens, num_kv_heads, head_size = k.shape
    if not isinstance(v, torch.Tensor) or v.dim() != 3:
        _fail(op, f"v must be [num_tokens, num_kv_heads, v_head_size], got shape "
                  f"{tuple(getattr(v, 'shape', ()))}")
    if v.shape[0] != num_tokens or v.shape[1] != num_kv_heads:
        _fail(op, f"v must be [{num_tokens}, {num_kv_heads}, v_head_size] (k's tokens and "
                  f"heads), got {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        _fail(op, f"v must be a floating-point tensor, got dtype {v.dtype}")
    for name, buf, size in (("k_buffer", k_buffer, head_size),
                            ("v_buffer", v_buffer, v.shape[2])):
        if not isinstance(buf, torch.Tensor) or buf.dim() not in (3, 4) or buf.shape[-2:] != (
                num_kv_heads, size):
            _fail(op, f"{name} must be [num_slots, {num_kv_heads}, {size}] or [batch, "
                      f"num_slots, {num_kv_heads}, {size}], got shape "
                      f"{tuple(getattr(buf, 'shape', ()))}")
        if buf.dtype not in kv_cache_dtypes():
            _fail(op, f"{name} must have a dtype in {kv_cache_dtypes()}, got {buf.dtype}")
        if any(n > 1 and s == 0 for n, s in zip(buf.shape, buf.stride(), strict=True)):
            _fail(op, f"{name} must not be expanded (a stride-0 dim writes one element "
                      f"several times), got strides {tuple(buf.stride())}")
    if k_buffer.dim() != v_buffer.dim():
        _fail(op, f"k_buffer and v_buffer must both be 3-D [num_slots, heads, head_size] or "
                  f"both 4-D [batch, num_slots, heads, head_size], got shapes "
                  f"{tuple(k_buffer.shape)} and {tuple(v_buffer.shape)}")
    if k_buffer.shape[-3] != v_buffer.shape[-3]:
        _fail(op, f"k_buffer and v_buffer must have the same number of slots, got "
                  f"{k_buffer.shape[-3]} and {v_buffer.shape[-3]}")
    if k_buffer.dim() == 4 and k_buffer.shape[0] != v_buffer.shape[0]:
        _fail(op, f"k_buffer and v_buffer must have the same batch size, got "
                  f"{k_buffer.shape[0]} and {v_buffer.shape[0]}")
    for name, x in (("v", v), ("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            _fail(op, f"{name} must have last stride 1, got strides {tuple(x.stride())}")
    if not isinstance(cache_loc, torch.Tensor) or cache_loc.dtype not in (torch.int32,
                                                                          torch.int64):
        _fail(op, f"cache_loc must be an int32 or int64 tensor, got "
                  f"{getattr(cache_loc, 'dtype', type(cache_loc).__name__)}")
    if cache_loc.dim() != 1 or (k_buffer.dim() == 3 and cache_loc.shape[0] != num_tokens):
        _fail(op, f"cache_loc must be [num_tokens={num_tokens}] (with 3-D k_buffer/v_buffer; "
                  f"4-D ones take [rows] with rows dividing num_tokens), got shape "
                  f"{tuple(cache_loc.shape)}")
    rows = cache_loc.shape[0]
    if k_buffer.dim() == 4:
        _check_rows_divide_tokens(op, "cache_loc's length", rows, num_tokens,
                                  f"token t writes buffer batch t // {rows}, row "
                                  f"cache_loc[t % {rows}]")
        if rows != 0 and num_tokens // rows > k_buffer.shape[0]:
            _fail(op, f"k_buffer/v_buffer batch size ({k_buffer.shape[0]}) is smaller than "
                      f"num_tokens / len(cache_loc) = {num_tokens} / {rows} = "
                      f"{num_tokens // rows} (token t writes buffer batch t // {rows})")
    for name, x in (("v", v), ("k_buffer", k_buffer), ("v_buffer", v_buffer),
                    ("cache_loc", cache_loc)):
        if x.device != k.device:
            _fail(op, f"{name} must be on k's device ({k.device}), got {x.device}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and (not _is_number(scale) or not _finite(scale)
                                  or scale <= 0):
            _fail(op, f"{name} must be None or a finite number > 0, got {scale!r}")
    writes = (("q", q), ("k", k), ("k_buffer", k_buffer), ("v_buffer", v_buffer))
    for i, (a_name, a) in enumerate(writes):
        for b_name, b in writes[i + 1:]:
            if may_share_memory(a, b, unknown=True):
                _fail(op, f"{a_name} and {b_name} overlap in memory; the op writes both")
    _check_kv_reads(op, (("v", v), ("cache_loc", cache_loc), *reads), writes)


def validate_kv_store(q, k, v, k_buffer, v_buffer, cache_loc, cos_sin_cache, positions,
                      rotary_dim, k_scale, v_scale) -> None:
    """The checks of ``fused_qk_rope_kv_store_inplace`` (metadata only)."""
    _check_whole_heads(_KV_STORE, q, k, cos_sin_cache, positions, rotary_dim)
    _check_kv_store(_KV_STORE, q, k, v, k_buffer, v_buffer, cache_loc, k_scale, v_scale,
                    (("cos_sin_cache", cos_sin_cache), ("positions", positions)))


def validate_norm_rope(q, k, q_weight, k_weight, eps, weight_offset, cos_sin_cache, positions,
                       rotary_dim, kv=None, round_once=None) -> None:
    """The checks of ``fused_qk_norm_rope_inplace`` and, with ``kv = (v, k_buffer, v_buffer,
    cache_loc, k_scale, v_scale)``, of ``fused_qk_norm_rope_kv_store_inplace``."""
    op = _NORM_ROPE if kv is None else _NORM_ROPE_KV
    _check_whole_heads(op, q, k, cos_sin_cache, positions, rotary_dim)
    _check_norm(op, q, k, q_weight, k_weight, eps, weight_offset, round_once)
    if kv is not None:
        _check_kv_store(op, q, k, *kv, (("cos_sin_cache", cos_sin_cache),
                                        ("positions", positions), ("q_weight", q_weight),
                                        ("k_weight", k_weight)))


def validate_kv_store_tables(q, k, v, k_buffer, v_buffer, cache_loc, cos, sin, rotary_dim,
                             k_scale, v_scale) -> None:
    """The checks of ``fused_qk_rope_kv_store_tables_inplace`` (metadata only)."""
    op = _KV_STORE_TABLES
    _check_whole_heads_tables(op, q, k, cos, sin, rotary_dim)
    _check_kv_store(op, q, k, v, k_buffer, v_buffer, cache_loc, k_scale, v_scale,
                    (("cos", cos), ("sin", sin)))


def validate_norm_rope_tables(q, k, q_weight, k_weight, eps, weight_offset, cos, sin,
                              rotary_dim, kv=None, round_once=None) -> None:
    """The checks of ``fused_qk_norm_rope_tables_inplace`` and, with ``kv``, of
    ``fused_qk_norm_rope_kv_store_tables_inplace``."""
    op = _NORM_ROPE_TABLES if kv is None else _NORM_ROPE_KV_TABLES
    _check_whole_heads_tables(op, q, k, cos, sin, rotary_dim)
    _check_norm(op, q, k, q_weight, k_weight, eps, weight_offset, round_once)
    if kv is not None:
        _check_kv_store(op, q, k, *kv, (("cos", cos), ("sin", sin), ("q_weight", q_weight),
                                        ("k_weight", k_weight)))


def check_cache_loc_in_range(op: str, cache_loc: torch.Tensor, num_slots: int,
                             wrap_negative: bool = True) -> None:
    """Raise ``IndexError`` if a cache location is outside ``[-num_slots, num_slots)``
    (eager's ``k_buffer[cache_loc] = k``), or outside ``[0, num_slots)`` without
    ``wrap_negative`` (``index_copy_``) (reads data)."""
    _check_index_range(op, "cache_loc", cache_loc, num_slots, wrap_negative,
                       "the k_buffer/v_buffer rows" + (", negative ones from the end"
                                                       if wrap_negative else ""))


def as_token_heads(op: str, name: str, x: torch.Tensor, num_tokens: int, head_size: int):
    """View ``x`` (``[T, H * head_size]`` or ``[..., H, head_size]``) as ``[T, H, head_size]``
    without copying, or raise ``ValueError`` naming ``name``."""
    if not _is_int(head_size) or head_size <= 0:
        _fail(op, f"head_size must be a positive integer, got {head_size!r}")
    if x.dim() >= 3 and x.shape[-1] == head_size and (
            x.numel() == num_tokens * x.shape[-2] * head_size):  # not [B, S, 1 * head_size]
        heads = x.shape[-2]
    elif x.dim() >= 1 and x.shape[-1] % head_size == 0:
        heads = x.shape[-1] // head_size
    else:
        _fail(op, f"{name} of shape {tuple(x.shape)} must end in a multiple of head_size "
                  f"({head_size})")
    if x.numel() != num_tokens * heads * head_size:
        _fail(op, f"{name} of shape {tuple(x.shape)} does not hold {num_tokens} tokens "
                  f"(positions.numel()) of {heads} heads of size {head_size}")
    try:
        return x.view(num_tokens, heads, head_size)
    except RuntimeError as err:
        _fail(op, f"{name} of shape {tuple(x.shape)} and strides {tuple(x.stride())} cannot be "
                  f"viewed as [tokens, heads, head_size] without a copy ({err})")


def validate_fused(q, k, cos_sin_cache, positions, rotary_dim) -> None:
    if positions.dim() != 1:
        raise ValueError(f"{_FUSED}: positions must be 1-D [num_tokens], got shape "
                         f"{tuple(positions.shape)}")
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3:
            raise ValueError(f"{_FUSED}: {name} must be [num_tokens, num_heads, rotary_dim], "
                             f"got shape {tuple(x.shape)}")
    head_size = min(q.shape[-1], k.shape[-1])
    check_rope_operands(_FUSED, (("q", q), ("k", k)), cos_sin_cache, positions, rotary_dim,
                        head_size)


def generic_views(positions, query, key, head_size, cos_sin_cache):
    if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2:
        raise ValueError(f"{_GENERIC}: cos_sin_cache must be [max_position, rotary_dim]")
    num_tokens = positions.numel()
    q = as_token_heads(_GENERIC, "query", query, num_tokens, head_size)
    k = as_token_heads(_GENERIC, "key", key, num_tokens, head_size)
    rotary_dim = cos_sin_cache.shape[1]
    flat_positions = positions.reshape(-1)
    check_rope_operands(_GENERIC, (("query", q), ("key", k)), cos_sin_cache, flat_positions,
                        rotary_dim, head_size)
    return q, k, flat_positions, rotary_dim


# ---------------------------------------------------------------------------------------------
# The cos/sin-tables op and the mRoPE-cache op (rope_compile/kernels/rope_tables.py)

TABLES_OP_NAME = "rope_compile::fused_qk_rope_with_cos_sin_tables_inplace"
MROPE_OP_NAME = "rope_compile::fused_qk_mrope_with_cos_sin_cache_inplace"
_TABLES = "fused_qk_rope_with_cos_sin_tables_inplace"
_MROPE = "fused_qk_mrope_with_cos_sin_cache_inplace"


def _check_rotated_qk(op: str, q, k, rotary_dim) -> None:
    """q ``[T, Hq, >= rotary_dim]`` and k ``[T, Hk, >= rotary_dim]``: floating point, one dtype,
    last stride 1, not expanded, and their rotated parts disjoint."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            _fail(op, f"{name} must be a [num_tokens, num_heads, >= rotary_dim] tensor, got "
                      f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.dtype.is_floating_point:
            _fail(op, f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if q.dtype != k.dtype:
        _fail(op, f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if not _is_int(rotary_dim) or rotary_dim <= 0 or rotary_dim % 2:
        _fail(op, f"rotary_dim must be a positive even integer, got {rotary_dim!r}")
    for name, x in (("q", q), ("k", k)):
        if x.shape[-1] < rotary_dim:
            _fail(op, f"rotary_dim ({rotary_dim}) must not exceed {name}'s head size "
                      f"({x.shape[-1]})")
    if q.shape[0] != k.shape[0]:
        _fail(op, f"q and k must have the same number of tokens, got {q.shape[0]} and "
                  f"{k.shape[0]}")
    for name, x in (("q", q), ("k", k)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            _fail(op, f"{name} must have last stride 1, got strides {tuple(x.stride())}")
        if any(n > 1 and s == 0 for n, s in zip(x.shape, x.stride(), strict=True)):
            _fail(op, f"{name} must not be expanded (a stride-0 dim writes one element "
                      f"several times), got strides {tuple(x.stride())}")
    if may_share_memory(q[..., :rotary_dim], k[..., :rotary_dim], unknown=True):
        _fail(op, "q and k overlap in memory; rotating them in place would rotate the shared "
                  "elements twice")


def _check_reads(op: str, q, k, rotary_dim, named_reads) -> None:
    """Every read tensor on q's device and sharing no memory with the rotated parts of q/k."""
    for name, read in named_reads:
        if read.device != q.device or k.device != q.device:
            _fail(op, f"q, k and {name} must be on one device, got {q.device}, {k.device} and "
                      f"{read.device}")
    for read_name, read in named_reads:
        for name, x in (("q", q), ("k", k)):
            if may_share_memory(read, x[..., :rotary_dim], unknown=False):
                _fail(op, f"{read_name} overlaps {name} in memory; the op would read "
                          f"{read_name} while it rotates {name} in place")


def _check_mrope_section(op: str, mrope_section, rotary_dim) -> tuple[int, int, int]:
    sections = tuple(mrope_section)
    if len(sections) != 3 or not all(_is_int(s) and s >= 0 for s in sections):
        _fail(op, f"mrope_section must be three non-negative integers (temporal, height, "
                  f"width), got {list(sections)}")
    if sum(sections) != rotary_dim // 2:
        _fail(op, f"mrope_section {list(sections)} must sum to rotary_dim / 2 = "
                  f"{rotary_dim // 2}, got {sum(sections)}")
    return sections


def validate_qk_rope_tables(q, k, cos, sin, rotary_dim, mrope_section=None) -> None:
    """Checks of ``fused_qk_rope_with_cos_sin_tables_inplace``: cos/sin ``[R, rotary_dim/2]``
    (pair tables) or ``[R, rotary_dim]`` (full tables), ``[3, R, ...]`` with ``mrope_section``,
    R dividing the token count."""
    op = _TABLES
    _check_rotated_qk(op, q, k, rotary_dim)
    streams = mrope_section is not None
    lead = "3, rows" if streams else "rows"
    expected = f"[{lead}, rotary_dim/2] (pair tables) or [{lead}, rotary_dim] (full tables)"
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or not table.dtype.is_floating_point:
            _fail(op, f"{name} must be a floating-point tensor, got "
                      f"{getattr(table, 'dtype', type(table).__name__)}")
        if (table.dim() != (3 if streams else 2)
                or table.shape[-1] not in (rotary_dim // 2, rotary_dim)
                or (streams and table.shape[0] != 3)):
            _fail(op, f"{name} must be {expected} with rotary_dim/2 = {rotary_dim // 2}, "
                      f"rotary_dim = {rotary_dim}"
                      f"{' (mrope_section given)' if streams else ''}, got shape "
                      f"{tuple(table.shape)}")
    if cos.shape != sin.shape:
        _fail(op, f"cos and sin must have the same shape, got {tuple(cos.shape)} and "
                  f"{tuple(sin.shape)}")
    if streams:
        _check_mrope_section(op, mrope_section, rotary_dim)
    num_tokens, rows = q.shape[0], cos.shape[-2]
    _check_rows_divide_tokens(op, "the number of cos/sin rows", rows, num_tokens,
                              "token t is rotated by row t % rows")
    _check_reads(op, q, k, rotary_dim, (("cos", cos), ("sin", sin)))


def validate_qk_mrope_cache(q, k, cos_sin_cache, positions, rotary_dim, mrope_section,
                            mrope_interleaved=False) -> None:
    """Checks of ``fused_qk_mrope_with_cos_sin_cache_inplace``: cache ``[P, rotary_dim]``,
    positions ``[3, T]`` or ``[T]``, int32/int64; ``mrope_interleaved`` a bool."""
    op = _MROPE
    _check_rotated_qk(op, q, k, rotary_dim)
    if not isinstance(cos_sin_cache, torch.Tensor) or not cos_sin_cache.dtype.is_floating_point:
        _fail(op, f"cos_sin_cache must be floating point, got "
                  f"{getattr(cos_sin_cache, 'dtype', type(cos_sin_cache).__name__)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim:
        _fail(op, f"cos_sin_cache must be [max_position, rotary_dim={rotary_dim}], got shape "
                  f"{tuple(cos_sin_cache.shape)}")
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32,
                                                                          torch.int64):
        _fail(op, f"positions must be int32 or int64, got "
                  f"{getattr(positions, 'dtype', type(positions).__name__)}")
    num_tokens = q.shape[0]
    if not (positions.dim() == 1 and positions.shape[0] == num_tokens
            or positions.dim() == 2 and tuple(positions.shape) == (3, num_tokens)):
        _fail(op, f"positions must be [3, num_tokens={num_tokens}] (or [num_tokens] for text "
                  f"only), got shape {tuple(positions.shape)}")
    _check_mrope_section(op, mrope_section, rotary_dim)
    if not isinstance(mrope_interleaved, bool):
        _fail(op, f"mrope_interleaved must be a bool (True: Qwen3-VL's interleaved streams), "
                  f"got {mrope_interleaved!r}")
    _check_reads(op, q, k, rotary_dim,
                 (("cos_sin_cache", cos_sin_cache), ("positions", positions)))


# ---------------------------------------------------------------------------------------------
# The angles op: the tables op's pair tables computed from HF's angles (kernels/rope_tables.py)

ANGLES_OP_NAME = "rope_compile::fused_qk_rope_with_angles_inplace"
_ANGLES = "fused_qk_rope_with_angles_inplace"
# The dtypes a model's cos/sin table may be cast to (float32: no rounding).
ANGLES_TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate_qk_rope_angles(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim,
                            mrope_section=None) -> None:
    """Checks of ``fused_qk_rope_with_angles_inplace``: angles float32 ``[R, rotary_dim/2]``
    (``[3, R, rotary_dim/2]`` with ``mrope_section``), R dividing the token count, any strides;
    finite scales; a table dtype of ``ANGLES_TABLE_DTYPES``."""
    op = _ANGLES
    _check_rotated_qk(op, q, k, rotary_dim)
    streams = mrope_section is not None
    lead = "3, rows" if streams else "rows"
    if not isinstance(angles, torch.Tensor) or angles.dtype != torch.float32:
        _fail(op, f"angles must be a float32 tensor (the model's fp32 freqs), got "
                  f"{getattr(angles, 'dtype', type(angles).__name__)}")
    if (angles.dim() != (3 if streams else 2) or angles.shape[-1] != rotary_dim // 2
            or (streams and angles.shape[0] != 3)):
        _fail(op, f"angles must be [{lead}, rotary_dim/2 = {rotary_dim // 2}]"
                  f"{' (mrope_section given)' if streams else ''}, got shape "
                  f"{tuple(angles.shape)}")
    for name, scale in (("cos_scale", cos_scale), ("sin_scale", sin_scale)):
        if not _is_number(scale) or not _finite(scale):
            _fail(op, f"{name} must be a finite number, got {scale!r}")
    if table_dtype not in ANGLES_TABLE_DTYPES:
        _fail(op, f"table_dtype must be one of {ANGLES_TABLE_DTYPES} (the dtype the model casts "
                  f"its cos/sin table to), got {table_dtype!r}")
    if streams:
        _check_mrope_section(op, mrope_section, rotary_dim)
    num_tokens, rows = q.shape[0], angles.shape[-2]
    _check_rows_divide_tokens(op, "the number of angle rows", rows, num_tokens,
                              "token t is rotated by row t % rows")
    _check_reads(op, q, k, rotary_dim, (("angles", angles),))
