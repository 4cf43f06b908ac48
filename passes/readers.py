"""Moving the readers of a rewritten tensor onto its replacement, by an allow-list.

A rewrite replaces a tensor ``old`` by ``new`` with the same values. Where the two have the same
layout (sizes, strides and storage offset), every reader is moved. Where they do not (the usual
case: ``old`` is a fresh dense tensor at offset 0, ``new`` a strided view into the projection
at a non-zero offset), a reader is moved onto ``new`` only if it is proven to read values
alone; any other reader gets a copy of ``new`` in ``old``'s layout::

    before                                  after
    old = <dense, offset 0>                 new = <view into qkv, offset > 0>
    a = permute(old, ..); mm(a, ..)         a' = permute(new, ..); mm(a', ..)   # values only
    as_strided(old, ..)                     c = copy of new in old's layout; as_strided(c, ..)
    auto_functionalized_v2(op, base=old)    auto_functionalized_v2(op, base=c)
    output(old)                             output(c)

Proven to read values alone (the allow-list):

* views whose result is defined by sizes alone (:data:`LAYOUT_FREE_VIEWS`: ``view``,
  ``reshape``, ``permute``, ``slice``, ``select``, ``split``...), whose own readers are decided
  the same way, recursively;
* aten / prims ops whose schema neither aliases nor writes the argument that holds the tensor,
  and that are tagged pointwise or listed in :data:`VALUE_READERS` (matmuls, attention,
  reductions, copies into fresh buffers, gathers, scatters of the tensor as a source).

A training forward graph's activations saved for the backward are outputs the user never sees
(:func:`reaches_the_user`): they read the in-place view. Everything else reads a copy: the
graph output the user sees (eager's layout), ``as_strided`` (absolute
offsets), a view op not in the list (``diagonal``, ``unfold``, ``view.dtype``...), a custom op
(its kernel may read strides), ``auto_functionalized`` (it addresses its base by absolute sizes,
strides and offset), ``sym_stride``. A copy needs ``old``'s layout to be dense at offset 0 and
known without a guard; otherwise :class:`ReaderError` blocks the rewrite (the passes roll it
back and count the reason).
"""

from __future__ import annotations

import logging
import operator

import torch
from torch._dynamo.utils import counters
from torch.fx import Node

from .fx_surgery import (
    _SPLITS,
    GraphTransaction,
    fake_value,
    is_view_of_input,
    propagate_fake,
    statically_equal,
)

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["LAYOUT_FREE_VIEWS", "VALUE_READERS", "ReaderError", "copy_in_layout",
           "layout_readers", "reaches_the_user", "rebase_views"]

log = logging.getLogger("rope_compile")

# Views whose result is defined by the source's sizes alone (not its strides or offset).
LAYOUT_FREE_VIEWS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
    aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.expand.default, aten.alias.default, *_SPLITS,
})

# Readers of values alone, besides the ops tagged pointwise (each an OpOverloadPacket: every
# overload; an argument that an overload aliases or writes is never the tensor's, see
# _reads_values).
VALUE_READERS = frozenset({
    aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.matmul, aten.dot, aten.linear,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_fused_attention_overrideable, aten.scaled_dot_product_attention,
    aten._flash_attention_forward, aten._efficient_attention_forward,
    # their backward (a checkpointed layer's recomputed q/k read by the attention backward)
    aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention_backward,
    aten._scaled_dot_product_cudnn_attention_backward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
    aten._scaled_dot_product_fused_attention_overrideable_backward,
    aten._flash_attention_backward, aten._efficient_attention_backward,
    aten.clone, aten._to_copy, prims.convert_element_type, aten.cat, aten.stack,
    aten.constant_pad_nd, aten.copy, aten.copy_, aten.index, aten._unsafe_index,
    aten.index_select, aten.gather, aten.index_put, aten.index_put_, aten._unsafe_index_put,
    aten.index_copy, aten.index_copy_, aten.slice_scatter, aten.select_scatter, aten.scatter,
    aten.scatter_add, aten.index_add, aten.sum, aten.mean, aten.amax, aten.amin, aten.var,
    aten.var_mean, aten.prod, aten.max, aten.min, aten.argmax, aten.argmin, aten._softmax,
    aten._log_softmax, aten.native_layer_norm, aten.linalg_vector_norm, aten.cumsum,
    aten.embedding, aten.sort, aten.topk, aten.sym_size, aten.sym_numel,
})


class ReaderError(Exception):
    """A reader needs the old layout and no copy in it can be made: the rewrite is blocked."""


