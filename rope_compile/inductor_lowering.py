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

import contextlib
import functools

import torch

from .constants import GPU_DEVICE_TYPES

_registered = False


@functools.cache
def _kernel_with_warps(num_warps: int):
    """The kernel wrapped in a one-config autotuner: how a user-defined Triton kernel tells
    Inductor its launch options (no tuning happens with a single config)."""
    import triton

    from .kernels.rope_cache import fused_qk_rope_kernel

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


def _token_count_hint(num_tokens) -> int:
    """A concrete token count for the launch heuristics (1024 for an unbacked symbol).
    Inductor's ``SizeVarAllocator.size_hint`` is ``optimization_hint`` in newer torch (2.13)."""
    from torch._inductor.virtualized import V

    sizevars = V.graph.sizevars
    hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint
    return hint(num_tokens, fallback=1024)


def _pointer_args(args: dict) -> dict:
    """The kernels take every stride as an argument, so a tensor argument only gives them a
    data pointer: a view at offset 0 of a buffer of the same dtype is passed as the buffer
    itself. The generated wrapper then names ``buf2`` instead of building
    ``reinterpret_tensor(buf2, size, stride, 0)`` on every call (a few µs of host time per
    view, four or five views per launch). Writes through the pointer are tracked on the buffer,
    as they are for the view."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    out = {}
    for name, value in args.items():
        view = value.data if isinstance(value, ir.TensorBox) else None
        base = getattr(view, "data", None)
        if (isinstance(view, ir.ReinterpretView) and isinstance(base, ir.StorageBox | ir.Buffer)
                and view.get_dtype() == base.get_dtype()
                and V.graph.sizevars.statically_known_equals(view.layout.offset, 0)):
            value = ir.TensorBox(base) if isinstance(base, ir.StorageBox) else (
                ir.TensorBox.create(base))
        out[name] = value
    return out


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

    from . import ops  # noqa: F401  (defines the op)
    from .kernels.rope_cache import launch_shape, runtime_args

    op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    @register_lowering(op, type_promotion_kind=None)
    def _lower(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
               wrap_negative_positions=False):
        device = q.get_device()
        if device is None or device.type not in GPU_DEVICE_TYPES:
            return fallback(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                            wrap_negative_positions)
        # The cache may be a computed view (HF / gpt-fast tables built by the pass): give it
        # (and positions) a real, contiguous buffer, one per graph that every layer's call
        # shares. q and k are as_strided views of their storage (the op mutates them), so they
        # already have a fixed layout.
        cos_sin_cache = _shared_contiguous(cos_sin_cache)
        positions = _shared_contiguous(positions)
        num_tokens, num_q_heads, _ = q.get_size()
        hq, hk = int(num_q_heads), int(k.get_size()[1])
        tokens_hint = _token_count_hint(num_tokens)
        # Positions are not read here: the kernel skips a token whose position is out of
        # range, and wraps negative ones when asked (the op's index rule).
        shape = launch_shape(tokens_hint, hq, hk, rotary_dim, is_neox, device.type,
                             q.get_dtype().itemsize, wrap_positions=wrap_negative_positions)
        args = runtime_args(q, k, cos_sin_cache, positions, q_stride=q.get_stride(),
                            k_stride=k.get_stride(), cache_stride=cos_sin_cache.get_stride(),
                            positions_stride=positions.get_stride(),
                            num_positions=cos_sin_cache.get_size()[0], num_q_heads=hq,
                            num_k_heads=hk)
        kernel_idx = kernel_side_table.add_kernel(_kernel_with_warps(shape.options["num_warps"]))
        ir.UserDefinedTritonKernel(
            kernel_idx=kernel_idx,
            grid=[(num_tokens, shape.head_splits, 1)],
            tma_descriptor_metadata={},
            kernel_args={**_pointer_args(args), **shape.constexprs},
        )
        return None

    _register_tables_lowerings()
    _register_kv_lowerings()
    _registered = True


# ---------------------------------------------------------------------------------------------
# The cos/sin-tables op and the mRoPE-cache op (rope_compile/kernels/rope_tables.py): the same
# lowering, to their one Triton kernel.


@functools.cache
def _tables_kernel_with_warps(num_warps: int):
    """The tables kernel in a one-config autotuner (see :func:`_kernel_with_warps`)."""
    import triton

    from .kernels.rope_tables import fused_qk_rope_tables_kernel

    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(
        fused_qk_rope_tables_kernel)


def _shared_read_input(x):
    """A read-only input with fixed strides, made once per graph however many calls read it.

    A view of a buffer (a ``[..., :rot/2]`` half of an HF table, a ``freqs_cis[..., 0]`` pair
    pick, an expanded row) is passed as that view, strides and all (the kernel takes any
    strides), as Inductor's own ``require_strides`` turns a view into a ``ReinterpretView``;
    a buffer with a fixed layout (a graph input) as it is. Anything else gets a contiguous
    buffer of its own, as the first op's lowering gives its cache."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    made = V.graph.__dict__.setdefault("_rope_compile_read_inputs", {})
    if id(x) in made:
        return made[id(x)][1]
    fixed = None
    if isinstance(x, ir.TensorBox) and isinstance(x.data, ir.ReinterpretView):
        fixed = x
    elif isinstance(x, ir.TensorBox) and isinstance(x.data, ir.BaseView):
        x.data.realize()
        if ir.is_storage_and_layout(x.data.unwrap_view()):
            with contextlib.suppress(NotImplementedError):
                fixed = ir.TensorBox(ir.ExternKernel.convert_to_reinterpret_view(x.data))
    elif ir.is_storage_and_layout(x) and isinstance(x.get_layout(), ir.FixedLayout):
        fixed = x
    if fixed is None:
        x.realize()
        fixed = ir.ExternKernel.require_contiguous(x)
    made[id(x)] = (x, fixed)  # x kept: its id stays unique
    return fixed


