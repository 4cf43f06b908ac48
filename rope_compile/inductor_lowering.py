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
        import triton
    except ImportError:
        return
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler, register_lowering
    from torch._inductor.virtualized import V

    from . import ops  # noqa: F401  (defines the op)
    from .triton_kernel import choose_config, device_launch_options

    op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    @register_lowering(op, type_promotion_kind=None)
    def _lower(q, k, cos_sin_cache, positions, rotary_dim, is_neox):
        device = q.get_device()
        if device is None or device.type not in ("cuda", "xpu"):
            return fallback(q, k, cos_sin_cache, positions, rotary_dim, is_neox)
        sizevars = V.graph.sizevars
        # The cache may be a computed view (HF / gpt-fast tables built by the pass): give it
        # (and positions) a real, contiguous buffer, one per graph that every layer's call
        # shares. q and k are as_strided views of their storage (the op mutates them), so they
        # already have a fixed layout.
        cos_sin_cache = _shared_contiguous(cos_sin_cache)
        positions = _shared_contiguous(positions)
        num_tokens, num_q_heads, _ = q.get_size()
        num_k_heads = k.get_size()[1]
        q_stride, k_stride = q.get_stride(), k.get_stride()
        tokens_hint = sizevars.size_hint(num_tokens, fallback=1024)
        hq, hk = int(num_q_heads), int(num_k_heads)
        cfg = choose_config(tokens_hint, hq, hk, rotary_dim)
        block_h, splits = cfg["block_h"], cfg["head_splits"]
        warps = device_launch_options(device.type, block_h * 2 * cfg["half_pad"],
                                      q.get_dtype().itemsize)["num_warps"]
        kernel_idx = kernel_side_table.add_kernel(_kernel_with_warps(warps))
        ir.UserDefinedTritonKernel(
            kernel_idx=kernel_idx,
            grid=[(num_tokens, splits, 1)],
            tma_descriptor_metadata={},
            kernel_args={
                "q_ptr": q, "k_ptr": k, "cache_ptr": cos_sin_cache, "pos_ptr": positions,
                "q_token_stride": q_stride[0], "q_head_stride": q_stride[1],
                "k_token_stride": k_stride[0], "k_head_stride": k_stride[1],
                "cache_row_stride": cos_sin_cache.get_stride()[0],
                "cache_col_stride": cos_sin_cache.get_stride()[1],
                "pos_stride": positions.get_stride()[0],
                "num_q_heads": hq, "num_k_heads": hk,
                "ROT": rotary_dim, "HALF_PAD": cfg["half_pad"], "BLOCK_H": block_h,
                "IS_NEOX": bool(is_neox),
                "Q_ITERS": triton.cdiv(triton.cdiv(hq, block_h), splits),
                "K_ITERS": triton.cdiv(triton.cdiv(hk, block_h), splits),
            },
        )
        return None

    _registered = True
