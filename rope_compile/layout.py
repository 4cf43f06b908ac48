"""Memory-layout maths shared by the ops' checks and the compiler pass.

* :func:`may_overlap`: whether two views of one storage may share an element (proven disjoint
  column ranges of rows, as q, k and v of one qkv projection are).
* :func:`may_share_memory`: the same across storages, from data-pointer byte ranges (two
  storage objects can hold one memory: two ``torch.from_numpy`` of one array).
* Extents, and symbolic multiples (never adding a guard).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef


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


def definitely_empty(t: torch.Tensor) -> bool:
    return any(isinstance(n, int) and n == 0 for n in t.shape)


def extent(t: torch.Tensor) -> tuple[int, int] | None:
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
    if definitely_empty(a) or definitely_empty(b):
        return False
    ea, eb = extent(a), extent(b)
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


def may_share_memory(a: torch.Tensor, b: torch.Tensor, *, unknown: bool) -> bool:
    """Whether ``a`` and ``b`` may share a byte; ``unknown`` is the answer where that cannot
    be decided without a guard (symbolic layouts; fake tensors of two storages are taken as
    disjoint). Views of one buffer (same base address and element size) get the precise
    :func:`may_overlap`; anything else (two buffers, or two element sizes) the intersection of
    byte ranges."""
    if definitely_empty(a) or definitely_empty(b):
        return False
    bases = _storage_bases(a, b)
    if bases is None:
        return False
    ea, eb = extent(a), extent(b)
    if bases[0] == bases[1] and a.element_size() == b.element_size():
        return may_overlap(a, b) if ea and eb or unknown else False
    if not (ea and eb):
        return unknown
    size_a, size_b = a.element_size(), b.element_size()
    low_a, high_a = bases[0] + ea[0] * size_a, bases[0] + (ea[1] + 1) * size_a
    low_b, high_b = bases[1] + eb[0] * size_b, bases[1] + (eb[1] + 1) * size_b
    return low_a < high_b and low_b < high_a