def _as_float(x):
    """A float argument as a Python float (an int 1 would be specialized to a constexpr); a
    symbolic one as it is."""
    return float(x) if isinstance(x, int | float) else x


def _register_tables_lowerings() -> None:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler, register_lowering
    from torch._inductor.virtualized import V

    from . import ops  # noqa: F401  (defines the ops)

    # rope_compile.kernels.rope_tables is imported when a graph uses the ops, not here.

    def launch(q, k, rotary_dim, is_neox, mrope_section, runtime_args, from_cache,
               full_tables=False, angles_table_dtype=None, wrap_positions=False,
               mrope_interleaved=False):
        """``runtime_args(hq, hk)``: the kernel's runtime arguments for q/k's head counts;
        ``full_tables``: TABLES ``rotary_dim`` wide (one cos/sin per feature);
        ``angles_table_dtype``: the ANGLES source, cos/sin rounded to that dtype;
        ``wrap_positions``: CACHE, negative positions from the cache's end;
        ``mrope_interleaved``: the mRoPE streams interleaved by column."""
        from .kernels.rope_tables import launch_shape

        num_tokens, num_q_heads, _ = q.get_size()
        hq, hk = int(num_q_heads), int(k.get_size()[1])
        tokens_hint = _token_count_hint(num_tokens)
        shape = launch_shape(tokens_hint, hq, hk, rotary_dim, is_neox, q.get_device().type,
                             q.get_dtype().itemsize, from_cache=from_cache,
                             mrope_section=mrope_section, full_tables=full_tables,
                             angles_table_dtype=angles_table_dtype,
                             wrap_positions=wrap_positions,
                             mrope_interleaved=mrope_interleaved)
        kernel = _tables_kernel_with_warps(shape.options["num_warps"])
        ir.UserDefinedTritonKernel(
            kernel_idx=kernel_side_table.add_kernel(kernel),
            grid=[(num_tokens, shape.head_splits, 1)],
            tma_descriptor_metadata={},
            kernel_args={**_pointer_args(runtime_args(hq, hk)), **shape.constexprs},
        )

    def on_gpu(q) -> bool:
        device = q.get_device()
        return device is not None and device.type in GPU_DEVICE_TYPES

    tables_op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default
    tables_fallback = fallback_handler(tables_op, add_to_fallback_set=False)

    @register_lowering(tables_op, type_promotion_kind=None)
    def _lower_tables(q, k, cos, sin, rotary_dim, is_neox, mrope_section=None):
        if not on_gpu(q):
            return tables_fallback(q, k, cos, sin, rotary_dim, is_neox, mrope_section)
        from .kernels.rope_tables import tables_runtime_args

        cos, sin = _shared_read_input(cos), _shared_read_input(sin)
        # The tables' width picks their form (the fake validated it: rotary_dim/2 or rotary_dim).
        full = V.graph.sizevars.statically_known_equals(cos.get_size()[-1], rotary_dim)
        launch(q, k, rotary_dim, is_neox, mrope_section, lambda hq, hk: tables_runtime_args(
            q, k, cos, sin, q_stride=q.get_stride(), k_stride=k.get_stride(),
            cos_size=cos.get_size(), cos_stride=cos.get_stride(), sin_stride=sin.get_stride(),
            num_q_heads=hq, num_k_heads=hk), from_cache=False, full_tables=full)
        return None

    angles_op = torch.ops.rope_compile.fused_qk_rope_with_angles_inplace.default
    angles_fallback = fallback_handler(angles_op, add_to_fallback_set=False)

    @register_lowering(angles_op, type_promotion_kind=None)
    def _lower_angles(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox,
                      mrope_section=None):
        if not on_gpu(q):
            return angles_fallback(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim,
                                   is_neox, mrope_section)
        from .kernels.rope_tables import angles_runtime_args

        # HF's freqs, a transposed view of an mm output, is passed as that view (any strides).
        angles = _shared_read_input(angles)
        launch(q, k, rotary_dim, is_neox, mrope_section, lambda hq, hk: angles_runtime_args(
            q, k, angles, q_stride=q.get_stride(), k_stride=k.get_stride(),
            angles_size=angles.get_size(), angles_stride=angles.get_stride(), num_q_heads=hq,
            num_k_heads=hk, cos_scale=_as_float(cos_scale),
            sin_scale=_as_float(sin_scale)), from_cache=False,
            angles_table_dtype=table_dtype)
        return None

    mrope_op = torch.ops.rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace.default
    mrope_fallback = fallback_handler(mrope_op, add_to_fallback_set=False)

    @register_lowering(mrope_op, type_promotion_kind=None)
    def _lower_mrope(q, k, cos_sin_cache, positions, rotary_dim, is_neox, mrope_section,
                     wrap_negative_positions=False, mrope_interleaved=False):
        if not on_gpu(q):
            return mrope_fallback(q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                                  mrope_section, wrap_negative_positions, mrope_interleaved)
        from .kernels.rope_tables import cache_runtime_args

        cache, pos = _shared_read_input(cos_sin_cache), _shared_read_input(positions)
        launch(q, k, rotary_dim, is_neox, mrope_section, lambda hq, hk: cache_runtime_args(
            q, k, cache, pos, q_stride=q.get_stride(), k_stride=k.get_stride(),
            cache_size=cache.get_size(), cache_stride=cache.get_stride(),
            positions_size=pos.get_size(), positions_stride=pos.get_stride(), num_q_heads=hq,
            num_k_heads=hk), from_cache=True, wrap_positions=wrap_negative_positions,
            mrope_interleaved=mrope_interleaved)
        return None


