"""The ops the matchers accept, and what their proofs do with each argument.

A proof step that accepts a node reads some of its arguments; every other argument must be
unable to change the node's value, or the proof is of another op (``add(var, eps, alpha=100)``
is ``var + 100 * eps``, not ``var + eps``). ``ACCEPTED`` lists each accepted op once, every
argument of its schema in exactly one of:

* ``read``: a proof step reads it, directly or through the node's fake value (a view's size and
  a slice's end are the output's shape, which the steps check);
* ``pinned``: the values the proofs hold for (``alpha`` 1, a ``dtype`` None or the input's);
  with any other value the node is not accepted, and ``argument_miss`` says why;
* ``neutral``: it cannot change the value (it changes only the gradient, the strides, or
  nothing), and why.

The matchers test a node's op with ``op_of(node)``: its target when the op is listed and its
pinned arguments hold, else None. Where a rejected argument deserves its own reason, they raise
with ``argument_miss(node)``. ``tests/test_pass_arguments.py`` checks that every schema argument
is classified, and ``docs/accepted_ops.md`` names the proof steps that read each op.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["ACCEPTED", "INPUT_DEVICE", "INPUT_DTYPE", "Accepted", "argument_miss",
           "bound_arguments", "op_of"]


class _InputProperty:
    """A pinned value: the same property as the node's first (tensor) argument."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"the input's {self.name}"

    def holds(self, node: Node, value) -> bool:
        src = node.args[0].meta.get("val") if node.args and isinstance(node.args[0],
                                                                         Node) else None
        if not isinstance(src, torch.Tensor):
            return False
        if self.name == "device":
            return isinstance(value, (str, torch.device)) and torch.device(value) == src.device
        return value == getattr(src, self.name)


INPUT_DTYPE = _InputProperty("dtype")
INPUT_DEVICE = _InputProperty("device")

# A pinned argument must be one of these Python values: a symbolic or traced value (SymFloat
# alpha, a tensor) is not known to equal any of them.
_CONSTANTS = (bool, int, float, str, torch.dtype, torch.layout, torch.device, torch.memory_format)

_STRIDES_ONLY = "sets the output's strides, not its values"
_GRADIENT_ONLY = "changes only the gradient"


@dataclass(frozen=True)
class Accepted:
    """What the proofs do with each argument of one op (by schema name)."""

    read: tuple[str, ...]
    pinned: dict[str, tuple] = field(default_factory=dict)
    neutral: dict[str, str] = field(default_factory=dict)


_VALUE = Accepted(("self",))  # a one-argument elementwise op or view
_BINARY = Accepted(("self", "other"))
_RESHAPE = Accepted(("self", "size"))

