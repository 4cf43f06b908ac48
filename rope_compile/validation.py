"""Argument checks shared by the ops' eager kernels and fake implementations.

They read only metadata (shapes, strides, dtypes, devices), never data, so the fake
implementations can run them and torch.compile reports bad input at trace time.
The one data-dependent check, positions in range, is :func:`check_positions_in_range`.
"""

from __future__ import annotations

import os

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Opt-in bounds check of positions on GPU kernels: it reads positions back to the host (a
# device sync), so it is off unless asked for. The CPU kernel always checks.
_check_positions_on_device = os.environ.get("ROPE_COMPILE_CHECK_POSITIONS", "0") == "1"


def set_check_positions(enabled: bool) -> None:
    """Make GPU kernels raise ``IndexError`` for positions outside ``[0, max_position)``.

    Also enabled by the environment variable ``ROPE_COMPILE_CHECK_POSITIONS=1``. Each call then
    synchronises with the device, so leave it off in production.
    """
    global _check_positions_on_device
    _check_positions_on_device = bool(enabled)


def check_positions_on_device_enabled() -> bool:
    return _check_positions_on_device


def _is_int(value) -> bool:
    # SymInt: sizes are symbolic under dynamic-shape tracing.
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _fail(op: str, message: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{op}: {message}")


def check_rope_operands(
    op: str,
    named_xs: tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]],
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    head_size: int,
) -> None:
    """Checks common to both ops. ``named_xs`` are the two tensors rotated, ``(name, tensor)``,
    already viewed as ``[num_tokens, num_heads, head_size]`` (the callers check that)."""
    (a_name, a), (b_name, b) = named_xs
    for name, x in named_xs:
        if not x.dtype.is_floating_point:
            _fail(op, f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if a.dtype != b.dtype:
        _fail(op, f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")
    if not cos_sin_cache.dtype.is_floating_point:
        _fail(op, f"cos_sin_cache must be floating point, got dtype {cos_sin_cache.dtype}")
    if positions.dtype not in (torch.int32, torch.int64):
        _fail(op, f"positions must be int32 or int64, got dtype {positions.dtype}")
    devices = {x.device for x in (a, b, cos_sin_cache, positions)}
    if len(devices) != 1:
        _fail(
            op,
            f"{a_name}, {b_name}, cos_sin_cache and positions must be on one device, got "
            f"{a.device}, {b.device}, {cos_sin_cache.device} and {positions.device}",
        )
    if not _is_int(rotary_dim) or rotary_dim <= 0 or rotary_dim % 2:
        _fail(op, f"rotary_dim must be a positive even integer, got {rotary_dim!r}")
    if rotary_dim > head_size:
        _fail(op, f"rotary_dim ({rotary_dim}) must not exceed the head size ({head_size})")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim:
        _fail(
            op,
            f"cos_sin_cache must be [max_position, rotary_dim={rotary_dim}], "
            f"got shape {tuple(cos_sin_cache.shape)}",
        )
    if a.shape[0] != b.shape[0]:
        _fail(
            op,
            f"{a_name} and {b_name} must have the same number of tokens, "
            f"got {a.shape[0]} and {b.shape[0]}",
        )
    if positions.numel() != a.shape[0]:
        _fail(
            op,
            f"positions must hold one position per token ({a.shape[0]}), "
            f"got {positions.numel()} (shape {tuple(positions.shape)})",
        )
    for name, x in named_xs:
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            _fail(op, f"{name} must have last stride 1, got strides {tuple(x.stride())}")
        if any(n > 1 and s == 0 for n, s in zip(x.shape, x.stride(), strict=True)):
            _fail(op, f"{name} must not be expanded (a stride-0 dim writes one element "
                      f"several times), got strides {tuple(x.stride())}")
    a_rot, b_rot = a[..., :rotary_dim], b[..., :rotary_dim]
    if _may_share_memory(a_rot, b_rot, unknown=True):
        _fail(op, f"{a_name} and {b_name} overlap in memory; rotating them in place would "
                  f"rotate the shared elements twice")
    for read_name, read in (("cos_sin_cache", cos_sin_cache), ("positions", positions)):
        for name, x in ((a_name, a_rot), (b_name, b_rot)):
            if _may_share_memory(read, x, unknown=False):
                _fail(op, f"{read_name} overlaps {name} in memory; the op would read "
                          f"{read_name} while it rotates {name} in place")


def check_positions_in_range(op: str, positions: torch.Tensor, max_position: int) -> None:
    """Raise ``IndexError`` if a position is outside ``[0, max_position)`` (reads data)."""
    if positions.numel() == 0:
        return
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or high >= max_position:
        raise IndexError(
            f"{op}: positions must lie in [0, {max_position}) (the cos_sin_cache rows), "
            f"got values in [{low}, {high}]"
        )


def as_token_heads(op: str, name: str, x: torch.Tensor, num_tokens: int, head_size: int):
    """View ``x`` (``[T, H * head_size]`` or ``[..., H, head_size]``) as ``[T, H, head_size]``
    without copying, or raise ``ValueError`` naming ``name``."""
    if not _is_int(head_size) or head_size <= 0:
        _fail(op, f"head_size must be a positive integer, got {head_size!r}")
    if x.dim() >= 3 and x.shape[-1] == head_size and (
            x.numel() == num_tokens * x.shape[-2] * head_size):  # not [B, S, 1 * head_size]
        heads = x.shape[-2]
    elif x.dim() >= 1 and x.shape[-1] % head_size == 0:
        heads = x.shape[-1] // head_size
    else:
        _fail(op, f"{name} of shape {tuple(x.shape)} must end in a multiple of head_size "
                  f"({head_size})")
    if x.numel() != num_tokens * heads * head_size:
        _fail(op, f"{name} of shape {tuple(x.shape)} does not hold {num_tokens} tokens "
                  f"(positions.numel()) of {heads} heads of size {head_size}")
    try:
        return x.view(num_tokens, heads, head_size)
    except RuntimeError as err:
        _fail(op, f"{name} of shape {tuple(x.shape)} and strides {tuple(x.stride())} cannot be "
                  f"viewed as [tokens, heads, head_size] without a copy ({err})")


def _symbolic_multiple_of(value, row: int) -> bool:
    """A symbolic stride that is a multiple of ``row`` for every value of its symbols."""
    import sympy

    expr = value.node.expr if isinstance(value, torch.SymInt) else value
    try:
        return sympy.simplify(sympy.Mod(expr, row)) == 0
    except Exception:
        return False


def _columns(t: torch.Tensor, row: int, base: int) -> tuple[int, int] | None:
    """Seeing the storage from element ``base`` on as rows of ``row`` elements: the (first,
    last) column ``t`` touches, if every dim of ``t`` either steps whole rows or stays inside
    one row; else None. Sizes of whole-row dims may be symbolic; anything else symbolic gives
    None (no guard is added)."""
    offset = t.storage_offset()
    if not isinstance(offset, int):
        return None
    first = last = (offset - base) % row
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if isinstance(size, int) and size == 1:
            continue  # a dim that does not move
        if not isinstance(stride, int):
            if _symbolic_multiple_of(stride, row):
                continue  # whole rows (e.g. a batch stride of S * row)
            return None
        if stride % row == 0:
            continue  # whole rows
        if not isinstance(size, int) or stride < 0:
            return None
        last += (size - 1) * stride
    return (first, last) if last < row else None


def _definitely_empty(t: torch.Tensor) -> bool:
    return any(isinstance(n, int) and n == 0 for n in t.shape)


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """(lowest, highest) storage element ``t`` touches, when its layout is concrete."""
    low = high = t.storage_offset()
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if not (isinstance(size, int) and isinstance(stride, int)):
            return None
        if stride >= 0:
            high += (size - 1) * stride
        else:
            low += (size - 1) * stride
    return (low, high) if isinstance(low, int) else None


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage may share an element. False only when it is proven:
    for some row length, both stay in disjoint column ranges of every row (as q, k and v split
    from one qkv projection do, whatever their head/token layout)."""
    if _definitely_empty(a) or _definitely_empty(b):
        return False
    ea, eb = _extent(a), _extent(b)
    if ea and eb and (ea[1] < eb[0] or eb[1] < ea[0]):
        return False
    # Rows start at the lower of the two offsets, so a buffer's own offset does not matter.
    offsets = (a.storage_offset(), b.storage_offset())
    base = min(offsets) if all(isinstance(o, int) for o in offsets) else 0
    rows = {s for s in (*a.stride(), *b.stride()) if isinstance(s, int) and s > 1}
    for row in rows:
        ca, cb = _columns(a, row, base), _columns(b, row, base)
        if ca and cb and (ca[1] < cb[0] or cb[1] < ca[0]):
            return False
    return True


def _is_fake(t: torch.Tensor) -> bool:
    """No real memory behind ``t``: a fake (or functional-over-fake) or meta tensor."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def _storage_bases(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """Byte addresses that ``storage_offset() * element_size()`` of ``a`` and of ``b`` count
    from, comparable with each other: (0, 0) for one storage object, else the storages' data
    pointers (two storage objects can hold the same memory: two ``torch.from_numpy`` of one
    array, ``torch.frombuffer``). None when unknown: fake or meta tensors of two storages,
    which have no real memory (the fake implementations take them as distinct, as before)."""
    if StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage()):
        return 0, 0
    if _is_fake(a) or _is_fake(b):
        return None
    try:
        return a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _may_share_memory(a: torch.Tensor, b: torch.Tensor, *, unknown: bool) -> bool:
    """Whether ``a`` and ``b`` may share a byte; ``unknown`` is the answer where that cannot
    be decided without a guard (symbolic layouts; fake tensors of two storages are taken as
    disjoint). Views of one buffer (same base address and element size) get the precise
    :func:`may_overlap`; anything else (two buffers, or two element sizes) the intersection of
    byte ranges."""
    if _definitely_empty(a) or _definitely_empty(b):
        return False
    bases = _storage_bases(a, b)
    if bases is None:
        return False
    ea, eb = _extent(a), _extent(b)
    if bases[0] == bases[1] and a.element_size() == b.element_size():
        return may_overlap(a, b) if ea and eb or unknown else False
    if not (ea and eb):
        return unknown
    size_a, size_b = a.element_size(), b.element_size()
    low_a, high_a = bases[0] + ea[0] * size_a, bases[0] + (ea[1] + 1) * size_a
    low_b, high_b = bases[1] + eb[0] * size_b, bases[1] + (eb[1] + 1) * size_b
    return low_a < high_b and low_b < high_a