def _holds(value, node: Node) -> bool:
    if value is node:
        return True
    return isinstance(value, (list, tuple)) and any(v is node for v in value)


# Higher-order ops that run ``op(*args, **kwargs)`` and only save or restore the RNG state
# around it (activation checkpointing's recompute of attention with dropout): the position of
# ``op`` in their arguments. They read what ``op`` reads.
_RNG_WRAPPERS = {
    torch.ops.higher_order.run_and_save_rng_state: 0,  # (op, *args, **kwargs)
    torch.ops.higher_order.run_with_rng_state: 1,  # (rng_state, op, *args, **kwargs)
}


def _reads_values(user: Node, source: Node) -> bool:
    """``user`` reads ``source`` for its values alone (the allow-list)."""
    if user.op != "call_function":
        return False
    target, args, kwargs = user.target, user.args, user.kwargs
    if target in _RNG_WRAPPERS:  # the wrapped op's reading (the RNG state is not the source)
        at = _RNG_WRAPPERS[target]
        if len(args) <= at or any(_holds(a, source) for a in args[:at + 1]):
            return False
        target, args = args[at], args[at + 1:]
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten",
                                                                                 "prims"):
        return False
    if target.overloadpacket not in VALUE_READERS and torch.Tag.pointwise not in target.tags:
        return False
    schema = target._schema
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        if _holds(value, source) and arg.alias_info is not None:
            return False  # aliased or written: the op's result depends on the layout
    # Every place the source is passed must be a schema argument (no stray *args or kwargs).
    return len(args) <= len(schema.arguments) and set(kwargs) <= {a.name for a in
                                                                  schema.arguments}


def reaches_the_user(output: Node, source: Node) -> bool:
    """Whether the graph ``output`` hands ``source`` to the user. Inductor marks the outputs the
    user sees (``meta["user_visible_output_idxs"]``: of a training forward graph, the model's
    outputs, not the activations saved for the backward); only those need eager's layout. A
    saved activation may stay the in-place view: Inductor keeps a non-visible output's layout
    as its fake value gives it, reports it, and AOTAutograd compiles the backward for those
    strides. Without the mark, every output is the user's."""
    visible = output.meta.get("user_visible_output_idxs")
    if visible is None:
        return True
    leaves = torch.utils._pytree.tree_leaves(output.args)
    return any(leaf is source and i in visible for i, leaf in enumerate(leaves))


def _is_layout_free_view(node: Node) -> bool:
    """A view of its input (``is_view_of_input``: a split's getitem included) by an op of
    :data:`LAYOUT_FREE_VIEWS`."""
    return is_view_of_input(node) and (node.target is operator.getitem
                                       or node.target in LAYOUT_FREE_VIEWS)


def layout_readers(old: Node) -> tuple[list[Node], list[tuple[Node, Node]],
                                      list[tuple[Node, Node]]]:
    """(the layout-free views below ``old``, in graph order; the (reader, source) pairs that
    read values alone; the (reader, source) pairs that need ``old``'s layout), where source is
    ``old`` or one of those views."""
    views: list[Node] = []
    values: list[tuple[Node, Node]] = []
    layout: list[tuple[Node, Node]] = []
    seen: set[Node] = set()
    stack = [old]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen and _is_layout_free_view(user):
                continue
            if _is_layout_free_view(user):
                seen.add(user)
                views.append(user)
                stack.append(user)
            elif _reads_values(user, node) or (user.op == "output"
                                               and not reaches_the_user(user, node)):
                values.append((user, node))
            else:
                layout.append((user, node))
    order = {n: i for i, n in enumerate(old.graph.nodes)}
    views.sort(key=order.__getitem__)
    return views, values, layout


