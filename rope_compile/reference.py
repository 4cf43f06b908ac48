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


def rope_reference(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
) -> torch.Tensor:
    """Return RoPE of ``x`` (``[num_tokens, num_heads, head_size]``) as a new tensor."""
    math = _math_dtype(x.dtype)
    half = rotary_dim // 2
    rows = cos_sin_cache.index_select(0, positions.long()).to(math)  # [T, rot]
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
