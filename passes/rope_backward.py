"""The backward of HF's RoPE, as AOTAutograd writes it, proven to be a rotation by -θ.

The forward ``out = x * cos + rotate_half(x) * sin`` (``rotate_half(x) = cat(-x2, x1)``) has the
gradient ``g * cos + rotate_half^T(g * sin)``, where ``rotate_half^T(y) = cat(y2, -y1)``. The
backward graph spells the transpose after the product, into zeros::

    y   = g * sin                                     [.., rot]
    t   = slice_scatter(zeros, -y[..., :h], -1, h, 2h) + slice_scatter(zeros, y[..., h:], -1, 0, h)
    out = t + g * cos

so ``out1 = g1 * cos1 + g2 * sin2`` and ``out2 = g2 * cos2 - g1 * sin1``. Where the halves of
cos and of sin are proven equal (HF's ``cat(f, f)`` tables: ``match_trig_source`` proves it
before it accepts the negation), that is ``(g1 c + g2 s, g2 c - g1 s)``: the rotation by -θ,
the op's rotation with sin negated. Every argument of every op read here is proven
(``accepted_ops``): the zeros' size, fill value, dtype and device; each scatter's dim, start,
end and step; the slices' columns.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .accepted_ops import bound_arguments, op_of
from .rope_pattern import (
    NoMatch,
    Operand,
    _factor_splits,
    _last_dim,
    _last_dim_range,
    _require,
    _require_arguments,
    _val,
    trace_features,
)

aten = torch.ops.aten

__all__ = ["match_rotate_half_transposed"]


def _is_zeros_like(node, like: torch.Tensor) -> bool:
    """``node`` = ``full(like's shape, 0)`` in like's dtype, on like's device."""
    if op_of(node) is not aten.full.default:
        return False
    args, val = bound_arguments(node), _val(node)
    return (args.get("fill_value") == 0 and not isinstance(args.get("fill_value"), bool)
            and val is not None and val.shape == like.shape and val.dtype == like.dtype
            and val.device == like.device)


def _scatter_half(scatter: Node, like: torch.Tensor) -> tuple[Node, int, int, bool]:
    """``slice_scatter(zeros, src, -1, start, end, 1)`` with src = ``[-]y[..., a:a + n]``:
    (y, a, placed start, negated)."""
    _require(op_of(scatter) is aten.slice_scatter.default,
             "rotate_half's transpose is not a sum of two slice_scatters")
    args = bound_arguments(scatter)
    _require(_is_zeros_like(args["self"], like),
             "a scatter of rotate_half's transpose does not write into zeros")
    width = like.shape[-1]
    _require(isinstance(width, int) and _last_dim(scatter, args["dim"])
             and args["step"] == 1 and isinstance(args["start"], int)
             and (args["end"] is None or isinstance(args["end"], int)),
             "a scatter of rotate_half's transpose is not a column range of the last dim")
    placed = range(*slice(args["start"], args["end"], 1).indices(width))
    src, negated = args["src"], False
    if op_of(src) is aten.neg.default:
        src, negated = src.args[0], True
    sliced = _last_dim_range(src) if isinstance(src, Node) else None
    _require(sliced is not None and sliced[2] == 1 and _val(src) is not None
             and _val(src).shape[-1] == len(placed) == width // 2 and width % 2 == 0,
             "a scatter of rotate_half's transpose does not place a half of one tensor")
    return sliced[0], sliced[1], placed.start, negated


def match_rotate_half_transposed(node: Node):
    """``node`` = ``g * cos + rotate_half^T(g * sin)`` (the backward of HF's ``rotate_half``
    RoPE), either order. Returns (g1, g2, cos table, sin table, heads dim of g, heads dim of
    the tables (None: none), nodes), read as the rotation by θ with sin negated; or raises
    NoMatch."""
    _require_arguments(node)
    _require(op_of(node) is aten.add.Tensor and len(node.args) == 2
             and all(isinstance(a, Node) for a in node.args), "not a plain sum of tensors")
    for plain, turned in (node.args, node.args[::-1]):
        if op_of(turned) is not aten.add.Tensor or not all(
                isinstance(a, Node) for a in turned.args[:2]):
            continue
        like = _val(turned)
        try:
            halves = [_scatter_half(s, like) for s in turned.args[:2]]
        except NoMatch:
            continue
        (y, a0, p0, n0), (y1, a1, p1, n1) = halves
        half = like.shape[-1] // 2
        # cat(y2, -y1): y[..., h:] placed at [0, h), -y[..., :h] placed at [h, 2h).
        _require(y is y1 and {(a0, p0, n0), (a1, p1, n1)} == {(half, 0, False),
                                                              (0, half, True)},
                 "the scatters are not rotate_half's transpose cat(y2, -y1) of one y")
        sin_splits, cos_splits = _factor_splits(y), _factor_splits(plain)
        pairs = [(s, c) for s in sin_splits for c in cos_splits
                 if s.x is c.x and s.heads_dim == c.heads_dim
                 and s.table_heads_dim == c.table_heads_dim]
        _require(bool(pairs), "g * sin and g * cos do not multiply the same g on the same "
                              "heads dim")
        sin_split, cos_split = pairs[0]
        g = trace_features(sin_split.x)
        _require(g.count == 2 * half, "g is not the rotated features of the sin product")
        g1 = Operand(g.levels, half, g.cast)
        g2 = Operand(tuple((n, start + half * step, step) for n, start, step in g.levels),
                     half, g.cast)
        nodes = [node, plain, turned, y, *turned.args[:2],
                 *(s.args[1] for s in turned.args[:2]),
                 *(s.args[1].args[0] for s in turned.args[:2]
                   if op_of(s.args[1]) is aten.neg.default)]
        return (g1, g2, cos_split.table, sin_split.table, cos_split.heads_dim,
                cos_split.table_heads_dim, nodes)
    raise NoMatch("sum is not g * cos + rotate_half^T(g * sin)")
