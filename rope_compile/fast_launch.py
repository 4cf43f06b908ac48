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
  the layout then) is covered;
* each pointer's 16-byte alignment, the only pointer property Triton specialises on. The ints
  it specialises on (``== 1``, ``% 16``) are all shapes and strides, already in the key.

When: only where skipping the dispatcher changes nothing observable. Every argument a plain
``torch.Tensor`` on cuda/xpu (not a subclass, fake or functional tensor), ``rotary_dim`` an
``int`` and ``is_neox`` a ``bool``, nothing requiring grad, not under torch.compile tracing, no
torch function / dispatch mode and no functorch transform active, the positions bounds check
off, and Triton's ``JITFunction.run`` launching the way this module does (checked once from
its source). Anything else goes through the op, as does ``ROPE_COMPILE_FAST_LAUNCH=0``.
The version counters of q and k are bumped, as the dispatcher does for a mutating op.
"""

from __future__ import annotations

import inspect
import os
from typing import NamedTuple

import torch

from .validation import check_positions_on_device_enabled

# Set from ROPE_COMPILE_FAST_LAUNCH and, on first use, from the Triton check below.
_enabled: bool | None = None if os.environ.get("ROPE_COMPILE_FAST_LAUNCH", "1") != "0" else False
_MAX_ENTRIES = 4096  # distinct layouts kept; a server sees a few per batch size


class _Launch(NamedTuple):
    compiled: object | None  # Triton's CompiledKernel; None: nothing to launch (0 tokens)
    grid: tuple[int, int]
    device_index: int
    tail: tuple  # the arguments after the four tensors: ints, then constexpr values
    pointers_as_ints: bool  # pass data pointers, not tensors (see _POINTERS_AS_INTS)


_launches: dict[tuple, _Launch] = {}
_FAST_DEVICES = ("cuda", "xpu")  # where the ops launch the Triton kernel

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
    global _enabled, _driver, _knobs
    _enabled = False
    try:
        import triton
        from triton.runtime.jit import JITFunction

        from .triton_kernel import is_interpreter

        source = "".join(inspect.getsource(JITFunction.run).split())
        _driver, _knobs = triton.runtime.driver.active, triton.knobs
    except Exception:  # no Triton, or one this module does not know
        return False
    _enabled = _TRITON_LAUNCH in source and not is_interpreter()
    return _enabled


def fast_launch_enabled() -> bool:
    """Whether eligible calls may take the fast path in this process."""
    return _init() if _enabled is None else _enabled


def set_fast_launch(enabled: bool) -> None:
    """Turn the fast path off (or back on, if this Triton supports it) for this process."""
    global _enabled
    _enabled = None if enabled else False
    _launches.clear()


def _eligible(tensors, *flags) -> bool:
    """Nothing around this call needs the dispatcher (see the module docstring)."""
    if (
        torch.compiler.is_compiling()  # first: Dynamo folds it, and traces the op instead
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()  # before touching the tensors
        or torch._C._functorch.peek_interpreter_stack() is not None
        or not (_enabled or (_enabled is None and _init()))
        or check_positions_on_device_enabled()
        or type(flags[0]) is not int
        or type(flags[1]) is not bool
    ):
        return False
    for t in tensors:
        if type(t) is not torch.Tensor or t.requires_grad:
            return False
    return tensors[0].device.type in _FAST_DEVICES


def _call(kind, a, b, cache, positions, flag, is_neox, first_call) -> bool:
    """Relaunch the kernel stored for this call's layout, or run ``first_call`` (checks, then
    Triton's JIT launch; returns the :class:`_Launch` to store, or None) and store it."""
    tensors = (a, b, cache, positions)
    if not _eligible(tensors, flag, is_neox):
        return False
    try:
        pointers = (a.data_ptr(), b.data_ptr(), cache.data_ptr(), positions.data_ptr())
        # Overlap depends on b's offset from a only when they share a storage.
        shared = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        key = (
            kind, flag, is_neox,
            a.shape, a.stride(), b.shape, b.stride(), cache.shape, cache.stride(),
            positions.shape, positions.stride(),
            a.dtype, b.dtype, cache.dtype, positions.dtype,
            a.device, b.device, cache.device, positions.device,
            pointers[0] & 15, pointers[1] & 15, pointers[2] & 15, pointers[3] & 15,
            pointers[1] - pointers[0] if shared else None,
        )
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: let the op say why
        return False
    launch = _launches.get(key)
    if launch is None:
        launch = first_call()
        if launch is not None:
            if len(_launches) >= _MAX_ENTRIES:
                _launches.clear()
            _launches[key] = launch
    elif launch.compiled is not None:
        device = _driver.get_current_device()
        if device != launch.device_index:
            return False  # the op launches under a device guard
        stream = _driver.get_current_stream(device)
        # As JITFunction.run does after binding the arguments.
        args = (*(pointers if launch.pointers_as_ints else tensors), *launch.tail)
        compiled, runtime = launch.compiled, _knobs.runtime
        compiled.run(launch.grid[0], launch.grid[1], 1, stream, compiled.function,
                     compiled.packed_metadata, compiled.launch_metadata(launch.grid, stream, *args),
                     runtime.launch_enter_hook, runtime.launch_exit_hook, *args)
    torch._C._increment_version((a, b))
    return True


def _launch_first(q, k, cache, positions, rotary_dim, is_neox) -> _Launch:
    """Launch through Triton's JIT; what a later call with this layout relaunches."""
    from .triton_kernel import plan_launch, run_plan

    if q.shape[0] == 0:
        return _Launch(None, (0, 0), -1, (), False)
    plan = plan_launch(q, k, cache, positions, rotary_dim, is_neox)
    compiled = run_plan(plan, q, k, cache, positions)
    return _Launch(compiled, plan.grid, q.device.index, (*plan.ints, *plan.constexprs.values()),
                   q.device.type in _POINTERS_AS_INTS)


def try_fused(q, k, cos_sin_cache, positions, rotary_dim, is_neox) -> bool:
    """``fused_qk_rope_with_cos_sin_cache_inplace`` without the dispatcher; False: not done,
    call the op."""

    def first_call():
        from .ops import validate_fused

        validate_fused(q, k, cos_sin_cache, positions, rotary_dim)
        return _launch_first(q, k, cos_sin_cache, positions, rotary_dim, is_neox)

    return _call("fused", q, k, cos_sin_cache, positions, rotary_dim, is_neox, first_call)


def try_generic(positions, query, key, head_size, cos_sin_cache, is_neox) -> bool:
    """``rotary_embedding`` without the dispatcher; False: not done, call the op. The views
    of query/key/positions it launches on keep their data pointers, so on a relaunch the
    arguments themselves stand in for them."""

    def first_call():
        from .ops import generic_views

        q, k, flat_positions, rotary_dim = generic_views(positions, query, key, head_size,
                                                         cos_sin_cache)
        launch = _launch_first(q, k, cos_sin_cache, flat_positions, rotary_dim, is_neox)
        # Not stored when reshaping the positions copied them.
        return launch if flat_positions.data_ptr() == positions.data_ptr() else None

    return _call("generic", query, key, cos_sin_cache, positions, head_size, is_neox,
                 first_call)
