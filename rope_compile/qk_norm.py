"""Drop-in for vLLM's fused QK-norm + RoPE entry point.

* :func:`fused_qk_norm_rope`: vLLM's ``torch.ops._C.fused_qk_norm_rope`` on a packed qkv
  (``rope_compile::fused_qk_norm_rope_inplace``), plus a Gemma ``weight_offset`` and the
  norm's ``round_once``.
"""

from __future__ import annotations

import torch

from .ops import fused_qk_norm_rope_inplace


def fused_qk_norm_rope(
    qkv: torch.Tensor,
    num_heads_q: int,
    num_heads_k: int,
    num_heads_v: int,
    head_dim: int,
    eps: float,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    position_ids: torch.Tensor,
    *,
    weight_offset: float = 0.0,
    round_once: bool | None = None,
) -> None:
    """vLLM's op: per-head RMSNorm (``q_weight`` / ``k_weight`` ``[head_dim]``) then RoPE of the
    q and k parts of a packed ``qkv`` ``[T, (Hq + Hk + Hv) * head_dim]``, in place (v is left
    alone). ``weight_offset=1.0`` is Gemma's ``x * (1 + w)``; ``round_once`` the rounding, as
    :func:`rope_compile.ops.fused_qk_norm_rope_inplace` (None: as the offset says)."""
    num_tokens = qkv.shape[0]
    q_size, k_size = num_heads_q * head_dim, num_heads_k * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != q_size + k_size + num_heads_v * head_dim:
        raise ValueError(
            f"fused_qk_norm_rope: qkv must be [num_tokens, (num_heads_q + num_heads_k + "
            f"num_heads_v) * head_dim = {q_size + k_size + num_heads_v * head_dim}], got "
            f"{tuple(qkv.shape)}")
    q = qkv[:, :q_size].view(num_tokens, num_heads_q, head_dim)
    k = qkv[:, q_size:q_size + k_size].view(num_tokens, num_heads_k, head_dim)
    fused_qk_norm_rope_inplace(q, k, q_weight, k_weight, eps, weight_offset, cos_sin_cache,
                               position_ids.reshape(-1), cos_sin_cache.shape[1], is_neox,
                               round_once=round_once)


__all__ = ["fused_qk_norm_rope"]
