"""Pure-torch rotary position embedding: the oracle every kernel and rewrite is checked against.

Layout conventions (the same as sglang / vLLM):

* ``cos_sin_cache``: ``[max_position, rotary_dim]`` = ``cat(cos, sin, dim=-1)``; row ``p`` holds
  ``cos(p * inv_freq)`` in ``[:rotary_dim // 2]`` and ``sin(p * inv_freq)`` in the rest.
* ``x``: ``[num_tokens, num_heads, head_size]`` with ``rotary_dim <= head_size``; only
  ``x[..., :rotary_dim]`` is rotated, the tail passes through unchanged.
* neox style rotates the two halves of the rotary part: pair ``i`` is ``(x[i], x[i + rot/2])``.
  GPT-J style rotates interleaved pairs: pair ``i`` is ``(x[2i], x[2i + 1])``.
  Either way, with ``(c, s) = (cos[i], sin[i])``::

      out1 = x1 * c - x2 * s
      out2 = x2 * c + x1 * s

Math is done in float32 (float64 if the input is float64), and the result is cast back.
"""

from __future__ import annotations

import torch


def compute_cos_sin_cache(
    rotary_dim: int, max_position: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[max_position, rotary_dim]`` = ``cat(cos, sin)`` of
    ``position * base^(-2i/rotary_dim)``."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    )
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# QK-norm and KV-cache store (the CPU kernels of the rope_kv_store ops; the math and rounding
# are those of rope_compile/kernels/rope_kv_store.py, which documents them)

FP8_E4M3_MAX = 448.0


def norm_rounds_once(weight_offset: float, round_once: bool | None = None) -> bool:
    """Whether the QK-norm rounds once, after the weight (``round(x * r * (offset + w))``), or
    twice (``round(w * round(x * r))``, HF Qwen3). ``round_once`` None: as the offset says (0.0:
    twice, Qwen3; 1.0: once, Gemma3); True with offset 0.0 is HF OLMo2's ``Olmo2RMSNorm``.
    (Twice with offset 1.0 is no HF form: the ops refuse it.)"""
    return float(weight_offset) == 1.0 if round_once is None else bool(round_once)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                   round_once: bool | None = None) -> torch.Tensor:
    """RMSNorm of ``x`` ``[..., D]`` over D, ``r = rsqrt(mean(x^2) + eps)`` in float32 (float64
    for float64 x), rounded (:func:`norm_rounds_once`) as HF's ``Qwen3RMSNorm``
    (``round(w * round(x * r))``), ``Gemma3RMSNorm`` (weight_offset 1.0:
    ``round(x * r * (1 + w))``) or ``Olmo2RMSNorm`` (round_once, offset 0.0:
    ``round(x * r * w)``, the weight promoted to float32); result in x's dtype."""
    math = _math_dtype(x.dtype)
    h = x.to(math)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(math)
    if float(weight_offset) == 1.0:
        w = 1.0 + w
    if norm_rounds_once(weight_offset, round_once):
        return (h * r * w).to(x.dtype)
    return (w * (h * r).to(x.dtype).to(math)).to(x.dtype)


