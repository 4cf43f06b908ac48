"""The eager fast path of the public functions: relaunch an already-compiled Triton kernel
straight from Python when a call has the layout of one already checked and launched.

Why: a direct eager call through ``torch.ops`` pays the dispatcher, the argument checks and
Triton's per-call argument binding and specialisation, about 117 us of host time per call on
the H100 host against 18-28 us for flashinfer's (``benchmarks/host_breakdown.py``). RoPE runs
twice per layer per decode step, so this is the time a served model spends on it.

How: the first call with a given layout goes the normal way (full checks, then
``fused_qk_rope_kernel[grid](...)``, which returns Triton's compiled kernel) and stores a
:class:`_Launch` under a key. A later call with the same key skips both and calls the compiled
kernel's launcher as ``JITFunction.run`` itself does. The key holds everything that the checks,
the launch plan and Triton's specialisation read:

* shapes, strides, dtypes and devices of all four tensors, ``rotary_dim`` and ``is_neox``;
* k's byte offset from q when they share a storage, so the overlap check (a function of
  the layout then) is covered. Where the tensors lie otherwise (a cache or positions inside
  q or k, q and k of two buffers over one memory) is checked on each relaunch from byte
  ranges stored with the launch; any intersection sends the call to the op;
* each pointer's 16-byte alignment, the only pointer property Triton specialises on. The ints
  it specialises on (``== 1``, ``% 16``) are all shapes and strides, already in the key.

When: only where skipping the dispatcher changes nothing observable. Every argument a plain
``torch.Tensor`` on cuda/xpu (not a subclass, fake or functional tensor), ``rotary_dim`` an
``int`` and ``is_neox`` a ``bool``, nothing requiring grad, not under torch.compile tracing, no
torch function / dispatch mode and no functorch transform active, the positions bounds check
off, and Triton's ``JITFunction.run`` launching the way this module does (checked once from
its source). Anything else goes through the op, as does ``ROPE_COMPILE_FAST_LAUNCH=0`` and a
call with ``wrap_negative_positions`` (the public functions send it there). Positions are never
read here: the kernel itself leaves a token whose position is outside the cache as it is (its
row count is an argument, from the cache's shape in the key).
The version counters of q and k are bumped, as the dispatcher does for a mutating op.
"""

from __future__ import annotations

import inspect
import os
from typing import NamedTuple

import torch

from . import validation
from .constants import GPU_DEVICE_TYPES
from .layout import extent
from .validation import generic_views, validate_fused

# Set from ROPE_COMPILE_FAST_LAUNCH and, on first use, from the Triton check below.
_enabled: bool | None = None if os.environ.get("ROPE_COMPILE_FAST_LAUNCH", "1") != "0" else False
_MAX_ENTRIES = 4096  # distinct layouts kept; a server sees a few per batch size


class _Launch(NamedTuple):
    compiled: object | None  # Triton's CompiledKernel; None: nothing to launch (0 tokens)
    run: object  # its launcher, function and metadata (fixed once its handles are loaded)
    function: object
    packed_metadata: object
    grid: tuple[int, int]
    device_index: int
    tail: tuple  # the arguments after the four tensors: ints, then constexpr values
    pointers_as_ints: bool  # pass data pointers, not tensors (see _POINTERS_AS_INTS)
    # Byte range of q, k, cache and positions relative to each data pointer, flattened
    # (low, high) x 4; set by _call when stored. None: not checked.
    spans: tuple[int, ...] | None = None


_launches: dict[tuple, _Launch] = {}
_driver = _knobs = _current_device = None  # Triton's, set by _init
_FAST_DEVICES = GPU_DEVICE_TYPES  # where the ops launch the Triton kernel

# Devices whose Triton launcher takes a plain int as a pointer argument, which spares it a
# Python data_ptr() call and a driver pointer query per tensor (CUDA's does; Intel's XPU
# launcher is not verified here, so it gets the tensors).
_POINTERS_AS_INTS = frozenset({"cuda"})

# How Triton's JITFunction.run launches a compiled kernel, whitespace removed; relaunching
# the same way is only sound if the installed Triton still does exactly this.
_TRITON_LAUNCH = (
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,"
    "launch_metadata,knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,"
    "*bound_args.values())"
)


