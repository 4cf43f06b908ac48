"""torch.library registration of the two in-place RoPE ops.

* ``rope_compile::fused_qk_rope_with_cos_sin_cache_inplace(q, k, cos_sin_cache, positions,
  rotary_dim, is_neox)``: q ``[T, Hq, rotary_dim]`` and k ``[T, Hk, rotary_dim]`` (usually
  strided views), rotated in place; the op the compiler pass emits.
* ``rope_compile::rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)``:
  the generic fallback, query/key ``[T, H * head_size]`` or ``[..., H, head_size]``, any head size.

Both mutate only their q/k (query/key) arguments. Kernels: the Triton launcher for ``cuda`` and
``xpu`` (imported lazily, so the package imports without Triton), the float32 reference applied
in place for ``cpu``. The fake implementations validate and touch no data.
"""

from __future__ import annotations

import torch

from . import autograd, fast_launch
from .constants import GPU_DEVICE_TYPES
from .reference import rope_reference_
from .validation import (  # noqa: F401  (names and checks re-exported for callers)
    _FUSED,
    _GENERIC,
    FUSED_OP_NAME,
    GENERIC_OP_NAME,
    check_positions_in_range,
    check_positions_on_device_enabled,
    generic_views,
    validate_fused,
)


def _launch_triton(q, k, cos_sin_cache, positions, rotary_dim, is_neox, op) -> None:
    if check_positions_on_device_enabled():
        check_positions_in_range(op, positions, cos_sin_cache.shape[0])
    from .triton_kernel import launch_fused_qk_rope

    launch_fused_qk_rope(q, k, cos_sin_cache, positions, rotary_dim, is_neox)


# The ops are defined on a torch.library.Library rather than with torch.library.custom_op:
# custom_op adds Python autograd / ADInplaceOrView / aliasing-check layers to every call, which
# measured ~350 us of host time per call inside a compiled graph on an H100 host (torch 2.11,
# benchmarks/host_breakdown.py). Here the dispatcher calls the kernels below directly. The
# Autograd kernels (rope_compile/autograd.py, which says why not register_autograd) only
# redispatch below autograd when no input requires grad.
_LIB = torch.library.Library("rope_compile", "DEF")
_LIB.define(
    "fused_qk_rope_with_cos_sin_cache_inplace(Tensor(a0!) q, Tensor(a1!) k, Tensor cos_sin_cache, "
    "Tensor positions, int rotary_dim, bool is_neox) -> ()"
)
_LIB.define(
    "rotary_embedding(Tensor positions, Tensor(a1!) query, Tensor(a2!) key, int head_size, "
    "Tensor cos_sin_cache, bool is_neox) -> ()"
)


def _register(name: str, *, cpu, gpu, fake) -> None:
    """CPU kernel, the Triton kernel for CUDA and XPU, and the fake implementation."""
    _LIB.impl(name, cpu, "CPU")
    for dispatch_key in (device.upper() for device in GPU_DEVICE_TYPES):
        _LIB.impl(name, gpu, dispatch_key)
    torch.library.register_fake(f"rope_compile::{name}", fake, lib=_LIB)


def _fused_qk_rope_cpu(q, k, cos_sin_cache, positions, rotary_dim, is_neox) -> None:
    validate_fused(q, k, cos_sin_cache, positions, rotary_dim)
    check_positions_in_range(_FUSED, positions, cos_sin_cache.shape[0])
    rope_reference_(q, k, cos_sin_cache, positions, rotary_dim, is_neox)


def _fused_qk_rope_triton(q, k, cos_sin_cache, positions, rotary_dim, is_neox) -> None:
    validate_fused(q, k, cos_sin_cache, positions, rotary_dim)
    _launch_triton(q, k, cos_sin_cache, positions, rotary_dim, is_neox, _FUSED)


def _fused_qk_rope_fake(q, k, cos_sin_cache, positions, rotary_dim, is_neox) -> None:
    validate_fused(q, k, cos_sin_cache, positions, rotary_dim)


_register(_FUSED, cpu=_fused_qk_rope_cpu, gpu=_fused_qk_rope_triton, fake=_fused_qk_rope_fake)
fused_qk_rope_op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default


def _rotary_embedding_cpu(positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
    q, k, pos, rot = generic_views(positions, query, key, head_size, cos_sin_cache)
    check_positions_in_range(_GENERIC, pos, cos_sin_cache.shape[0])
    rope_reference_(q, k, cos_sin_cache, pos, rot, is_neox)


def _rotary_embedding_triton(positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
    q, k, pos, rot = generic_views(positions, query, key, head_size, cos_sin_cache)
    _launch_triton(q, k, cos_sin_cache, pos, rot, is_neox, _GENERIC)


def _rotary_embedding_fake(positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
    generic_views(positions, query, key, head_size, cos_sin_cache)


_register(_GENERIC, cpu=_rotary_embedding_cpu, gpu=_rotary_embedding_triton,
          fake=_rotary_embedding_fake)
rotary_embedding_op = torch.ops.rope_compile.rotary_embedding.default
autograd.register(_LIB)


def fused_qk_rope_with_cos_sin_cache_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
) -> None:
    """Rotate ``q`` ``[T, Hq, rotary_dim]`` and ``k`` ``[T, Hk, rotary_dim]`` in place, in one
    kernel launch. Drop-in for ``sgl_kernel``'s function of the same name.

    Eager calls on GPU tensors take :mod:`rope_compile.fast_launch` where nothing needs the
    dispatcher; the result is the same either way."""
    if not fast_launch.try_fused(q, k, cos_sin_cache, positions, rotary_dim, is_neox):
        fused_qk_rope_op(q, k, cos_sin_cache, positions, rotary_dim, is_neox)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Generic in-place RoPE of query/key ``[T, H * head_size]``, any head size and any even
    ``rotary_dim = cos_sin_cache.shape[1] <= head_size``
    (the counterpart of ``torch.ops.sgl_kernel.rotary_embedding``)."""
    if not fast_launch.try_generic(positions, query, key, head_size, cos_sin_cache, is_neox):
        rotary_embedding_op(positions, query, key, head_size, cos_sin_cache, is_neox)
