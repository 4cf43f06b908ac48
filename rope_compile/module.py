"""``RotaryEmbedding``: sglang's module, with its native, XPU and CUDA forwards.

``forward_native`` is the plain torch spelling (sglang / vLLM) that the compiler pass
recognises; ``forward_xpu`` and ``forward_cuda`` call the in-place ops directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .kv_store import FusedSetKVBufferArg, kv_store_views, set_kv_buffer_native
from .ops import (
    fused_qk_rope_kv_store_inplace,
    fused_qk_rope_with_cos_sin_cache_inplace,
    rotary_embedding,
)
from .options import DEFAULT_HEAD_SIZES, GPU_DEVICE_TYPES, validate_rotary_embedding_args
from .reference import compute_cos_sin_cache
from .validation import as_token_heads

# Head sizes the fused kernel path is taken for (as sgl-kernel-xpu); others use the fallback op.
FUSED_HEAD_SIZES = DEFAULT_HEAD_SIZES


def apply_rotary_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox_style: bool
) -> torch.Tensor:
    """x ``[T, H, rot]``, cos/sin ``[T, rot/2]``: the native RoPE the pass matches."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox_style:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox_style:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a ``[max_position, rotary_dim]`` fp32 cos/sin cache.

    The arguments are checked here (``rope_compile.options.validate_rotary_embedding_args``): a
    bad one (an odd ``rotary_dim``, one larger than ``head_size``...) raises a ``ValueError``
    naming it, rather than a shape error at the first forward."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position_embeddings: int,
        base: float,
        is_neox_style: bool,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        head_size, rotary_dim, max_position_embeddings, base, is_neox_style, dtype = (
            validate_rotary_embedding_args(head_size, rotary_dim, max_position_embeddings, base,
                                           is_neox_style, dtype))
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.is_neox_style = is_neox_style
        self.dtype = dtype
        cache = compute_cos_sin_cache(rotary_dim, max_position_embeddings, base, torch.float32)
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"is_neox_style={self.is_neox_style}")

    def forward_native(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        offsets: torch.Tensor | None = None,
        fused_set_kv_buffer_arg: FusedSetKVBufferArg | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain torch RoPE; with ``fused_set_kv_buffer_arg`` the rotated key and the value are
        then written into the KV cache (``set_kv_buffer_native``)."""
        if offsets is not None:
            positions = positions + offsets
        positions = positions.flatten()
        num_tokens = positions.shape[0]
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)

        query_shape = query.shape
        query = query.view(num_tokens, -1, self.head_size)
        query_rot = query[..., : self.rotary_dim]
        query_pass = query[..., self.rotary_dim :]
        query_rot = apply_rotary_emb(query_rot, cos, sin, self.is_neox_style)
        query = torch.cat((query_rot, query_pass), dim=-1).reshape(query_shape)

        key_shape = key.shape
        key = key.view(num_tokens, -1, self.head_size)
        key_rot = key[..., : self.rotary_dim]
        key_pass = key[..., self.rotary_dim :]
        key_rot = apply_rotary_emb(key_rot, cos, sin, self.is_neox_style)
        key = torch.cat((key_rot, key_pass), dim=-1)
        if fused_set_kv_buffer_arg is not None:
            set_kv_buffer_native(fused_set_kv_buffer_arg, key)
        return query, key.reshape(key_shape)

    def _cache_like(self, query: torch.Tensor) -> torch.Tensor:
        """The cache in the query's dtype. Eager converts the buffer once (as sglang does); under
        torch.compile the buffer is not written, the cast is part of the graph."""
        if self.cos_sin_cache.dtype == query.dtype:
            return self.cos_sin_cache
        if torch.compiler.is_compiling():
            return self.cos_sin_cache.to(query.dtype)
        self.cos_sin_cache = self.cos_sin_cache.to(query.dtype)
        return self.cos_sin_cache

    def forward_xpu(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        offsets: torch.Tensor | None = None,
        fused_set_kv_buffer_arg: FusedSetKVBufferArg | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if offsets is not None:
            positions = torch.add(positions, offsets)
        cos_sin_cache = self._cache_like(query)
        if fused_set_kv_buffer_arg is not None:
            # RoPE of q and k and the KV-cache store of k and v, one launch (any head size).
            positions = positions.flatten()
            num_tokens = positions.shape[0]
            op = "RotaryEmbedding.forward_xpu"
            q = as_token_heads(op, "query", query, num_tokens, self.head_size)
            k = as_token_heads(op, "key", key, num_tokens, self.head_size)
            arg = fused_set_kv_buffer_arg
            v, k_buffer, v_buffer = kv_store_views(arg, num_tokens, k.shape[1])
            fused_qk_rope_kv_store_inplace(q, k, v, k_buffer, v_buffer, arg.cache_loc,
                                           cos_sin_cache, positions, self.rotary_dim,
                                           self.is_neox_style, arg.k_scale, arg.v_scale)
        elif self.head_size in FUSED_HEAD_SIZES:
            positions = positions.flatten()
            num_tokens = positions.shape[0]
            op = "RotaryEmbedding.forward_xpu"
            q = as_token_heads(op, "query", query, num_tokens, self.head_size)
            k = as_token_heads(op, "key", key, num_tokens, self.head_size)
            fused_qk_rope_with_cos_sin_cache_inplace(
                q[..., : self.rotary_dim],
                k[..., : self.rotary_dim],
                cos_sin_cache,
                positions,
                self.rotary_dim,
                self.is_neox_style,
            )
        else:
            rotary_embedding(
                positions, query, key, self.head_size, cos_sin_cache, self.is_neox_style
            )
        return query, key

    # The CUDA path is the same Triton kernel.
    forward_cuda = forward_xpu

    def forward(self, positions, query, key, offsets=None, fused_set_kv_buffer_arg=None):
        device_type = query.device.type
        if device_type in GPU_DEVICE_TYPES:
            return self.forward_xpu(positions, query, key, offsets, fused_set_kv_buffer_arg)
        return self.forward_native(positions, query, key, offsets, fused_set_kv_buffer_arg)
