"""Drop-ins for sglang's fused RoPE + KV-store entry point (the QK-norm + RoPE drop-in is in
:mod:`rope_compile.qk_norm`).

* :class:`FusedSetKVBufferArg` and :func:`apply_rope_with_cos_sin_cache_inplace`: sgl_kernel's
  (``fused_set_kv_buffer_arg`` writes the rotated k and v into the KV cache in the same
  launch, ``rope_compile::fused_qk_rope_kv_store_inplace``).
* :func:`set_kv_buffer_native`: the plain torch spelling of the store (what
  ``RotaryEmbedding.forward_native`` runs, and what a compiler pass would match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import fused_qk_rope_kv_store_inplace, rotary_embedding
from .validation import as_token_heads


@dataclass
class FusedSetKVBufferArg:
    """sgl_kernel's argument (same fields, same order): write the rotated key and ``value``
    into rows ``cache_loc`` of ``k_buffer`` / ``v_buffer`` (``[num_slots, H, D]`` or
    ``[num_slots, H * D]``), as ``x / scale`` cast to the buffer's dtype (no division for a
    None scale)."""

    value: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    k_scale: float | None
    v_scale: float | None
    cache_loc: torch.Tensor


def kv_store_views(arg: FusedSetKVBufferArg, num_tokens: int,
                   num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v [T, Hk, Dv], k_buffer [S, Hk, D], v_buffer [S, Hk, Dv])`` views of ``arg``'s
    tensors (2-D ones are split into ``num_kv_heads`` heads), without copying."""

    missing = [f for f in ("value", "k_buffer", "v_buffer", "k_scale", "v_scale", "cache_loc")
               if not hasattr(arg, f)]
    if missing:
        raise TypeError(f"fused_set_kv_buffer_arg must be a FusedSetKVBufferArg (fields value, "
                        f"k_buffer, v_buffer, k_scale, v_scale, cache_loc), got "
                        f"{type(arg).__name__} without {', '.join(missing)}")

    def heads(x: torch.Tensor, rows: int) -> torch.Tensor:
        return x if x.dim() == 3 else x.view(rows, num_kv_heads, -1)

    return (heads(arg.value, num_tokens), heads(arg.k_buffer, arg.k_buffer.shape[0]),
            heads(arg.v_buffer, arg.v_buffer.shape[0]))


def set_kv_buffer_native(arg: FusedSetKVBufferArg, key: torch.Tensor) -> None:
    """Plain torch: ``k_buffer[loc] = (k / k_scale).to(dtype)`` (the division in float32),
    the same for v. ``key`` is the rotated key, ``[T, Hk, D]``."""
    value, k_buffer, v_buffer = kv_store_views(arg, key.shape[0], key.shape[1])
    for x, buf, scale in ((key, k_buffer, arg.k_scale), (value, v_buffer, arg.v_scale)):
        if scale is not None:
            x = x.to(torch.float32) / scale
        buf[arg.cache_loc] = x.to(buf.dtype)


def apply_rope_with_cos_sin_cache_inplace(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    fused_set_kv_buffer_arg: FusedSetKVBufferArg | None = None,
    enable_pdl: bool | None = None,
) -> None:
    """sgl_kernel's function: query ``[T, Hq * head_size]``, key ``[T, Hk * head_size]`` (or
    ``[T, H, head_size]``), ``rotary_dim = cos_sin_cache.shape[1]``; with
    ``fused_set_kv_buffer_arg`` the rotated key and the value are also written into the KV
    cache, in the same launch. ``enable_pdl`` is accepted and ignored (no PDL in Triton)."""
    del enable_pdl
    if fused_set_kv_buffer_arg is None:
        rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
        return
    op = "apply_rope_with_cos_sin_cache_inplace"
    positions = positions.reshape(-1)
    num_tokens = positions.shape[0]
    q = as_token_heads(op, "query", query, num_tokens, head_size)
    k = as_token_heads(op, "key", key, num_tokens, head_size)
    arg = fused_set_kv_buffer_arg
    v, k_buffer, v_buffer = kv_store_views(arg, num_tokens, k.shape[1])
    fused_qk_rope_kv_store_inplace(q, k, v, k_buffer, v_buffer, arg.cache_loc, cos_sin_cache,
                                   positions, cos_sin_cache.shape[1], is_neox, arg.k_scale,
                                   arg.v_scale)


__all__ = [
    "FusedSetKVBufferArg",
    "apply_rope_with_cos_sin_cache_inplace",
    "kv_store_views",
    "set_kv_buffer_native",
]
