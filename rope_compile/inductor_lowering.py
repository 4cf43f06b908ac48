"""Inductor lowering of the fused op on GPUs: launch the Triton kernel from generated code.

Without it, Inductor calls ``torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace``
from its wrapper, which goes through the dispatcher, Python validation and Triton's Python
launcher: ~120 us of host time per call on the H100 host, more than the kernels the rewrite
removes. With it, the op becomes an ``ir.UserDefinedTritonKernel`` (as ``wrap_triton`` kernels
do), which Inductor launches with its own low-overhead launcher and includes in CUDA graphs.
Arguments were validated by the fake implementation at trace time.

CPU tensors (and any device Triton does not serve) keep the plain fallback call.
"""

from __future__ import annotations

import functools

import torch

from .constants import GPU_DEVICE_TYPES

_registered = False


@functools.cache
def _kernel_with_warps(num_warps: int):
    """The kernel wrapped in a one-config autotuner: how a user-defined Triton kernel tells
    Inductor its launch options (no tuning happens with a single config)."""
    import triton

    from .triton_kernel import fused_qk_rope_kernel

    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(
        fused_qk_rope_kernel)


def _shared_contiguous(x):
    """``x`` as a contiguous buffer, made once per graph however many calls read it.

    Every layer's call gets the same IR node for the table and positions the pass built once
    (one FX node). Without this, each call realized its own copy of a view that has no buffer
    of its own (an expand): one more kernel, or one more store, per layer."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    made = V.graph.__dict__.setdefault("_rope_compile_contiguous_inputs", {})
    if id(x) not in made:
        x.realize()
        made[id(x)] = (x, ir.ExternKernel.require_contiguous(x))  # x kept: its id stays unique
    return made[id(x)][1]


def register_inductor_lowering() -> None:
    """Register the lowering once (idempotent). Needs Triton; without it nothing is done."""
    global _registered
    if _registered:
        return
    try:
        import triton  # noqa: F401  (no Triton: the op stays a fallback call)
    except ImportError:
        return
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler, register_lowering
    from torch._inductor.virtualized import V

    from . import ops  # noqa: F401  (defines the op)
    from .triton_kernel import launch_shape, runtime_args

    op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    @register_lowering(op, type_promotion_kind=None)
    def _lower(q, k, cos_sin_cache, positions, rotary_dim, is_neox):
        device = q.get_device()
        if device is None or device.type not in GPU_DEVICE_TYPES:
            return fallback(q, k, cos_sin_cache, positions, rotary_dim, is_neox)
        # The cache may be a computed view (HF / gpt-fast tables built by the pass): give it
        # (and positions) a real, contiguous buffer, one per graph that every layer's call
        # shares. q and k are as_strided views of their storage (the op mutates them), so they
        # already have a fixed layout.
        cos_sin_cache = _shared_contiguous(cos_sin_cache)
        positions = _shared_contiguous(positions)
        num_tokens, num_q_heads, _ = q.get_size()
        hq, hk = int(num_q_heads), int(k.get_size()[1])
        tokens_hint = V.graph.sizevars.size_hint(num_tokens, fallback=1024)
        shape = launch_shape(tokens_hint, hq, hk, rotary_dim, is_neox, device.type,
                             q.get_dtype().itemsize)
        args = runtime_args(q, k, cos_sin_cache, positions, q_stride=q.get_stride(),
                            k_stride=k.get_stride(), cache_stride=cos_sin_cache.get_stride(),
                            positions_stride=positions.get_stride(), num_q_heads=hq,
                            num_k_heads=hk)
        kernel_idx = kernel_side_table.add_kernel(_kernel_with_warps(shape.options["num_warps"]))
        ir.UserDefinedTritonKernel(
            kernel_idx=kernel_idx,
            grid=[(num_tokens, shape.head_splits, 1)],
            tma_descriptor_metadata={},
            kernel_args={**args, **shape.constexprs},
        )
        return None

    _registered = True