# ---------------------------------------------------------------------------------------------
# The six RoPE + KV-store / QK-norm + RoPE (+ store) ops (rope_compile/kernels/rope_kv_store.py):
# one kernel, one lowering. The written tensors (q, k, k_buffer, v_buffer) are passed as the
# views the op got (ReinterpretViews of their storage); UserDefinedTritonKernel finds what the
# kernel stores to (its TTIR) and gives each a MutationOutput, as for q and k above. fp8
# buffers keep the op call: the kernel writes their bits through a uint8 view, which a lowering
# cannot take of an IR buffer without a copy.


@functools.cache
def _kv_kernel_with_warps(num_warps: int):
    """The KV/norm kernel in a one-config autotuner (see :func:`_kernel_with_warps`)."""
    import triton

    from .kernels.rope_kv_store import fused_qk_norm_rope_kv_kernel

    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(
        fused_qk_norm_rope_kv_kernel)


def _written_input(x):
    """A tensor the kernel writes, as it must be passed: its own buffer (layout frozen) or a
    ``ReinterpretView`` of one. None when it is neither (a copy would lose the write): the op
    call is kept then."""
    from torch._inductor import ir

    if not isinstance(x, ir.TensorBox):
        return None
    if isinstance(x.data, ir.ReinterpretView):
        return x
    if isinstance(x.data, ir.BaseView):
        if not ir.is_storage_and_layout(x.data.unwrap_view()):
            return None
        try:
            return ir.TensorBox(ir.ExternKernel.convert_to_reinterpret_view(x.data))
        except NotImplementedError:
            return None
    if ir.is_storage_and_layout(x):
        x.freeze_layout()
        return x
    return None