def _init() -> bool:
    global _enabled, _driver, _knobs, _current_device
    _enabled = False
    try:
        import triton
        from triton.runtime.jit import JITFunction

        from .kernels.rope_cache import is_interpreter

        source = "".join(inspect.getsource(JITFunction.run).split())
        _driver, _knobs = triton.runtime.driver.active, triton.knobs
    except Exception:  # no Triton, or one this module does not know
        return False
    _current_device = _driver.get_current_device
    if _current_device is torch.cuda.current_device:
        # The same answer without its lazy-init wrapper (the tensors are on the device already).
        _current_device = torch._C._cuda_getDevice
    _enabled = _TRITON_LAUNCH in source and not is_interpreter()
    return _enabled


def _active(hook) -> bool:
    """A launch hook that does something: not None, and not an empty HookChain (newer
    Tritons hold their hooks in one, which is never None)."""
    return hook is not None and getattr(hook, "calls", None) != []


def fast_launch_enabled() -> bool:
    """Whether eligible calls may take the fast path in this process."""
    return _init() if _enabled is None else _enabled


def set_fast_launch(enabled: bool) -> None:
    """Turn the fast path off (or back on, if this Triton supports it) for this process."""
    global _enabled
    _enabled = None if enabled else False
    _launches.clear()


# Bound once: this runs on every eager call, where each attribute lookup shows.
_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_mode_on = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.peek_interpreter_stack
_increment_version = torch._C._increment_version


def _eligible(a, b, cache, positions, flag, is_neox) -> bool:
    """Nothing around this call needs the dispatcher (see the module docstring). The device
    type is checked by the caller. A cache that requires grad goes to the op too, whose
    Autograd kernel refuses it in grad mode (positions, integers, cannot require grad)."""
    return not (
        _is_compiling()  # first: Dynamo folds it, and traces the op instead
        or _dispatch_modes()
        or _function_mode_on()  # before touching the tensors
        or _functorch_level() is not None
        or not (_enabled or (_enabled is None and _init()))
        or validation._check_positions_on_device
        or type(flag) is not int
        or type(is_neox) is not bool
        or type(a) is not _Tensor or type(b) is not _Tensor
        or type(cache) is not _Tensor or type(positions) is not _Tensor
        or a.requires_grad or b.requires_grad or cache.requires_grad
    )


def _call(kind, a, b, cache, positions, flag, is_neox, first_call) -> bool:
    """Relaunch the kernel stored for this call's layout, or run ``first_call(a, b, cache,
    positions, flag, is_neox)`` (checks, then Triton's JIT launch; returns the
    :class:`_Launch` to store, or None) and store it."""
    if not _eligible(a, b, cache, positions, flag, is_neox):
        return False
    try:
        a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
        cache_ptr, positions_ptr = cache.data_ptr(), positions.data_ptr()
        # Overlap depends on b's offset from a only when they share a storage.
        shared = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        a_device = a.device
        key = (
            kind, flag, is_neox,
            a.shape, a.stride(), b.shape, b.stride(), cache.shape, cache.stride(),
            positions.shape, positions.stride(),
            a.dtype, b.dtype, cache.dtype, positions.dtype,
            a_device, b.device, cache.device, positions.device,
            a_ptr & 15, b_ptr & 15, cache_ptr & 15, positions_ptr & 15,
            b_ptr - a_ptr if shared else None,
        )
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: let the op say why
        return False
    if a_device.type not in _FAST_DEVICES:
        return False
    launch = _launches.get(key)
    if launch is None:
        launch = first_call(a, b, cache, positions, flag, is_neox)
        if launch is not None:
            if len(_launches) >= _MAX_ENTRIES:
                _launches.clear()
            _launches[key] = launch._replace(spans=_byte_spans(a, b, cache, positions))
    elif launch.compiled is not None:
        if launch.spans is not None and _may_alias(launch.spans, a_ptr, b_ptr, cache_ptr,
                                                   positions_ptr, shared):
            return False  # the op's checks decide (and refuse what does overlap)
        device = _current_device()
        if device != launch.device_index:
            return False  # the op launches under a device guard
        stream = _driver.get_current_stream(device)
        # As JITFunction.run does after binding the arguments.
        if launch.pointers_as_ints:
            args = (a_ptr, b_ptr, cache_ptr, positions_ptr, *launch.tail)
        else:
            args = (a, b, cache, positions, *launch.tail)
        runtime = _knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if _active(enter) or _active(leave):
            metadata = launch.compiled.launch_metadata(launch.grid, stream, *args)
        else:  # nothing to call: spare the launcher the hook calls and the metadata
            enter = leave = metadata = None
        launch.run(launch.grid[0], launch.grid[1], 1, stream, launch.function,
                   launch.packed_metadata, metadata, enter, leave, *args)
    _increment_version((a, b))
    return True