def same_layout(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal sizes, strides and storage offsets, for every value of their symbols."""
    if a is None or b is None or a.dim() != b.dim():
        return False
    return (all(statically_equal(x, y) for x, y in zip(a.shape, b.shape, strict=True))
            and all(statically_equal(x, y) for x, y in zip(a.stride(), b.stride(),
                                                             strict=True))
            and statically_equal(a.storage_offset(), b.storage_offset()))


def _dense_order(val: torch.Tensor) -> list[int] | None:
    """The dim order (outermost first) of ``val``'s dense layout at offset 0, or None when it
    is not dense at offset 0 for every value of its symbols."""
    if not statically_equal(val.storage_offset(), 0):
        return None
    contiguous = getattr(torch._prims_common, "is_contiguous_or_false", None)
    if contiguous is not None and contiguous(val):
        return list(range(val.dim()))
    dense = getattr(torch._prims_common, "is_non_overlapping_and_dense_or_false", None)
    if dense is None or not dense(val):
        return None
    strides = val.stride()
    if not all(isinstance(s, int) for s in (*strides, *val.shape)):
        return None  # a symbolic, non-contiguous layout: not rebuilt without a guard
    return sorted(range(val.dim()), key=lambda d: -strides[d])


def can_copy_in_layout(val: torch.Tensor | None) -> bool:
    return val is not None and _dense_order(val) is not None


def copy_in_layout(tx: GraphTransaction, new: Node, like: torch.Tensor,
                   pin: bool = True) -> Node:
    """A fresh copy of ``new`` in ``like``'s dense layout at offset 0 (its dim order; size-1
    dims given ``like``'s strides too). ``pin``: end on ``as_strided`` to ``like``'s strides
    (static layouts), which Inductor keeps for every reader: without it, Inductor may lay out
    a view of the copy anew (``unfold`` of a ``clone``). Raises :class:`ReaderError` if
    ``like`` is not dense at offset 0, or its layout depends on symbols beyond contiguity."""
    order = _dense_order(like)
    if order is None:
        raise ReaderError("a reader needs the rotated tensor's own layout, which is not dense "
                          "at offset 0 for every size (no copy in it can be made)")
    identity = order == sorted(order)
    inverse = [order.index(d) for d in range(len(order))]
    copied = new if identity else tx.add(new, aten.permute.default, (new, order))
    copied = tx.add(copied, aten.clone.default, (copied,),
                    {"memory_format": torch.contiguous_format})
    if not identity:
        copied = tx.add(copied, aten.permute.default, (copied, inverse))
    exact = [int(x) for x in like.stride()] if all(
        isinstance(x, int) for x in (*like.shape, *like.stride())) else None
    if exact is not None and (pin or list(copied.meta["val"].stride()) != exact):
        # Size-1 dims take ``like``'s strides too (the order fixed the others).
        copied = tx.add(copied, aten.as_strided.default, (copied, list(like.shape), exact, 0))
    return copied


def _replay(tx: GraphTransaction, view: Node, env: dict[Node, Node]) -> Node:
    """``view`` re-created on ``env[view.args[0]]`` (and its chain, recursively)."""
    if view in env:
        return env[view]
    source = _replay(tx, view.args[0], env)
    with tx.graph.inserting_after(source):
        copy = tx.record_new(tx.graph.node_copy(view, lambda n: env.get(n, n)))
    env[view] = propagate_fake(copy)
    tx.maybe_dead.append(copy)  # a copy of a view nobody reads any more is erased
    return env[view]


def rebase_views(tx: GraphTransaction, old: Node, new: Node, what: str = "rewrite") -> None:
    """Move every reader of ``old`` (and of its views) to ``new``, a tensor of the same values:
    all of them where the layouts are the same, else by the allow-list (module docstring),
    views re-created with fresh fake values (a re-pointed view would keep a fake of ``old``'s
    storage, and the passes prove layouts from them). Readers that need ``old``'s layout read a
    copy in it; :class:`ReaderError` if none can be made. Undone by ``tx.rollback()``."""
    if same_layout(fake_value(old), fake_value(new)):
        _move_all(tx, old, new)
        return
    views, values, layout = layout_readers(old)
    layout = [(u, s) for u, s in layout if u not in tx.new_nodes]
    env = {old: new}
    for view in views:
        _replay(tx, view, env)
    for user, source in values:
        if user not in tx.new_nodes:
            tx.replace_input(user, source, env[source])
    if not layout:
        return
    copied = copy_in_layout(tx, new, fake_value(old))
    copy_env = {old: copied}
    for user, source in layout:
        tx.replace_input(user, source, _replay(tx, source, copy_env))
        name = "output" if user.op == "output" else str(getattr(user.target, "__name__",
                                                                 user.target))
        counters["rope_compile"][f"reader given a copy in the old layout: {name}"] += 1
        log.debug("rope_compile %s: %s reads a copy of %s in its old layout", what,
                  user.name, old.name)


def _move_all(tx: GraphTransaction, old: Node, new: Node) -> None:
    """Every reader of ``old`` (views of it re-created on ``new``): the layouts are the same."""
    env = {old: new}
    order = {n: i for i, n in enumerate(tx.graph.nodes)}
    stack = [old]
    views: list[Node] = []
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in env and user not in views and is_view_of_input(user):
                views.append(user)
                stack.append(user)
    for view in sorted(views, key=order.__getitem__):
        _replay(tx, view, env)
    for node, replacement in list(env.items()):
        for user in list(node.users):
            if user not in env and user not in tx.new_nodes:
                tx.replace_input(user, node, replacement)
