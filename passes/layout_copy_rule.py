"""The rule "no fusion that saves nothing": a proven Q/K pair whose rotated q and k are read
only by copies into fresh buffers is left to Inductor.

Before (HF-style attention inputs: ``.contiguous()`` after a transpose, a DynamicCache
``cat``; the copies stay in the graph whatever the pass does)::

    q_rot = q*cos + rotate_half(q)*sin                  # q, k: views of the qkv projection
    k_rot = k*cos + rotate_half(k)*sin
    q_attn = clone(transpose(q_rot, 1, 2), memory_format=contiguous)
    k_all  = cat([past_k, transpose(k_rot, 1, 2)], 2)

Plain Inductor computes the RoPE inside each copy's kernel: q and k are read once and the copy
written once. After the rewrite::

    af = auto_functionalized_v2(rope_compile.<op>, ..., q = view of qkv, k = view of qkv)
    q_attn = clone(transpose(view of af[1], 1, 2), memory_format=contiguous)
    k_all  = cat([past_k, transpose(view of af[1], 1, 2)], 2)

the in-place call reads and writes q and k, then the same copies read them again: one more
pass over q and k, and one more launch, for nothing. So the pair is not rewritten, counted as
``skipped: <COPY_ONLY_REASON>``.

A reader is followed through views (``fx_surgery.is_view_of_input``: view, reshape, permute,
transpose, slice, expand, unsqueeze, squeeze, select, split...; a reshape whose input's
strides allow a view). Copies into a fresh buffer, which Inductor fuses a pointwise producer
into: ``clone``, ``_to_copy`` and ``convert_element_type`` (same device), ``cat``,
``constant_pad_nd``, and a reshape whose input's strides allow no view. Anything else is a
reader the rule cannot vouch for and the pair is rewritten as before: attention (SDPA,
mm/bmm), any other op, the graph output, a mutation (``copy_``), and the KV-cache writes that
``FuseKVStorePass`` absorbs into the call (``index_put``, ``index_copy``: there the call saves
the write's own pass).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .fx_surgery import fake_value, is_view_of_input, shares_storage

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["COPY_ONLY_REASON", "layout_copies_reading", "read_only_by_layout_copies"]

COPY_ONLY_REASON = ("rotated q and k are only read by layout copies (Inductor fuses the RoPE "
                    "into them; the rewrite would add a pass over q and k)")

# Ops that copy their (first) tensor argument into a new buffer, elementwise: Inductor computes
# a pointwise producer (the RoPE) inside the copy's kernel.
_COPIES = (aten.clone.default, aten._to_copy.default, prims.convert_element_type.default,
           aten.constant_pad_nd.default)


def _reshape_copies(user: Node) -> bool | None:
    """For a ``reshape`` (Inductor turns every ``view`` into one): False where its input's
    strides allow it as a view, True where they do not (it copies), None if unknown (symbolic
    sizes: no guard is added). Decided from the shapes and strides: a fake value's storage need
    not tell (a graph pass may have given it a fresh one)."""
    if user.op != "call_function" or user.target is not aten.reshape.default:
        return None
    val, src = fake_value(user), fake_value(user.args[0])
    if val is None or src is None:
        return None
    shape, stride, new_shape = list(src.shape), list(src.stride()), list(val.shape)
    if not all(type(n) is int for n in (*shape, *stride, *new_shape)):
        return None
    try:  # a meta tensor of the input's layout: no data, no guard
        torch.empty_strided(shape, stride, device="meta").view(new_shape)
    except (RuntimeError, ValueError):  # "view size is not compatible with ... stride"
        return True
    return False


def _is_view(user: Node) -> bool:
    return _reshape_copies(user) is False or is_view_of_input(user)


def _is_layout_copy(user: Node, source: Node) -> bool:
    """``user`` copies ``source`` (the rotated tensor or a view of it) into a fresh buffer on
    the same device."""
    if user.op != "call_function":
        return False
    if user.target is aten.cat.default:
        reads_source = source in user.args[0]
    else:
        reads_source = user.target in (*_COPIES, aten.reshape.default) and (
            user.args[0] is source)
    val, src = fake_value(user), fake_value(source)
    if not reads_source or val is None or src is None or val.device != src.device:
        return False
    if user.target is aten.reshape.default:
        return _reshape_copies(user) is True
    return not shares_storage(val, src)


def layout_copies_reading(rotated: Node) -> list[Node] | None:
    """The copies that read ``rotated`` (directly or through views), or None when some reader
    is not such a copy, or nothing reads it."""
    copies: list[Node] = []
    stack, seen = [rotated], {rotated}
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_view(user):
                stack.append(user)
            elif _is_layout_copy(user, node):
                copies.append(user)
            else:
                return None
    return copies or None


def read_only_by_layout_copies(q_rotated: Node, k_rotated: Node) -> bool:
    """Whether every reader of the rotated q and of the rotated k is a layout copy (the pair
    then saves nothing: see the module docstring)."""
    return all(layout_copies_reading(node) is not None for node in (q_rotated, k_rotated))