def _unit_last_stride(x):
    """A read input whose last dim the kernel reads contiguously (v): as it is when its last
    stride is 1 (or the dim has one element), else a contiguous copy."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    size, stride = x.get_size(), x.get_stride()
    if V.graph.sizevars.statically_known_leq(size[-1], 1) or (
            V.graph.sizevars.statically_known_equals(stride[-1], 1)):
        return x
    return ir.ExternKernel.require_contiguous(x)


def _register_kv_lowerings() -> None:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler, register_lowering

    from . import ops  # noqa: F401  (defines the ops)

    def register(op, *, tables: bool):
        fallback = fallback_handler(op, add_to_fallback_set=False)
        schema = op._schema.arguments
        names = [a.name for a in schema]
        defaults = {a.name: a.default_value for a in schema if a.has_default_value()}

        @register_lowering(op, type_promotion_kind=None)
        def _lower(*args, **kwargs):
            a = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
            lowered = _lower_kv(a, tables)
            return fallback(*args, **kwargs) if lowered is False else None

    def _lower_kv(a, tables: bool):
        """Launch the kernel for the op's arguments ``a`` (by name); False: keep the op call."""
        from .kernels.rope_kv_store import FromCache, FromTables, Operand, is_fp8, plan_launch

        q = a["q"]
        device = q.get_device()
        if device is None or device.type not in GPU_DEVICE_TYPES:
            return False
        store = "k_buffer" in a
        if store and (is_fp8(a["k_buffer"].get_dtype()) or is_fp8(a["v_buffer"].get_dtype())):
            return False
        written = {n: _written_input(a[n]) for n in ("q", "k", "k_buffer", "v_buffer")
                   if n in a}
        if any(x is None for x in written.values()):
            return False

        def operand(x):
            return Operand(x, tuple(x.get_size()), tuple(x.get_stride()))

        q, k = operand(written["q"]), operand(written["k"])
        if tables:
            rope = FromTables(operand(_shared_read_input(a["cos"])),
                              operand(_shared_read_input(a["sin"])))
        else:
            rope = FromCache(operand(_shared_read_input(a["cos_sin_cache"])),
                             operand(_shared_read_input(a["positions"])))
        norm = kv = None
        if "q_weight" in a:
            norm = (operand(_shared_read_input(a["q_weight"])),
                    operand(_shared_read_input(a["k_weight"])), a["eps"], a["weight_offset"],
                    a["round_once"])
        if store:
            v = _unit_last_stride(_shared_read_input(a["v"]))
            kv = (operand(v), operand(written["k_buffer"]), operand(written["v_buffer"]),
                  operand(_shared_read_input(a["cache_loc"])), a["k_scale"], a["v_scale"])
        plan = plan_launch(q, k, rope, a["rotary_dim"], a["is_neox"], norm=norm, kv=kv,
                           device_type=device.type, elem_bytes=q.ptr.get_dtype().itemsize,
                           wrap_positions=a.get("wrap_negative_positions", False),
                           wrap_loc=a.get("wrap_negative_cache_loc", True),
                           num_tokens_hint=_token_count_hint(q.size[0]))
        ir.UserDefinedTritonKernel(
            kernel_idx=kernel_side_table.add_kernel(
                _kv_kernel_with_warps(plan.options["num_warps"])),
            grid=[(*plan.grid, 1)],
            tma_descriptor_metadata={},
            kernel_args={**_pointer_args(plan.args), **plan.constexprs},
        )
        return True

    rc = torch.ops.rope_compile
    for op in (rc.fused_qk_rope_kv_store_inplace, rc.fused_qk_norm_rope_inplace,
               rc.fused_qk_norm_rope_kv_store_inplace):
        register(op.default, tables=False)
    for op in (rc.fused_qk_rope_kv_store_tables_inplace, rc.fused_qk_norm_rope_tables_inplace,
               rc.fused_qk_norm_rope_kv_store_tables_inplace):
        register(op.default, tables=True)