def to_kv_cache(x: torch.Tensor, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` stores it: ``x / scale`` in float32 (when a scale is
    given), then one cast; fp8 e4m3fn saturates to +-448 (torch 2.13's conversion; clamped
    first so that older torch, which gave NaN, agrees)."""
    math = _math_dtype(x.dtype)
    if scale is not None:
        x = x.to(math) / scale
    if dtype == getattr(torch, "float8_e4m3fn", None):
        x = x.to(math).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.to(dtype)


def qk_norm_rope_kv_reference_(q, k, cos_sin_cache, positions, rotary_dim, is_neox, *,
                               norm=None, kv=None) -> None:
    """In place: RMSNorm q and k ``[T, H, D]`` per head or over all of a token's heads
    (``norm = (q_weight, k_weight, eps, weight_offset[, round_once])``, weights ``[D]`` or
    ``[H*D]``; :func:`rms_norm_heads`), rotate
    their first ``rotary_dim`` features, then (``kv = (v, k_buffer, v_buffer, cache_loc,
    k_scale, v_scale)``) write the rotated k and v into the cache rows ``cache_loc`` (duplicate
    locations: one of the writers wins, as with ``index_put_``)."""
    _norm_qk_(q, k, norm)
    rope_reference_(q, k, cos_sin_cache, positions, rotary_dim, is_neox)
    _store_kv_(k, kv)


def qk_norm_rope_kv_tables_reference_(q, k, cos, sin, rotary_dim, is_neox, *, norm=None,
                                      kv=None) -> None:
    """:func:`qk_norm_rope_kv_reference_` with token t rotated by row ``t % R`` of cos/sin
    ``[R, rotary_dim/2]``."""
    _norm_qk_(q, k, norm)
    rope_tables_reference_(q, k, cos, sin, rotary_dim, is_neox)
    _store_kv_(k, kv)


def _norm_qk_(q, k, norm) -> None:
    """RMSNorm q and k ``[T, H, D]`` in place: per head (weight ``[D]``), or over all of a
    token's heads (weight ``[H*D]``, element ``h*D + c``; HF OLMo2's whole-projection norm)."""
    if norm is not None:
        q_weight, k_weight, eps, weight_offset, round_once = (*norm, None)[:5]
        for x, w in ((q, q_weight), (k, k_weight)):
            if not x.numel():
                continue
            if w.shape[0] == x.shape[2]:
                x.copy_(rms_norm_heads(x, w, eps, weight_offset, round_once))
            else:
                flat = x.reshape(x.shape[0], x.shape[1] * x.shape[2])
                x.copy_(rms_norm_heads(flat, w, eps, weight_offset, round_once).view(x.shape))


def store_kv_rows_(buffer: torch.Tensor, cache_loc: torch.Tensor, x: torch.Tensor) -> None:
    """``buffer[t // R, cache_loc[t % R]] = x[t]`` for x ``[T, H, D]``, buffer ``[Bc, S, H, D]``
    and cache_loc ``[R]`` (HF ``StaticCache.update``'s ``index_copy_``); a 3-D buffer
    ``[S, H, D]`` is one batch (R = T): ``buffer[cache_loc] = x``. Indexed as eager's
    ``index_put_``: a location in ``[-S, 0)`` is row ``S + loc``; one outside ``[-S, S)``
    raises ``IndexError`` (the ops check their own range first)."""
    loc = cache_loc.long()
    if buffer.dim() == 3:
        buffer.index_put_((loc,), x)
    elif x.shape[0]:
        token = torch.arange(x.shape[0], device=x.device)
        buffer.index_put_((token // loc.shape[0], loc[token % loc.shape[0]]), x)


def _store_kv_(k, kv) -> None:
    if kv is not None:
        v, k_buffer, v_buffer, cache_loc, k_scale, v_scale = kv
        store_kv_rows_(k_buffer, cache_loc, to_kv_cache(k, k_scale, k_buffer.dtype))
        store_kv_rows_(v_buffer, cache_loc, to_kv_cache(v, v_scale, v_buffer.dtype))


def rope_reference(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
) -> torch.Tensor:
    """Return RoPE of ``x`` (``[num_tokens, num_heads, head_size]``) as a new tensor, token t by
    row ``positions[t]`` of the cache, indexed as eager ``cos_sin_cache[positions]`` does (a
    position in ``[-P, 0)`` is row ``P + position``; one outside ``[-P, P)`` raises
    ``IndexError``). The ops check their own range first (``docs/index_ranges.md``)."""
    math = _math_dtype(x.dtype)
    half = rotary_dim // 2
    rows = cos_sin_cache[positions.long()].to(math)  # [T, rot]
    cos = rows[:, None, :half]  # [T, 1, rot/2]
    sin = rows[:, None, half:rotary_dim]
    rot = x[..., :rotary_dim].to(math)
    if is_neox:
        x1, x2 = rot[..., :half], rot[..., half:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    if is_neox:
        rotated = torch.cat((out1, out2), dim=-1)
    else:
        rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def rope_reference_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
) -> None:
    """In-place RoPE of the first ``rotary_dim`` features of q and k (the op's CPU kernel)."""
    for x in (q, k):
        if x.numel():
            x[..., :rotary_dim].copy_(
                rope_reference(x[..., :rotary_dim], positions, cos_sin_cache, rotary_dim, is_neox)
            )


# ---------------------------------------------------------------------------------------------
# Per-token cos/sin tables and mRoPE (the CPU kernels of the tables and mRoPE-cache ops)


def _interleaved_stream_of_columns(n: int, mrope_section, device=None) -> torch.Tensor:
    """The stream (0, 1 or 2) of each of ``n`` pair columns with interleaved streams (Qwen3-VL,
    sglang's ``apply_interleaved_rope``): stream 1 where ``i % 3 == 1 and i < 3 * s1``, stream
    2 where ``i % 3 == 2 and i < 3 * s2``, stream 0 elsewhere."""
    _, s1, s2 = (int(s) for s in mrope_section)
    i = torch.arange(n, device=device)
    stream = torch.zeros(n, dtype=torch.long, device=device)
    stream[(i % 3 == 1) & (i < 3 * s1)] = 1
    stream[(i % 3 == 2) & (i < 3 * s2)] = 2
    return stream


def select_mrope_sections(per_stream: torch.Tensor, mrope_section,
                          interleaved: bool = False) -> torch.Tensor:
    """``[S, T, n]`` -> ``[T, n]``: column ``i`` from stream 0, 1 or 2 by the section
    ``(s0, s1, s2)`` it lies in (sglang's MRotaryEmbedding), or by the interleaved rule
    (:func:`_interleaved_stream_of_columns`); stream 0 when ``mrope_section`` is None
    (``S == 1``)."""
    if mrope_section is None:
        return per_stream[0]
    if interleaved:
        stream = _interleaved_stream_of_columns(per_stream.shape[-1], mrope_section,
                                                per_stream.device)
        columns = torch.arange(per_stream.shape[-1], device=per_stream.device)
        return per_stream[stream, :, columns].transpose(0, 1)  # [n, T] -> [T, n]
    parts = per_stream.split(list(mrope_section), dim=-1)
    return torch.cat([part[stream] for stream, part in enumerate(parts)], dim=-1)


def _rotate_by_token_table_(q, k, table, rotary_dim, is_neox) -> None:
    """Rotate q and k in place by a ``[T, rotary_dim]`` per-token cat(cos, sin) table."""
    arange = torch.arange(table.shape[0], device=table.device)
    rope_reference_(q, k, table, arange, rotary_dim, is_neox)


def _pair_columns(x: torch.Tensor, rotary_dim: int, is_neox: bool):
    """``(x[..., a], x[..., b])`` over pairs i of the last dim: (a, b) = (i, i + rot/2) neox,
    (2i, 2i + 1) GPT-J."""
    if is_neox:
        return x[..., :rotary_dim // 2], x[..., rotary_dim // 2:rotary_dim]
    return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]


def _rotate_by_full_tables_(q, k, per_token, rotary_dim, is_neox) -> None:
    """Rotate q and k in place by per-token ``(cos_a, sin_a, cos_b, sin_b)`` ``[T, rot/2]``:
    ``x_a' = x_a * cos_a - x_b * sin_a``, ``x_b' = x_b * cos_b + x_a * sin_b``."""
    cos_a, sin_a, cos_b, sin_b = (t[:, None, :] for t in per_token)  # [T, 1, rot/2]
    for x in (q, k):
        if not x.numel():
            continue
        x1, x2 = (part.to(cos_a.dtype) for part in _pair_columns(x, rotary_dim, is_neox))
        out1, out2 = x1 * cos_a - x2 * sin_a, x2 * cos_b + x1 * sin_b
        if is_neox:
            rotated = torch.cat((out1, out2), dim=-1)
        else:
            rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
        x[..., :rotary_dim].copy_(rotated.to(x.dtype))


def rope_tables_reference_(q, k, cos, sin, rotary_dim, is_neox, mrope_section=None) -> None:
    """In-place RoPE of q/k ``[T, H, >= rotary_dim]`` with token t rotated by row ``t % R`` of
    cos/sin ``[R, rotary_dim/2]`` (pair tables) or ``[R, rotary_dim]`` (full tables: one value
    per feature, HF's ``x * cos + rotate_half(x) * sin`` for any cos/sin), ``[3, R, ...]``
    with ``mrope_section`` (both columns of pair i from stream(i))."""
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    math = _math_dtype(q.dtype)
    streams = (lambda t: t[None]) if mrope_section is None else (lambda t: t)
    rows = torch.arange(num_tokens, device=q.device) % cos.shape[-2]
    if cos.shape[-1] == rotary_dim:  # full tables
        per_token = [select_mrope_sections(column, mrope_section)
                     for t in (cos, sin)
                     for column in _pair_columns(streams(t)[:, rows].to(math), rotary_dim,
                                                 is_neox)]  # cos_a, cos_b, sin_a, sin_b
        cos_a, cos_b, sin_a, sin_b = per_token
        _rotate_by_full_tables_(q, k, (cos_a, sin_a, cos_b, sin_b), rotary_dim, is_neox)
        return
    halves = [select_mrope_sections(streams(t)[:, rows].to(math), mrope_section)
              for t in (cos, sin)]
    _rotate_by_token_table_(q, k, torch.cat(halves, dim=-1), rotary_dim, is_neox)


def mrope_cache_reference_(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                           mrope_section, interleaved: bool = False) -> None:
    """In-place mRoPE of q/k: pair column i of token t by cache row ``positions[stream(i), t]``
    (positions ``[3, T]``, or ``[T]`` for every stream; streams sectioned or ``interleaved``),
    indexed as :func:`rope_reference`."""
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    per_stream = positions.reshape(-1, num_tokens).expand(3, num_tokens).long()
    rows = cos_sin_cache[per_stream].to(_math_dtype(q.dtype))  # [3, T, rot]
    table = torch.cat([select_mrope_sections(rows[..., :half], mrope_section, interleaved),
                       select_mrope_sections(rows[..., half:rotary_dim], mrope_section,
                                             interleaved)], -1)
    _rotate_by_token_table_(q, k, table, rotary_dim, is_neox)


def angles_tables(angles, cos_scale, sin_scale, table_dtype):
    """The model's own cos/sin tables from its angles, as its elementwise chain computes them:
    ``(cos(angles) * cos_scale).to(table_dtype)`` (likewise sin), cos/sin and the product in
    float32 (HF's ``emb.cos() * attention_scaling`` then ``.to(x.dtype)``)."""
    a = angles.to(torch.float32)
    return ((torch.cos(a) * cos_scale).to(table_dtype),
            (torch.sin(a) * sin_scale).to(table_dtype))


def rope_angles_reference_(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                           mrope_section=None) -> None:
    """In-place RoPE of q/k by the pair tables :func:`angles_tables` computes from angles
    ``[R, rotary_dim/2]`` (``[3, R, ...]`` with ``mrope_section``): the tables op's reference
    applied to them."""
    if q.shape[0] == 0:
        return
    cos, sin = angles_tables(angles, cos_scale, sin_scale, table_dtype)
    rope_tables_reference_(q, k, cos, sin, rotary_dim, is_neox, mrope_section)