def _byte_spans(*tensors) -> tuple[int, ...]:
    """(low, high) byte of each tensor's memory relative to its data pointer, flattened."""
    spans = []
    for t in tensors:
        low, high = extent(t)  # elements of the storage; the data pointer is at the offset
        offset, size = t.storage_offset(), t.element_size()
        spans += ((low - offset) * size, (high - offset + 1) * size)
    return tuple(spans)


def _may_alias(spans, a_ptr, b_ptr, cache_ptr, positions_ptr, shared) -> bool:
    """Whether this call's cache or positions may overlap q or k, or q and k of two buffers
    may overlap: the key holds layouts, not where the tensors lie relative to each other
    (except k's offset from q in one buffer, whose overlap the first call's checks decided).
    Byte ranges, so disjoint interleavings also answer True: the op then decides."""
    a_lo, a_hi, b_lo, b_hi, c_lo, c_hi, p_lo, p_hi = spans
    a0, a1, b0, b1 = a_ptr + a_lo, a_ptr + a_hi, b_ptr + b_lo, b_ptr + b_hi
    c0, c1, p0, p1 = cache_ptr + c_lo, cache_ptr + c_hi, positions_ptr + p_lo, positions_ptr + p_hi
    return ((c0 < a1 and a0 < c1) or (c0 < b1 and b0 < c1) or (p0 < a1 and a0 < p1)
            or (p0 < b1 and b0 < p1) or (not shared and a0 < b1 and b0 < a1))


def _launch_first(q, k, cache, positions, rotary_dim, is_neox) -> _Launch:
    """Launch through Triton's JIT; what a later call with this layout relaunches."""
    from .kernels.rope_cache import plan_launch, run_plan

    if q.shape[0] == 0:
        return _Launch(None, None, None, None, (0, 0), -1, (), False)
    plan = plan_launch(q, k, cache, positions, rotary_dim, is_neox)
    compiled = run_plan(plan, q, k, cache, positions)
    # The compiled kernel's handles are loaded by now: its launcher and function are fixed.
    return _Launch(compiled, compiled.run, compiled.function, compiled.packed_metadata,
                   plan.grid, q.device.index, (*plan.ints, *plan.constexprs.values()),
                   q.device.type in _POINTERS_AS_INTS)


def _first_fused(q, k, cos_sin_cache, positions, rotary_dim, is_neox) -> _Launch:
    validate_fused(q, k, cos_sin_cache, positions, rotary_dim)
    return _launch_first(q, k, cos_sin_cache, positions, rotary_dim, is_neox)


def _first_generic(query, key, cos_sin_cache, positions, head_size, is_neox) -> _Launch | None:
    q, k, flat_positions, rotary_dim = generic_views(positions, query, key, head_size,
                                                     cos_sin_cache)
    launch = _launch_first(q, k, cos_sin_cache, flat_positions, rotary_dim, is_neox)
    # Not stored when reshaping the positions copied them.
    return launch if flat_positions.data_ptr() == positions.data_ptr() else None


def try_fused(q, k, cos_sin_cache, positions, rotary_dim, is_neox) -> bool:
    """``fused_qk_rope_with_cos_sin_cache_inplace`` without the dispatcher; False: not done,
    call the op."""
    return _call("fused", q, k, cos_sin_cache, positions, rotary_dim, is_neox,
                 _first_fused)


def try_generic(positions, query, key, head_size, cos_sin_cache, is_neox) -> bool:
    """``rotary_embedding`` without the dispatcher; False: not done, call the op. The views
    of query/key/positions it launches on keep their data pointers, so on a relaunch the
    arguments themselves stand in for them."""
    return _call("generic", query, key, cos_sin_cache, positions, head_size, is_neox,
                 _first_generic)