ACCEPTED: dict[object, Accepted] = {
    # Arithmetic (rope_pattern, fuse_qk_norm, fuse_trig_in_kernel, fuse_kv_store)
    aten.add.Tensor: Accepted(("self", "other"), pinned={"alpha": (1,)}),
    aten.sub.Tensor: Accepted(("self", "other"), pinned={"alpha": (1,)}),
    aten.mul.Tensor: _BINARY,
    aten.div.Tensor: _BINARY,
    aten.neg.default: _VALUE,
    aten.cos.default: _VALUE,
    aten.sin.default: _VALUE,
    aten.rsqrt.default: _VALUE,
    aten.pow.Tensor_Scalar: Accepted(("self", "exponent")),
    aten.mean.dim: Accepted(("self", "dim", "keepdim"), pinned={"dtype": (None, INPUT_DTYPE)}),
    # Casts
    prims.convert_element_type.default: Accepted(("a", "dtype")),
    aten._to_copy.default: Accepted(
        ("self", "dtype"),
        pinned={"layout": (None, torch.strided), "device": (None, INPUT_DEVICE),
                "pin_memory": (None, False)},
        neutral={"memory_format": _STRIDES_ONLY,
                 "non_blocking": "a copy on the input's own device (pinned): the same values "
                                 "either way"}),
    aten.clone.default: Accepted(("self",), neutral={"memory_format": _STRIDES_ONLY}),
    # Views and picks of the last dim, rows, heads
    aten.view.default: _RESHAPE,
    aten.reshape.default: Accepted(("self", "shape")),
    aten._unsafe_view.default: _RESHAPE,
    aten.slice.Tensor: Accepted(("self", "dim", "start", "end", "step")),
    aten.select.int: Accepted(("self", "dim", "index")),
    aten.split.Tensor: Accepted(("self", "split_size", "dim")),
    aten.split_with_sizes.default: Accepted(("self", "split_sizes", "dim")),
    operator.getitem: Accepted(("a", "b")),
    aten.unsqueeze.default: Accepted(("self", "dim")),
    aten.squeeze.dim: Accepted(("self", "dim")),
    aten.squeeze.dims: Accepted(("self", "dim")),
    aten.expand.default: Accepted(("self", "size"), neutral={
        "implicit": "a tracing flag (an expand from broadcasting): the same values"}),
    aten.cat.default: Accepted(("tensors", "dim")),
    # sglang's interleaved mRoPE tables: x[..., 1::3] = y, functionalized
    aten.slice_scatter.default: Accepted(("self", "src", "dim", "start", "end", "step")),
    # the zeros the backward of rotate_half scatters into
    # (rope_pattern._match_rotate_half_transposed)
    aten.full.default: Accepted(("size", "fill_value", "dtype", "device"), pinned={
        "layout": (None, torch.strided), "pin_memory": (None, False)}),
    aten.copy.default: Accepted(("self", "src"), neutral={
        "non_blocking": "a copy between tensors of one device (read): the same values"}),
    aten.view_as_real.default: _VALUE,
    aten.view_as_complex.default: _VALUE,
    # Row gathers of a cos/sin cache
    aten.index.Tensor: Accepted(("self", "indices")),
    aten.index_select.default: Accepted(("self", "dim", "index")),
    aten.embedding.default: Accepted(("weight", "indices"), neutral={
        "padding_idx": _GRADIENT_ONLY, "scale_grad_by_freq": _GRADIENT_ONLY,
        "sparse": _GRADIENT_ONLY}),
    # KV-cache writes (fuse_kv_store)
    aten.index_put.default: Accepted(("self", "indices", "values", "accumulate")),
    aten.index_copy.default: Accepted(("self", "dim", "index", "source")),
    # The rest of the view chains from a storage root (fx_surgery.VIEW_OPS): read through the
    # fake size, stride and offset the layout proofs check.
    aten.as_strided.default: Accepted(("self", "size", "stride", "storage_offset")),
    aten.squeeze.default: _VALUE,
    aten.permute.default: Accepted(("self", "dims")),
    aten.transpose.int: Accepted(("self", "dim0", "dim1")),
    aten.t.default: _VALUE,
    aten.alias.default: _VALUE,
    aten.unbind.int: Accepted(("self", "dim")),
}


def bound_arguments(node: Node) -> dict[str, object]:
    """``node``'s arguments by schema name, positional or keyword, defaults filled in."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if not arg.kwarg_only and i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _holds(node: Node, allowed, value) -> bool:
    if isinstance(allowed, _InputProperty):
        return allowed.holds(node, value)
    if value is None or allowed is None:
        return value is allowed
    return isinstance(value, _CONSTANTS) and value == allowed


def _short(value) -> str:
    return value.name if isinstance(value, Node) else repr(value)


def argument_miss(node: Node) -> str | None:
    """Why the proofs do not hold for ``node``'s arguments (an op not listed, or a pinned
    argument at another value), or None when they do."""
    entry = ACCEPTED.get(node.target) if node.op == "call_function" else None
    if entry is None:
        return f"{node.target} is not an op the matcher accepts"
    if not entry.pinned:
        return None
    values = bound_arguments(node)
    for name, allowed in entry.pinned.items():
        value = values.get(name)
        if not any(_holds(node, a, value) for a in allowed):
            wanted = " or ".join(map(repr, allowed))
            return (f"{node.target} with {name}={_short(value)} (the proof holds for "
                    f"{name}={wanted} only)")
    return None


def op_of(node) -> object | None:
    """``node``'s target when it is an accepted op whose pinned arguments hold, else None."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in ACCEPTED:
        return None
    return node.target if argument_miss(node) is None else None
