"""Recognise one RoPE subgraph in a post-grad ATen graph.

One parameterised matcher serves every spelling: instead of a template per variant, it reads
the arithmetic backwards from a candidate output and proves, op by op, that it computes::

    out[..., :rot] = rotate(x[..., :rot], cos_sin_cache[positions])   (neox or GPT-J pairs)
    out[..., rot:] = x[..., rot:]

Operands are traced through a whitelist of ops only (slices and splits of the last dim,
unsqueeze of the head dim, dtype casts, a row gather of the cache), so anything it does not
understand is simply not a match. Matching never mutates the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
from torch.fx import Node

from .accepted_ops import argument_miss, bound_arguments, op_of
from .fx_surgery import statically_equal
from .trig_sources import (
    ComplexTables,
    FullTables,
    GatheredCache,
    HalfTables,
    HalfWidthTables,
    PairTables,
    PairwiseTables,
    SectionedTables,
    TrigSource,
)

aten = torch.ops.aten
prims = torch.ops.prims

_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
_GATHERS = (aten.index.Tensor, aten.index_select.default, aten.embedding.default)
_SUBS = (aten.sub.Tensor,)
_ADDS = (aten.add.Tensor,)
_MULS = (aten.mul.Tensor,)
_VIEW_TARGETS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# Eager's index ops that read a negative index from the end of the dim (Python's rule):
# ``x[idx]``, ``x[idx] = v``, ``index_put_``. ``index_select``, ``embedding`` and ``index_copy_``
# raise there instead. By name: a node's meta may hold another object for the same overload.
_WRAPPING_EAGER_OPS = frozenset(str(op) for op in (aten.index.Tensor, aten.index_put.default,
                                                   aten.index_put_.default))


# GPT-J pairs rotated and written back as neox halves (DeepSeek's MLA
# ``apply_rotary_pos_emb_interleave``): out[..., :rot/2] = o1 of pairs (x[2i], x[2i+1]),
# out[..., rot/2:] = o2. The in-place ops write each pair where they read it.
DEINTERLEAVE_REASON = ("GPT-J pairs x[..., 0::2], x[..., 1::2] rotated into neox halves "
                       "cat(o1, o2) (a de-interleaving RoPE, DeepSeek MLA's "
                       "apply_rotary_pos_emb_interleave): the fused ops write each pair in "
                       "place, not de-interleaved")


class NoMatch(Exception):
    """The candidate is not RoPE; the message says why (for debug logs)."""


class NearMiss(NoMatch):
    """The candidate has RoPE's arithmetic (a rotated block) but a later proof step failed:
    the pass logs these at DEBUG, so a miss on real model code is never silent."""


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def eager_wraps_negative(node: Node) -> bool:
    """Whether the eager op ``node`` comes from reads a negative index from the end of its dim.
    That op is ``meta["original_aten"]``: AOTAutograd decomposes ``index_select`` into ``index``
    and ``index_copy_`` into ``index_put`` before the post-grad passes (Inductor's code for them
    then wraps, where eager raises), so the target alone does not say it."""
    return str(node.meta.get("original_aten", node.target)) in _WRAPPING_EAGER_OPS


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise NoMatch(why)


def _require_arguments(node: Node) -> None:
    """``node``'s arguments are ones the proof holds for (``accepted_ops``)."""
    why = argument_miss(node)
    if why is not None:
        raise NoMatch(why)


def _last_dim(node: Node, dim) -> bool:
    val = _val(node)
    return val is not None and isinstance(dim, int) and dim in (-1, val.dim() - 1)


def _float_cast(node: Node) -> bool:
    if op_of(node) is prims.convert_element_type.default:
        return isinstance(node.args[1], torch.dtype) and node.args[1].is_floating_point
    if op_of(node) is aten._to_copy.default:
        dtype = node.kwargs.get("dtype")
        return isinstance(dtype, torch.dtype) and dtype.is_floating_point
    return False




def _pair_view_source(node: Node) -> Node | None:
    """If ``node`` views its source's last dim ``d`` as ``(d / 2, 2)``, return the source."""
    if op_of(node) not in _VIEW_TARGETS or not isinstance(node.args[0], Node):
        return None
    val, src = _val(node), _val(node.args[0])
    if val is None or src is None or val.dim() != src.dim() + 1 or val.shape[-1] != 2:
        return None
    same_lead = all(statically_equal(a, b) for a, b in zip(val.shape[:-2], src.shape[:-1],
                                                            strict=False))
    return node.args[0] if same_lead and val.shape[-2] * 2 == src.shape[-1] else None


def _last_dim_range(node: Node) -> tuple[Node, int, int] | None:
    """If ``node`` takes a slice of its source's last dim, return (source, start, step)."""
    if op_of(node) is aten.select.int and isinstance(node.args[0], Node):
        # x.reshape(..., -1, 2)[..., j] == x[..., j::2]
        view, dim, index = node.args
        src = _pair_view_source(view)
        if src is not None and dim in (-1, _val(view).dim() - 1) and index in (0, 1):
            return src, index, 2
        return None
    if op_of(node) is operator.getitem and isinstance(node.args[0], Node):
        split, index = node.args
        if op_of(split) in _SPLITS and _last_dim(split.args[0], split.args[2] if len(
                split.args) > 2 else split.kwargs.get("dim", 0)):
            sizes = split.args[1]
            if isinstance(sizes, int):
                return split.args[0], index * sizes, 1
            if all(isinstance(s, int) for s in sizes):
                return split.args[0], sum(sizes[:index]), 1
        return None
    if op_of(node) is aten.slice.Tensor:
        src = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        src_val = _val(src)
        if src_val is None or not _last_dim(src, dim):
            return None
        start = 0 if start is None else start
        if not isinstance(start, int) or not isinstance(step, int) or step < 1:
            return None
        length = src_val.shape[-1]
        if start < 0:
            start += length
        return src, max(0, start), step
    return None


@dataclass(frozen=True)
class Operand:
    """A slice ``t[..., start::step]`` (``count`` elements) of the last dim, possibly cast,
    known at every level of slicing: ``levels`` holds ``(t, start, step)`` from the operand
    itself outwards (e.g. ``q[..., :64]`` -> ``q`` -> the per-head ``qkv`` that ``q`` was split
    from), so the matcher can pick the level that is the head."""

    levels: tuple[tuple[Node, int, int], ...]
    count: int
    cast: bool

    def _identity(self):
        # The same elements of the same tensor, however the slicing was spelled.
        return (self.levels[-1], self.count, self.cast)

    def __eq__(self, other):
        return isinstance(other, Operand) and self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())

    @property
    def base(self) -> Node:
        return self.levels[-1][0]

    def at(self, node: Node) -> tuple[int, int] | None:
        """(start, step) relative to ``node``, if ``node`` is one of its levels."""
        for level, start, step in self.levels:
            if level is node:
                return start, step
        return None


def trace_features(node: Node) -> Operand:
    """Follow last-dim slices/splits and float casts from ``node`` outwards. A cast is a level
    of its own (the same elements in another dtype): the head may be the cast itself, as when
    Gemma3's fp32 q_norm is cast to bf16 and RoPE'd in bf16."""
    count = _val(node).shape[-1]
    start, step, cast = 0, 1, False
    levels = []
    while True:
        if _float_cast(node):
            cast = True
            levels.append((node, start, step))
            node = node.args[0]
            continue
        levels.append((node, start, step))
        sliced = _last_dim_range(node)
        if sliced is None:
            return Operand(tuple(levels), count, cast)
        node, parent_start, parent_step = sliced
        start, step = parent_start + start * parent_step, parent_step * step


@dataclass(frozen=True)
class TrigOperand:
    """Columns ``[start, start + count)`` of ``cache[positions]``, broadcast over heads;
    ``wrap_negative``: the gather reads a negative position from the cache's end (``index``,
    eager ``cache[positions]``), not an error (``index_select``, ``embedding``)."""

    cache: Node
    positions: Node
    start: int
    count: int
    wrap_negative: bool = False
    sections: tuple[int, ...] | None = None  # mRoPE: positions [3, T], columns by stream
    interleaved: bool = False  # mRoPE streams interleaved by column (Qwen3-VL), not sectioned


def trace_trig(node: Node, num_tokens) -> TrigOperand:
    """Follow a ``[T, 1, n]`` factor back to a row gather of a cos/sin cache."""
    val = _val(node)
    _require(val is not None and val.dim() == 3 and statically_equal(val.shape[1], 1)
             and statically_equal(val.shape[0], num_tokens),
             "cos/sin factor is not [num_tokens, 1, n]")
    unsqueezed = False
    start, step = 0, 1
    count = val.shape[-1]
    while True:
        if _float_cast(node):
            node = node.args[0]
            continue
        if op_of(node) is aten.unsqueeze.default and not unsqueezed:
            dim = node.args[1]
            _require(dim in (1, -2), "cos/sin unsqueezed on a dim other than heads")
            unsqueezed = True
            node = node.args[0]
            continue
        sliced = _last_dim_range(node)
        if sliced is not None:
            node, parent_start, parent_step = sliced
            start, step = parent_start + start * parent_step, parent_step * step
            continue
        break
    _require(unsqueezed and step == 1, "cos/sin is not a contiguous column range broadcast "
                                       "over heads")
    sections, interleaved = None, False
    if op_of(node) is aten.slice_scatter.default:
        # sglang's apply_interleaved_rope (Qwen3-VL): stream 0's columns with every third
        # column from i = 1 (and i = 2) replaced by stream 1's (2's).
        _require(start == 0 and statically_equal(count, _val(node).shape[-1]),
                 "cos/sin take part of an mRoPE table")
        node, sections = _interleaved_streams(node)
        interleaved = True
    elif op_of(node) is aten.cat.default:
        # sglang's MRotaryEmbedding: cat([m[i] for i, m in enumerate(t.split(sections, -1))])
        # of the gathered rows of 3 position streams, t [3, T, n]: stream i's columns of
        # section i, in order, every column once (the mRoPE op's reading).
        found = _assembled_streams(node)
        _require(found is not None and len(found[1]) == 3,
                 "cos/sin columns are not assembled from 3 position streams by sections")
        _require(start == 0 and statically_equal(count, _val(node).shape[-1]),
                 "cos/sin take part of an mRoPE table")
        node, sections = found
    if sections is not None:  # the streams t [3, T, n]: a column range of the gathered rows
        while (sliced := _last_dim_range(node)) is not None:
            node, parent_start, parent_step = sliced
            start, step = parent_start + start * parent_step, parent_step * step
        _require(step == 1, "mRoPE streams are not a contiguous column range of the rows")
    wrap_negative = False  # index_select, embedding: a negative position raises
    if op_of(node) is aten.index.Tensor:
        indices = node.args[1]
        _require(len(indices) == 1 and indices[0] is not None, "cache gathered on several dims")
        cache, positions = node.args[0], indices[0]
        # cache[positions]: [-P, 0) are rows P + position; an index_select's index raises.
        wrap_negative = eager_wraps_negative(node)
    elif op_of(node) is aten.index_select.default:
        _require(node.args[1] == 0, "cache gathered on a dim other than rows")
        cache, positions = node.args[0], node.args[2]
    elif op_of(node) is aten.embedding.default:
        cache, positions = node.args[0], node.args[1]
    else:
        raise NoMatch(f"cos/sin do not come from a cache row gather (found {node.target})")
    pos_val = _val(positions)
    if sections is not None:
        _require(pos_val is not None and pos_val.dim() == 2 and statically_equal(
            pos_val.shape[0], 3) and statically_equal(pos_val.shape[1], num_tokens)
                 and pos_val.dtype in (torch.int32, torch.int64),
                 "mRoPE positions are not [3, num_tokens] integers")
    else:
        _require(pos_val is not None and pos_val.dim() == 1
                 and pos_val.dtype in (torch.int32, torch.int64),
                 "positions are not 1-D integers")
    # A cast of the whole cache (e.g. to the model dtype) is dropped: the fused op reads the
    # original table and does its math in fp32.
    while _float_cast(cache):
        cache = cache.args[0]
    cache_val = _val(cache)
    _require(cache_val is not None and cache_val.dim() == 2 and cache_val.dtype.is_floating_point,
             "cos_sin_cache is not a 2-D float table")
    return TrigOperand(cache, positions, start, count, wrap_negative, sections, interleaved)


def _interleaved_streams(node: Node) -> tuple[Node, tuple[int, int, int]]:
    """``node`` = sglang's ``apply_interleaved_rope(t, (s0, s1, s2))`` of t ``[3, .., n]``::

        x = t[0].clone()
        x[..., 1 : 3 * s1 : 3] = t[1, ..., 1 : 3 * s1 : 3]
        x[..., 2 : 3 * s2 : 3] = t[2, ..., 2 : 3 * s2 : 3]

    post-grad: ``slice_scatter(slice_scatter(clone(select(t, 0, 0)), copy(_, slice(select(t, 0,
    1), -1, 1, E1, 3)), -1, 1, E1, 3), copy(_, slice(select(t, 0, 2), -1, 2, E2, 3)), -1, 2, E2,
    3)``, either scatter left out when empty. Returns (t, sections) with s1, s2 the number of
    columns each scatter writes (the op's reading: stream 1 at ``i % 3 == 1, i < 3 * s1``, so
    the same columns) and s0 the rest; or raises NoMatch."""
    width = _val(node).shape[-1]
    _require(isinstance(width, int), "interleaved mRoPE tables have a symbolic width")
    replaced: dict[int, int] = {}  # stream -> columns written
    streams = None
    while op_of(node) is aten.slice_scatter.default:
        args = bound_arguments(node)
        base, src = args["self"], args["src"]
        dim, begin, end, step = args["dim"], args["start"], args["end"], args["step"]
        _require(_last_dim(node, dim) and step == 3 and isinstance(begin, int)
                 and (end is None or isinstance(end, int)),
                 "cos/sin columns are scattered other than every third column of the last dim")
        columns = range(*slice(begin, end, step).indices(width))
        stream = columns.start if len(columns) else begin
        _require(stream in (1, 2) and stream not in replaced,
                 "interleaved mRoPE scatters are not columns 1::3 and 2::3, once each")
        if op_of(src) is aten.copy.default:  # x[..., s] = y, functionalized: y's values
            dst_val, y_val = _val(src.args[0]), _val(src.args[1])
            _require(dst_val is not None and y_val is not None
                     and dst_val.dtype == y_val.dtype and dst_val.device == y_val.device
                     and dst_val.shape == y_val.shape,
                     "an interleaved mRoPE column copy casts or broadcasts")
            src = src.args[1]
        sliced = _last_dim_range(src)
        _require(sliced is not None and sliced[2] == 3
                 and (not len(columns) or sliced[1] == columns.start)
                 and statically_equal(_val(src).shape[-1], len(columns)),
                 "interleaved mRoPE columns are not read from the same columns of their stream")
        picked = sliced[0]
        _require(op_of(picked) is aten.select.int and picked.args[1] == 0
                 and picked.args[2] == stream,
                 f"columns {stream}::3 of interleaved mRoPE tables are not read from stream "
                 f"{stream}")
        _require(streams is None or picked.args[0] is streams,
                 "interleaved mRoPE streams come from different tables")
        streams = picked.args[0]
        replaced[stream] = len(columns)
        node = base
    if op_of(node) is aten.clone.default:
        node = node.args[0]
    _require(replaced and op_of(node) is aten.select.int and node.args[1] == 0
             and node.args[2] == 0 and (streams is None or node.args[0] is streams),
             "interleaved mRoPE tables do not start from stream 0 of the same streams")
    streams = node.args[0]
    streams_val = _val(streams)
    _require(streams_val is not None and streams_val.dim() >= 2
             and statically_equal(streams_val.shape[0], 3)
             and statically_equal(streams_val.shape[-1], width),
             "interleaved mRoPE streams are not [3, .., n]")
    s1, s2 = replaced.get(1, 0), replaced.get(2, 0)
    return streams, (width - s1 - s2, s1, s2)


@dataclass(frozen=True)
class PairTrig:
    """``rows[..., index]`` of cos/sin rows gathered as ``cache[positions]`` with the cache
    ``[max_position, rot/2, 2]`` holding (cos, sin) pairs (gpt-fast / torchtune ``freqs_cis``),
    broadcast as ``factor`` (x's shape with 1 on the heads dim, and maybe the batch)."""

    rows: Node
    index: int
    factor: Node

    def __eq__(self, other):
        return (isinstance(other, PairTrig) and self.rows is other.rows
                and self.index == other.index)

    def __hash__(self):
        return hash((id(self.rows), self.index))


_NOT_A_PAIR_PICK = ("not a (cos, sin) pick",
                    "cos/sin are not picked from the last dim of (cos, sin) pairs")


def trace_pair_trig(node: Node, x_val) -> PairTrig:
    factor = node
    while _float_cast(node):
        node = node.args[0]
    _require(op_of(node) is aten.select.int and node.args[2] in (0, 1), "not a (cos, sin) pick")
    view = node.args[0]
    # Pick 0 is cos and pick 1 sin only on the last dim of a view with the rows' pairs last
    # (the select's dim read: another dim picks other elements, as q's and k's pairing assumes).
    _require(_last_dim(view, node.args[1]) and _val(view).shape[-1] == 2,
             "cos/sin are not picked from the last dim of (cos, sin) pairs")
    rows = view.args[0] if op_of(view) in _VIEW_TARGETS else None
    # Gathered rows (freqs_cis[input_pos]) or a slice of them on a row dim (cache[:seq_len]):
    # the op reads the picks themselves, so any rows of (cos, sin) pairs will do.
    _require(rows is not None and (op_of(rows) in _GATHERS or (
        op_of(rows) is aten.slice.Tensor and not _last_dim(
            rows, rows.args[1] if len(rows.args) > 1 else 0))),
             "cos/sin pairs are not gathered or sliced rows")
    rows_val, f_val = _val(rows), _val(factor)
    _require(rows_val.dim() >= 2 and rows_val.shape[-1] == 2 and f_val.dim() == x_val.dim()
             and f_val.shape[-1] == x_val.shape[-1], "cos/sin pairs do not line up with x")
    # The rows' token dims (torchtune's [B, S] input_pos: [1, S], or [1, 1] at a one-token
    # decode step) are the factor's dims other than 1: none is spread over heads.
    _require(sum(1 for a in f_val.shape[:-1] if not statically_equal(a, 1))
             == sum(1 for a in rows_val.shape[:-2] if not statically_equal(a, 1)),
             "cos/sin pairs are not broadcast over heads")
    return PairTrig(rows, node.args[2], factor)


@dataclass(frozen=True)
class ComplexTrig:
    """A complex factor ``freqs_cis`` (Meta Llama, torchtitan) multiplying ``view_as_complex``
    of x's pairs: its real part is cos, its imaginary part sin (``(a + ib)(c + is)``)."""

    factor: Node


def _match_complex_rotation(node: Node):
    """``view_as_real(view_as_complex(x.reshape(.., -1, 2)) * freqs_cis).flatten(3)``: GPT-J
    pairs ``(x[2i], x[2i+1])`` rotated by ``(real, imag)`` of ``freqs_cis``."""
    vr = node.args[0]
    _require(isinstance(vr, Node) and op_of(vr) is aten.view_as_real.default,
             "view of something other than view_as_real")
    prod = vr.args[0]
    _require(op_of(prod) in _MULS and len(prod.args) == 2 and all(
        isinstance(a, Node) for a in prod.args), "view_as_real of something other than a product")
    out_val, vr_val = _val(node), _val(vr)
    _require(out_val is not None and vr_val is not None and out_val.dim() == vr_val.dim() - 1
             and all(statically_equal(a, b) for a, b in zip(out_val.shape[:-1],
                                                             vr_val.shape[:-2], strict=True)),
             "view_as_real is not flattened back")
    for xc, factor in (prod.args, prod.args[::-1]):
        if op_of(xc) is not aten.view_as_complex.default:
            continue
        pairs = xc.args[0]
        x_node = _pair_view_source(pairs) if isinstance(pairs, Node) else None
        f_val, xc_val = _val(factor), _val(xc)
        if x_node is None or f_val is None or not f_val.is_complex() or (
                f_val.dim() != xc_val.dim()) or not statically_equal(
                    f_val.shape[-1], xc_val.shape[-1]):
            continue
        x = trace_features(x_node)
        x1 = Operand(tuple((n, s, 2 * st) for n, s, st in x.levels), x.count // 2, x.cast)
        x2 = Operand(tuple((n, s + st, 2 * st) for n, s, st in x.levels), x.count // 2, x.cast)
        ones = [d for d in range(f_val.dim() - 1) if statically_equal(f_val.shape[d], 1)]
        _require(bool(ones), "freqs_cis is not broadcast over heads")
        return x1, x2, ComplexTrig(factor), max(ones), [node, vr, prod, xc, pairs]
    raise NoMatch("product is not view_as_complex(x pairs) times a complex freqs_cis")


@dataclass(frozen=True)
class HalfTrig:
    """A half-width cos/sin table ``[.., rot/2]`` already shaped to broadcast over x's heads
    (nanochat's ``[1, T, 1, rot/2]``, a ``[T, rot/2]`` table): ``table`` (casts stripped),
    ``heads_dim`` of x, and ``table_heads_dim`` the size-1 dim of ``table`` that lines up with it
    (None: ``table`` has no heads dim)."""

    table: Node
    heads_dim: int
    table_heads_dim: int | None
    # Why the factor, a pick of (cos, sin) pairs, was not read as pair rows (PairTrig); the
    # rotation's miss names it when the halves do not pair up as half-width tables either.
    pair_miss: str | None = field(default=None, compare=False)


def trace_half_trig(node: Node, x_val) -> HalfTrig:
    """Follow a cos/sin factor of ``x`` (x's features, rot/2 wide) back through casts to a
    table that broadcasts over x's heads (the op reads the table, in fp32 as for a cast
    cache)."""
    while _float_cast(node):
        node = node.args[0]
    heads_dim = _broadcast_heads_dim(_val(node), x_val)
    _require(heads_dim is not None, "cos/sin factor does not broadcast over x's heads")
    own = heads_dim - (x_val.dim() - _val(node).dim())
    return HalfTrig(node, heads_dim, own if own >= 0 else None)


def _product_terms(node: Node, num_tokens):
    """``node`` = x-features * cos/sin (either order)."""
    _require(op_of(node) in _MULS and len(node.args) == 2, f"expected a product, got {node.target}")
    a, b = node.args
    _require(isinstance(a, Node) and isinstance(b, Node), "product with a scalar")
    return _factor_terms(a, b, num_tokens)


def _factor_terms(a: Node, b: Node, num_tokens):
    """``a * b`` = x-features * cos/sin (either order): (features, cos/sin factor)."""
    for x, t in ((a, b), (b, a)):
        x_val, t_val = _val(x), _val(t)
        pair_miss = None
        if x_val is not None and t_val is not None and x_val.dim() == t_val.dim() == 4:
            try:
                return trace_features(x), trace_pair_trig(t, x_val)
            except NoMatch as why:
                if str(why) not in _NOT_A_PAIR_PICK:
                    pair_miss = str(why)
        if x_val is not None and t_val is not None and x_val.dim() == 4:
            # A half-width table shaped to broadcast over x's heads (nanochat, [T, rot/2]).
            try:
                half = trace_half_trig(t, x_val)
            except NoMatch:
                continue
            return trace_features(x), replace(half, pair_miss=pair_miss)
        x_val = _val(x)
        if x_val is None or x_val.dim() != 3 or _val(t) is None or _val(t).dim() != 3:
            continue
        if not statically_equal(_val(t).shape[1], 1):
            continue
        try:
            return trace_features(x), trace_trig(t, num_tokens)
        except NoMatch as why:
            # Not a row gather: a half-width table [T, 1, rot/2] as it is (a graph input, such
            # as the cos/sin a backward graph saved from its forward), read in place.
            if not _is_table_input(t):
                raise
            try:
                return trace_features(x), trace_half_trig(t, x_val)
            except NoMatch:
                raise why from None
    raise NoMatch("product is not features times a [T, 1, n] cos/sin factor")


def _is_table_input(node: Node) -> bool:
    """``node`` (through float casts) is a floating-point graph input or buffer."""
    while _float_cast(node):
        node = node.args[0]
    val = _val(node)
    return node.op in ("placeholder", "get_attr") and val is not None and (
        val.dtype.is_floating_point)


@dataclass
class RopeMatch:
    """One proven RoPE application ``output = rope(base)``: the first ``rotary_dim`` features of
    ``base`` (heads at ``heads_dim``, the features last) rotated by the cos/sin of ``trig``, the
    rest passed through."""

    base: Node
    output: Node
    trig: TrigSource
    rotary_dim: int
    head_size: int
    is_neox: bool
    heads_dim: int = 1
    nodes: list[Node] = field(default_factory=list)

    @property
    def key(self):
        """What q and k must share to be rotated by one call."""
        return (self.trig.pairing_key(), self.rotary_dim, self.is_neox, self.head_size,
                self.base.meta["val"].dtype)


def _signed_terms(half: Node, num_tokens) -> list[tuple[int, Operand, object]]:
    """``half`` = ``±a ± b`` (add or sub) of two products, each ``x * t`` with a ``neg`` on
    either factor (``x1 * (-sin)``, ``-x1 * sin``): [(sign, features, cos/sin factor)] x2."""
    _require(op_of(half) in (*_ADDS, *_SUBS) and len(half.args) == 2 and all(
        isinstance(a, Node) for a in half.args), "a half is not a sum or difference of products")
    terms = []
    for arg, sign in zip(half.args, (1, -1 if op_of(half) in _SUBS else 1), strict=True):
        _require(op_of(arg) in _MULS and len(arg.args) == 2 and all(
            isinstance(a, Node) for a in arg.args), f"expected a product, got {arg.target}")
        a, b = arg.args
        while op_of(a) is aten.neg.default:
            a, sign = a.args[0], -sign
        while op_of(b) is aten.neg.default:
            b, sign = b.args[0], -sign
        terms.append((sign, *_factor_terms(a, b, num_tokens)))
    return terms


def _match_rotation(o1: Node, o2: Node, num_tokens):
    """``o1 = x1*cos - x2*sin`` and ``o2 = x2*cos + x1*sin``, or the rotation by -θ
    (nanochat: ``o1 = x1*cos + x2*sin``, ``o2 = x2*cos - x1*sin``, any order and spelling of
    the signs); returns (x1, x2, cos, sin, whether the rotation is by -θ: sin negated)."""
    _require(isinstance(o1, Node) and isinstance(o2, Node), "halves are not tensors")
    _require_arguments(o1)
    _require_arguments(o2)
    first, second = _signed_terms(o1, num_tokens), _signed_terms(o2, num_tokens)
    for (cos_sign, x1, cos), (sin_sign, x2, sin) in (first, first[::-1]):
        if cos_sign != 1:
            continue
        found = {(x, t): sign for sign, x, t in second}
        if len(found) != 2 or found.get((x2, cos)) != 1 or (x1, sin) not in found:
            continue
        signs = (sin_sign, found[(x1, sin)])
        if signs in ((-1, 1), (1, -1)):
            return x1, x2, cos, sin, signs == (1, -1)
    for _, _, factor in (*first, *second):
        if getattr(factor, "pair_miss", None):
            raise NoMatch(f"(cos, sin) pair picks are not rows read per token: "
                          f"{factor.pair_miss}")
    raise NoMatch("second half is not x2*cos + x1*sin")


_ELEMENTWISE_SCALE = (aten.mul.Tensor, aten.div.Tensor)


@dataclass(frozen=True)
class FactorSplit:
    """One reading of a product ``x * factor``: ``table`` is what the tables op reads (the
    factor, casts stripped, or the table an ``unsqueeze`` on the heads dim came from),
    ``heads_dim`` the dim of x the factor broadcasts over as heads, and ``table_heads_dim``
    the size-1 dim of ``table`` that lines up with it (None: ``table`` is
    ``[..tokens.., n]``, without one)."""

    x: Node
    table: Node
    heads_dim: int
    table_heads_dim: int | None = None


def _broadcast_heads_dim(t_val, x_val) -> int | None:
    """A factor already shaped to broadcast against x (HF's ``[1, 1, S, D]`` as an input,
    buffer or global; litgpt's ``view(1, 1, T, n)``; a ``[T, D]`` table): the dim of x it
    broadcasts over as heads, or None when it does not broadcast to x's shape. Its dims
    line up with x's from the right; each is x's size or 1. Of the non-batch, non-feature
    dims the factor broadcasts over (missing or 1), the innermost where x is not 1 is the
    heads dim (``[B, H, S, D]`` with ``[1, 1, S, D]``: 1; token-first ``[B, S, H, D]`` with
    ``[1, S, 1, D]``: 2), else the innermost. Any such dim is a correct reading: the tables op
    reads row ``t % R`` for the token dims that are left, which ``table_views`` proves."""
    if t_val is None or x_val is None or x_val.dim() < 3 or not 0 < t_val.dim() <= x_val.dim():
        return None
    offset = x_val.dim() - t_val.dim()
    if not statically_equal(t_val.shape[-1], x_val.shape[-1]):
        return None
    broadcast = []
    for d in range(offset, x_val.dim() - 1):
        a, b = t_val.shape[d - offset], x_val.shape[d]
        if statically_equal(a, 1):
            broadcast.append(d)
        elif not statically_equal(a, b):
            return None
    candidates = [d for d in range(1, x_val.dim() - 1) if d < offset or d in broadcast]
    if not candidates:
        return None
    wide = [d for d in candidates if not statically_equal(x_val.shape[d], 1)]
    return (wide or candidates)[-1]


def _factor_splits(node: Node) -> list[FactorSplit]:
    """``node`` = x * factor (either order), the factor a cos/sin table broadcast over x's
    heads: ``unsqueeze(table, heads_dim)``, or a factor already shaped to broadcast
    (``_broadcast_heads_dim``). Every reading, the unsqueezed ones first; the caller picks the
    one whose x the rest of the proof holds for."""
    _require(isinstance(node, Node), "not a tensor")
    _require(op_of(node) in _MULS and len(node.args) == 2 and all(
        isinstance(a, Node) for a in node.args), "expected a product of two tensors")
    unsqueezed, shaped = [], []
    for x, factor in (node.args, node.args[::-1]):
        table = factor
        while _float_cast(table):
            table = table.args[0]
        x_val, t_val = _val(x), _val(table)
        if x_val is None or t_val is None or x_val.dim() < 3 or t_val.dim() > x_val.dim():
            continue
        if op_of(table) is aten.unsqueeze.default:
            # A table of lower rank (litgpt's [T, n].unsqueeze(-3)) broadcasts from the right.
            heads_dim = table.args[1] % t_val.dim() + x_val.dim() - t_val.dim()
            if 0 < heads_dim < x_val.dim() - 1 and table.args[1] % t_val.dim() != (
                    t_val.dim() - 1):
                unsqueezed.append(FactorSplit(x, table.args[0], heads_dim))
                continue
        heads_dim = _broadcast_heads_dim(t_val, x_val)
        if heads_dim is not None:
            own = heads_dim - (x_val.dim() - t_val.dim())
            shaped.append(FactorSplit(x, table, heads_dim, own if own >= 0 else None))
    _require(bool(unsqueezed or shaped),
             "product is not x times a cos/sin table broadcast over the heads dim")
    return unsqueezed + shaped


def _is_scalar(value) -> bool:
    """A Python number, or a 0-d tensor (a float traced as an input under dynamic=True)."""
    if not isinstance(value, Node):
        return isinstance(value, (int, float))
    val = _val(value)
    return val is not None and val.dim() == 0


def _keeps_rows(node: Node) -> bool:
    """``node`` only adds, picks or broadcasts whole rows of its input's last dim (unsqueeze,
    slice or expand of another dim), so each output row is an input row."""
    val = _val(node)
    if val is None or node.op != "call_function" or not node.args or not isinstance(
            node.args[0], Node) or _val(node.args[0]) is None:
        return False
    src = _val(node.args[0])
    if val.dim() == 0 or src.dim() == 0 or not statically_equal(val.shape[-1], src.shape[-1]):
        return False
    if op_of(node) is aten.unsqueeze.default:
        return node.args[1] % val.dim() != val.dim() - 1
    if op_of(node) is aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim % src.dim() != src.dim() - 1
    if op_of(node) is aten.expand.default:
        return val.dim() >= src.dim()
    return False


def _duplicated_halves(table: Node) -> Node:
    """Prove ``table[..., :n/2] == table[..., n/2:]``: an elementwise function (cos/sin, scalar
    scale, casts) of ``cat((f, f), -1)`` or of its expand-and-reshape spelling (before or
    after cos/sin: any elementwise function keeps equal halves equal). Returns f."""
    node = table
    while True:
        elementwise = _float_cast(node) or op_of(node) in (
            aten.cos.default, aten.sin.default, aten.clone.default) or (
                op_of(node) in _ELEMENTWISE_SCALE and isinstance(node.args[0], Node)
                and _is_scalar(node.args[1]))
        if not (elementwise or _keeps_rows(node)):
            break
        node = node.args[0]
    _require(node.op == "call_function", "cos/sin table is a graph input (a buffer computed "
             "outside the graph, as litgpt's cos/sin): its equal halves cannot be proven")
    return _duplication_of(node)


def _duplication_of(node: Node) -> Node:
    """``node`` is ``cat((f, f), -1)`` or ``f`` expanded as ``(.., 2, n/2)`` and merged into
    the last dim only: returns f, or raises NoMatch."""
    if op_of(node) is aten.cat.default:
        parts = node.args[0]
        _require(len(parts) == 2 and parts[0] is parts[1] and _last_dim(
            node, node.args[1] if len(node.args) > 1 else 0), "angles are not cat((f, f), -1)")
        return parts[0]
    _require(op_of(node) in _VIEW_TARGETS,
             "angles are not duplicated halves")
    inner = node.args[0]
    if op_of(inner) is aten.clone.default:
        inner = inner.args[0]
    _require(isinstance(inner, Node) and op_of(inner) is aten.expand.default,
             "angles are not an expand of one half")
    unsq = inner.args[0]
    unsq_val, exp_val, out_val = _val(unsq), _val(inner), _val(node)
    _require(isinstance(unsq, Node) and op_of(unsq) is aten.unsqueeze.default
             and None not in (unsq_val, exp_val, out_val) and unsq_val.dim() >= 2
             and unsq.args[1] % unsq_val.dim() == unsq_val.dim() - 2
             and statically_equal(unsq_val.shape[-2], 1) and statically_equal(
                 exp_val.shape[-2], 2), "angles are not f expanded to (.., 2, n/2)")
    # The reshape must merge exactly the (2, n/2) pair into the last dim: (.., n). Merging
    # another dim (repeat_interleave along the sequence, flatten(1, 2)) duplicates rows, not
    # halves.
    _require(out_val.dim() == exp_val.dim() - 1 and all(
        statically_equal(a, b) for a, b in zip(out_val.shape[:-1], exp_val.shape[:-2],
                                                strict=True))
             and statically_equal(out_val.shape[-1], 2 * exp_val.shape[-1]),
             "angles are not f duplicated along the last dim (another dim is merged)")
    return unsq.args[0]


def _match_rotate_half(node: Node):
    """HF form: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, the
    tables unsqueezed on the heads dim or already shaped to broadcast over it. Returns (x1,
    x2, cos table, sin table, heads dim of x, heads dim of the tables (None: none), nodes)."""
    _require_arguments(node)
    _require(len(node.args) == 2 and all(isinstance(a, Node) for a in node.args),
             "not a plain sum of tensors")
    for plain, rotated in (node.args, node.args[::-1]):
        try:
            plain_splits, rotated_splits = _factor_splits(plain), _factor_splits(rotated)
        except NoMatch:
            continue
        # rotate_half(x) is the cat; the factor beside it is sin.
        rotated_splits = [s for s in rotated_splits if op_of(s.x) is aten.cat.default]
        if not rotated_splits:
            continue
        sin_split = next((s for s in rotated_splits if len(s.x.args[0]) == 2 and op_of(
            s.x.args[0][0]) is aten.neg.default), rotated_splits[0])
        rh = sin_split.x
        _require(len(rh.args[0]) == 2 and _last_dim(rh, rh.args[1] if len(rh.args) > 1 else 0),
                 "rotate_half is not a cat of two halves")
        neg_x2, x1_node = rh.args[0]
        _require(isinstance(neg_x2, Node) and op_of(neg_x2) is aten.neg.default,
                 "rotate_half's first half is not negated")
        x1, x2 = trace_features(x1_node), trace_features(neg_x2.args[0])

        def rotates(split: FactorSplit, x1=x1, x2=x2) -> bool:
            # The halves must be x[..., :rot/2] and x[..., rot/2:rot] of the cos term's
            # x[..., :rot] (compared at a tensor all three are slices of: slices of slices may
            # be folded).
            x = trace_features(split.x)
            return x.count == 2 * x1.count and any(
                x.at(n) is not None and x.at(n)[1] == 1 and x1.at(n) == x.at(n)
                and x2.at(n) == (x.at(n)[0] + x1.count, 1) for n, _, _ in x.levels)

        cos_split = next((s for s in plain_splits if rotates(s)), None)
        _require(cos_split is not None, "cos term does not multiply the same x[..., :rot]")
        # The sin reading whose heads dim is the cos reading's (a shaped factor of one head
        # may read either way).
        sin_split = next((s for s in rotated_splits if s.heads_dim == cos_split.heads_dim
                          and (s.table_heads_dim is None) == (
                              cos_split.table_heads_dim is None)), sin_split)
        _require(sin_split.heads_dim == cos_split.heads_dim,
                 "cos and sin broadcast on different dims")
        _require(sin_split.table_heads_dim == cos_split.table_heads_dim,
                 "cos and sin tables have different shapes")
        nodes = [node, plain, rotated, rh, neg_x2]
        return (x1, x2, cos_split.table, sin_split.table, cos_split.heads_dim,
                cos_split.table_heads_dim, nodes)
    raise NoMatch("sum is not x * cos + rotate_half(x) * sin")


# ---------------------------------------------------------------------------------------------
# The backward of HF's RoPE, as AOTAutograd writes it, proven to be a rotation by -θ.
#
# The forward ``out = x * cos + rotate_half(x) * sin`` (``rotate_half(x) = cat(-x2, x1)``) has the
# gradient ``g * cos + rotate_half^T(g * sin)``, where ``rotate_half^T(y) = cat(y2, -y1)``. The
# backward graph spells the transpose after the product, into zeros::
#
#     y   = g * sin                                     [.., rot]
#     t   = slice_scatter(zeros, -y[..., :h], -1, h, 2h)
#           + slice_scatter(zeros, y[..., h:], -1, 0, h)
#     out = t + g * cos
#
# so ``out1 = g1 * cos1 + g2 * sin2`` and ``out2 = g2 * cos2 - g1 * sin1``. Where the halves of
# cos and of sin are proven equal (HF's ``cat(f, f)`` tables: ``match_trig_source`` proves it
# before it accepts the negation), that is ``(g1 c + g2 s, g2 c - g1 s)``: the rotation by -θ,
# the op's rotation with sin negated. Every argument of every op read here is proven
# (``accepted_ops``): the zeros' size, fill value, dtype and device; each scatter's dim, start,
# end and step; the slices' columns.


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


def _sum_terms(node: Node, limit: int = 3) -> tuple[list[Node], list[Node]] | None:
    """``node`` as a sum of ``limit`` tensors through ``add`` nodes (``alpha`` 1, any
    association: HF's ``(s1 + s2) + p``, litgpt's ``(p + s1) + s2``): (terms, the adds), or
    None."""
    terms, adds, stack = [], [], [node]
    while stack:
        n = stack.pop()
        if op_of(n) is aten.add.Tensor and len(n.args) == 2 and all(
                isinstance(a, Node) for a in n.args):
            adds.append(n)
            stack.extend(n.args[::-1])
        else:
            terms.append(n)
        if len(terms) + len(stack) > limit:
            return None
    return (terms, adds) if len(terms) == limit else None


def _match_rotate_half_transposed(node: Node):
    """``node`` = ``g * cos + rotate_half^T(g * sin)`` (the backward of HF's ``rotate_half``
    RoPE), the three terms summed in any order. Returns (g1, g2, cos table, sin table, heads dim
    of g, heads dim of the tables (None: none), nodes), read as the rotation by θ with sin
    negated; or raises NoMatch."""
    _require_arguments(node)
    found = _sum_terms(node)
    _require(found is not None, "not a sum of three tensors")
    terms, adds = found
    like = _val(node)
    scatters = [t for t in terms if op_of(t) is aten.slice_scatter.default]
    plains = [t for t in terms if t not in scatters]
    _require(len(scatters) == 2 and len(plains) == 1,
             "not a product plus rotate_half's transpose (two slice_scatters)")
    (y, a0, p0, n0), (y1, a1, p1, n1) = (_scatter_half(s, like) for s in scatters)
    half = like.shape[-1] // 2
    # cat(y2, -y1): y[..., h:] placed at [0, h), -y[..., :h] placed at [h, 2h).
    _require(y is y1 and {(a0, p0, n0), (a1, p1, n1)} == {(half, 0, False), (0, half, True)},
             "the scatters are not rotate_half's transpose cat(y2, -y1) of one y")
    sin_splits, cos_splits = _factor_splits(y), _factor_splits(plains[0])
    pairs = [(s, c) for s in sin_splits for c in cos_splits
             if s.x is c.x and s.heads_dim == c.heads_dim
             and s.table_heads_dim == c.table_heads_dim]
    _require(bool(pairs), "g * sin and g * cos do not multiply the same g on the same heads dim")
    sin_split, cos_split = pairs[0]
    g = trace_features(sin_split.x)
    _require(g.count == 2 * half, "g is not the rotated features of the sin product")
    g1 = Operand(g.levels, half, g.cast)
    g2 = Operand(tuple((n, start + half * step, step) for n, start, step in g.levels), half,
                 g.cast)
    nodes = [*adds, plains[0], y, *scatters, *(s.args[1] for s in scatters),
             *(s.args[1].args[0] for s in scatters if op_of(s.args[1]) is aten.neg.default)]
    return (g1, g2, cos_split.table, sin_split.table, cos_split.heads_dim,
            cos_split.table_heads_dim, nodes)


def _even_pair_slice(node: Node) -> bool:
    """``node`` takes columns ``[2j, 2k)`` of its source's last dim (so whole (2i, 2i+1) pairs)."""
    sliced = _last_dim_range(node)
    if sliced is None or op_of(node) is not aten.slice.Tensor or sliced[1] % 2 or sliced[2] != 1:
        return False
    return _val(node).shape[-1] % 2 == 0


def _pairwise_duplicated(table: Node) -> Node:
    """Prove ``table[..., 2i] == table[..., 2i + 1]``: an elementwise function (cos/sin, scalar
    scale, casts) or a row/pair pick of ``f`` duplicated as ``(.., n/2, 2)`` and merged into the
    last dim only (``repeat_interleave(f, 2, dim=-1)``). Returns the view that duplicates."""
    node = table
    while True:
        if _float_cast(node) or op_of(node) in (aten.clone.default, aten.cos.default,
                                                 aten.sin.default) or (
                op_of(node) in _ELEMENTWISE_SCALE and isinstance(node.args[0], Node)
                and _is_scalar(node.args[1])) or _keeps_rows(node) or _even_pair_slice(node):
            node = node.args[0]
        else:
            break
    _require(node.op == "call_function", "cos/sin table is a graph input (a buffer computed "
             "outside the graph): its equal pairs of columns cannot be proven")
    why = ("cos/sin columns 2i and 2i+1 are not proven equal (the table is not f duplicated "
           "as (.., n/2, 2) on the last dim, as repeat_interleave(f, 2, -1))")
    _require(op_of(node) in _VIEW_TARGETS and isinstance(node.args[0], Node), why)
    inner = node.args[0]
    if op_of(inner) is aten.clone.default:
        inner = inner.args[0]
    _require(isinstance(inner, Node) and op_of(inner) is aten.expand.default, why)
    unsq = inner.args[0]
    unsq_val, exp_val, out_val = _val(unsq), _val(inner), _val(node)
    _require(isinstance(unsq, Node) and op_of(unsq) is aten.unsqueeze.default
             and None not in (unsq_val, exp_val, out_val) and unsq_val.dim() >= 2
             and unsq.args[1] % unsq_val.dim() == unsq_val.dim() - 1
             and statically_equal(unsq_val.shape[-1], 1)
             and statically_equal(exp_val.shape[-1], 2), why)
    # Exactly the (n/2, 2) pair merges into the last dim (another merged dim duplicates rows).
    _require(out_val.dim() == exp_val.dim() - 1 and all(
        statically_equal(a, b) for a, b in zip(out_val.shape[:-1], exp_val.shape[:-2],
                                                strict=True))
             and statically_equal(out_val.shape[-1], 2 * exp_val.shape[-2]), why)
    return node


def _table_heads_dim(table: Node, x_val) -> int:
    """The dim of a cos/sin factor (x's rank) that broadcasts over heads: the one non-last dim
    an ``unsqueeze`` adds, found through ops that keep the other dims' positions (elementwise
    ops, casts, last-dim slices, a last-dim pair duplication)."""
    val = _val(table)
    _require(val is not None and val.dim() == x_val.dim() and statically_equal(
        val.shape[-1], x_val.shape[-1]), "cos/sin table does not line up with x")
    node = table
    while isinstance(node, Node) and _val(node) is not None and _val(node).dim() == val.dim():
        if op_of(node) is aten.unsqueeze.default:
            dim = node.args[1] % val.dim()
            _require(dim != val.dim() - 1 and statically_equal(val.shape[dim], 1),
                     "cos/sin table is unsqueezed on its last dim")
            return dim
        if (_float_cast(node) or op_of(node) in (aten.clone.default, aten.cos.default,
                                                  aten.sin.default)
                or (op_of(node) in _ELEMENTWISE_SCALE and _is_scalar(node.args[1]))
                or _last_dim_range(node) is not None):
            node = node.args[0]
        elif op_of(node) in _VIEW_TARGETS and isinstance(node.args[0], Node):
            # The duplication view(expand(unsqueeze(f, -1))): back to f, same rank.
            inner = node.args[0]
            if op_of(inner) is aten.clone.default:
                inner = inner.args[0]
            if op_of(inner) is not aten.expand.default or (
                    op_of(inner.args[0]) is not aten.unsqueeze.default):
                break
            node = inner.args[0].args[0]
        else:
            break
    raise NoMatch("cos/sin table is not unsqueezed on a heads dim")


def _match_rotate_every_two(node: Node):
    """HF Cohere / GLM / GPT-J: ``x * cos + rotate_every_two(x) * sin`` with
    ``rotate_every_two(x) = stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` (GPT-J pairs;
    RoPE only when cos/sin columns 2i and 2i+1 are equal, proven in step 3)."""
    _require_arguments(node)
    _require(len(node.args) == 2 and all(isinstance(a, Node) for a in node.args),
             "not a plain sum of tensors")
    for plain, rotated in (node.args, node.args[::-1]):
        if op_of(plain) not in _MULS or op_of(rotated) not in _MULS or not all(
                isinstance(a, Node) for a in (*plain.args, *rotated.args)):
            continue
        for rh, sin_table in (rotated.args, rotated.args[::-1]):
            if op_of(rh) not in _VIEW_TARGETS:
                continue
            try:
                neg_x2, x1_node, _, rh_nodes = _rotated_halves(rh)
            except NoMatch:
                continue
            if op_of(neg_x2) is not aten.neg.default:
                continue
            x1, x2 = trace_features(x1_node), trace_features(neg_x2.args[0])
            for x_node, cos_table in (plain.args, plain.args[::-1]):
                x = trace_features(x_node)
                if x.count != 2 * x1.count or not any(
                        x.at(n) is not None and x.at(n)[1] == 1
                        and x1.at(n) == (x.at(n)[0], 2) and x2.at(n) == (x.at(n)[0] + 1, 2)
                        for n, _, _ in x.levels):
                    continue
                x_val = _val(x_node)
                heads_dim = _table_heads_dim(cos_table, x_val)
                _require(_table_heads_dim(sin_table, x_val) == heads_dim,
                         "cos and sin broadcast on different dims")
                nodes = [node, plain, rotated, *rh_nodes, neg_x2]
                return x1, x2, cos_table, sin_table, heads_dim, nodes
    raise NoMatch("sum is not x * cos + rotate_every_two(x) * sin")


def _rotated_halves(node: Node):
    """Split a rotated block into its (o1, o2, is_neox) or raise NoMatch."""
    if op_of(node) in _VIEW_TARGETS:
        # GPT-J: stack((o1, o2), -1).flatten(-2) == view(cat((o1[..., None], o2[..., None])))
        inner = node.args[0]
        _require(isinstance(inner, Node) and op_of(inner) is aten.cat.default,
                 "view of something other than a stack")
        parts, dim = inner.args[0], inner.args[1] if len(inner.args) > 1 else 0
        _require(len(parts) == 2 and _last_dim(inner, dim), "not a stack of two halves")
        halves = []
        for part in parts:
            _require(op_of(part) is aten.unsqueeze.default
                     and part.args[1] in (-1, _val(part).dim() - 1),
                     "stacked halves are not unsqueezed on the last dim")
            halves.append(part.args[0])
        out_val, in_val = _val(node), _val(inner)
        _require(out_val.dim() == in_val.dim() - 1 and all(
            statically_equal(a, b) for a, b in zip(out_val.shape[:-1], in_val.shape[:-2],
                                                    strict=True)),
                 "stack is not flattened back")
        return halves[0], halves[1], False, [node, inner, *parts]
    if node.target is aten.stack.default:
        raise NoMatch("unflattened stack")
    _require(op_of(node) is aten.cat.default, f"not a cat ({node.target})")
    parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    _require(len(parts) == 2 and _last_dim(node, dim), "not a cat of two halves on the last dim")
    return parts[0], parts[1], True, [node]


@dataclass
class RotatedBlock:
    """Step 1's result: ``x1``/``x2`` rotated by the factors ``cos``/``sin`` (``TrigOperand``,
    ``PairTrig`` or an HF table node), optionally followed by a pass-through ``tail``."""

    x1: Operand
    x2: Operand
    cos: object
    sin: object
    is_neox: bool
    heads_dim: int
    tail: Operand | None
    nodes: list[Node]
    # HF tables already shaped to broadcast over heads (no unsqueeze in the graph): their
    # size-1 dim that lines up with x's heads (None: the tables are [..tokens.., n]).
    table_heads_dim: int | None = None
    # The rotation by -θ (nanochat's sign convention): the rotation by θ with sin negated.
    negate_sin: bool = False


def match_rotated_block(candidate: Node) -> RotatedBlock:
    """Step 1: the arithmetic. ``candidate`` is the rotated block itself (full rotary) or
    ``cat((rotated, x[..., rot:]), -1)`` (partial rotary), optionally cast back to x's dtype."""
    out_val = _val(candidate)
    _require(out_val is not None and out_val.dim() in (3, 4), "not a 3-D or 4-D tensor")
    node = candidate
    nodes = []
    if _float_cast(node):
        nodes.append(node)
        node = node.args[0]
    tail = None
    if op_of(node) is aten.cat.default and len(node.args[0]) == 2:
        first, second = node.args[0]
        if op_of(second) is aten.slice.Tensor or (_float_cast(second)):
            # Partial rotary: cat((rotated, x[..., rot:]), -1).
            _require(_last_dim(node, node.args[1] if len(node.args) > 1 else 0),
                     "partial-rotary cat is not on the last dim")
            tail = trace_features(second)
            nodes.append(node)
            node = first
    if node.target in _ADDS:  # a sum with alpha != 1 is a miss for that reason
        try:
            x1, x2, cos, sin, heads_dim, table_heads, block_nodes = _match_rotate_half(node)
            return RotatedBlock(x1, x2, cos, sin, True, heads_dim, tail, nodes + block_nodes,
                                table_heads)
        except NoMatch as why:
            try:
                x1, x2, cos, sin, heads_dim, block_nodes = _match_rotate_every_two(node)
            except NoMatch:
                # The backward of rotate_half RoPE: the rotation by -θ.
                try:
                    found = _match_rotate_half_transposed(node)
                except NoMatch:
                    raise why from None
                x1, x2, cos, sin, heads_dim, table_heads, block_nodes = found
                return RotatedBlock(x1, x2, cos, sin, True, heads_dim, tail,
                                    nodes + block_nodes, table_heads, negate_sin=True)
        return RotatedBlock(x1, x2, cos, sin, False, heads_dim, tail, nodes + block_nodes)
    if op_of(node) in _VIEW_TARGETS and isinstance(node.args[0], Node) and (
            op_of(node.args[0]) is aten.view_as_real.default):
        x1, x2, trig, heads_dim, block_nodes = _match_complex_rotation(node)
        return RotatedBlock(x1, x2, trig, trig, False, heads_dim, tail, nodes + block_nodes)
    o1, o2, is_neox, block_nodes = _rotated_halves(node)
    x1, x2, cos, sin, negated = _match_rotation(o1, o2, _val(node).shape[0])
    nodes += [*block_nodes, o1, o2, *o1.args, *o2.args]
    nodes += [a for p in (*o1.args, *o2.args) for a in p.args
              if isinstance(a, Node) and op_of(a) is aten.neg.default]
    heads_dim = 1
    if isinstance(cos, PairTrig):
        f_shape = _val(cos.factor).shape
        heads_dim = max(d for d in range(len(f_shape) - 1) if statically_equal(f_shape[d], 1))
    if isinstance(cos, HalfTrig):
        _require(isinstance(sin, HalfTrig) and (sin.heads_dim, sin.table_heads_dim) == (
            cos.heads_dim, cos.table_heads_dim), "cos and sin broadcast on different dims")
        heads_dim = cos.heads_dim
    return RotatedBlock(x1, x2, cos, sin, is_neox, heads_dim, tail, nodes,
                        negate_sin=negated)


def match_head_base(block: RotatedBlock, dtype: torch.dtype | None = None) -> Node:
    """Step 2: the head ``x``, the level of slicing where x1, x2 (and the pass-through tail)
    tile ``[0, head_size)``; of such levels (a cast and its source), the first of ``dtype``
    (the output's: eager rotates the cast values), else the first."""
    half = block.x1.count
    rot = 2 * half
    _require(block.x2.count == half, "x1 and x2 have different sizes")
    why = "x1 and x2 come from different tensors"
    other_dtype = None
    deinterleaved = False
    for node, _, _ in block.x1.levels:
        starts = (block.x1.at(node), block.x2.at(node))
        val = _val(node)
        if None in starts or val is None or val.dim() not in (3, 4):
            continue
        width = val.shape[-1]
        pattern = ((0, 1), (half, 1)) if block.is_neox else ((0, 2), (1, 2))
        if starts != pattern:
            why = ("neox halves are not x[..., :rot/2] and x[..., rot/2:rot]" if block.is_neox
                   else "GPT-J pairs are not x[..., 0:rot:2] and x[..., 1:rot:2]")
            # GPT-J pairs in, neox halves out (cat of the rotated pairs' two parts): the
            # de-interleaving RoPE, a kernel style of its own (the op writes what it reads).
            deinterleaved |= block.is_neox and starts == ((0, 2), (1, 2))
            continue
        tail = block.tail
        if rot < width and not (tail is not None and tail.at(node) == (rot, 1)
                                and tail.count == width - rot):
            why = "partial rotary without x[..., rot:] passed through"
            continue
        if rot == width and tail is not None:
            why = "extra features concatenated to a full rotation"
            continue
        if rot > width:
            continue
        if dtype is not None and val.dtype != dtype:
            other_dtype = other_dtype or node
            continue
        return node
    if other_dtype is not None:
        return other_dtype
    raise NoMatch(DEINTERLEAVE_REASON if deinterleaved else why)


def match_trig_source(block: RotatedBlock, base: Node) -> TrigSource:
    """Step 3: where cos/sin come from, proven to be what the op reads."""
    half = block.x1.count
    rot = 2 * half
    cos, sin = block.cos, block.sin
    base_val = _val(base)
    if block.negate_sin and not isinstance(cos, HalfTrig) and not (
            block.is_neox and isinstance(cos, Node) and isinstance(sin, Node)):
        raise NoMatch("a rotation by -θ (x1*cos + x2*sin, x2*cos - x1*sin) is fused from "
                      "half-width cos/sin tables and HF rotate_half tables only")
    if isinstance(cos, TrigOperand):
        _require(isinstance(sin, TrigOperand), "cos and sin come in different forms")
        _require(base_val.dim() == 3, "gathered cos/sin need x as [T, H, D]")
        _require(cos.cache is sin.cache, "cos and sin come from different caches")
        _require(cos.positions is sin.positions, "cos and sin use different positions")
        _require(cos.wrap_negative == sin.wrap_negative, "cos and sin gather rows with "
                 "different index rules (index and index_select / embedding)")
        _require(cos.sections == sin.sections and cos.interleaved == sin.interleaved,
                 "cos and sin use different mrope sections")
        _require(cos.sections is None or sum(cos.sections) == half,
                 "mrope sections do not sum to rotary_dim/2")
        _require((cos.start, cos.count, sin.start, sin.count) == (0, half, half, half),
                 "cos/sin are not the two halves of a [max_position, rot] cos_sin_cache")
        _require(_val(cos.cache).shape[-1] == rot, "cos_sin_cache width differs from rotary_dim")
        return GatheredCache(cos.cache, cos.positions, cos.wrap_negative, cos.sections,
                             cos.interleaved)
    if isinstance(cos, HalfTrig):
        _require(isinstance(sin, HalfTrig), "cos and sin come in different forms")
        source = HalfWidthTables(cos.table, sin.table, cos.table_heads_dim, block.negate_sin)
    elif isinstance(cos, ComplexTrig):
        source = ComplexTables(cos.factor, cos.factor, block.heads_dim)
    elif isinstance(cos, PairTrig):
        _require(isinstance(sin, PairTrig) and cos.rows is sin.rows
                 and (cos.index, sin.index) == (0, 1), "cos/sin are not the (cos, sin) pairs "
                 "of one gathered freqs_cis")
        source = PairTables(cos.factor, sin.factor, cos.rows)
    elif not block.is_neox:
        # rotate_every_two multiplies x[..., 2i+1] by sin[..., 2i] and x[..., 2i] by
        # sin[..., 2i+1]: one cos/sin per pair when each pair of columns is equal, else the
        # op reads every column (full tables: exactly the same formula).
        try:
            _pairwise_duplicated(cos)
            _pairwise_duplicated(sin)
            source = PairwiseTables(cos, sin, block.heads_dim)
        except NoMatch as why:
            source = FullTables(cos, sin, block.heads_dim, str(why))
    else:
        # rotate_half multiplies x[..., rot/2:] by sin[..., :rot/2] and x[..., :rot/2] by
        # sin[..., rot/2:]: one cos/sin per pair when the halves are equal, else full tables.
        # The backward (negate_sin): -θ with equal halves, else the adjoint map; no mRoPE.
        heads = block.table_heads_dim
        source = None
        if heads is None and not block.negate_sin:
            source = _mrope_source(cos, sin, rot)
        if source is None:
            try:
                _duplicated_halves(cos)
                _duplicated_halves(sin)
                source = HalfTables(cos, sin, heads, negate_sin=block.negate_sin)
            except NoMatch as why:
                source = FullTables(cos, sin, heads, str(why), adjoint_sin=block.negate_sin)
    heads = block.heads_dim if isinstance(source, PairTables) else source.table_heads_dim
    token_shape = [n for d, n in enumerate(base_val.shape[:-1]) if d != block.heads_dim]
    for table in (source.cos, source.sin):
        shape = list(_val(table).shape)
        width = half if isinstance(source, (PairTables, ComplexTables, HalfWidthTables)) else rot
        if isinstance(source, SectionedTables):
            width = shape[-1]  # rot/2 or rot, proven by _mrope_table
            del shape[0]  # the 3 streams
        if heads is not None:
            del shape[heads]
        # A lower-rank table broadcasts from the right; each token dim of the table matches
        # x's or broadcasts (1, e.g. over the batch).
        _require(0 < len(shape) <= len(token_shape) + 1,
                 "cos/sin tables are not [..tokens.., rotary_dim] for x's tokens")
        shape = [1] * (len(token_shape) + 1 - len(shape)) + shape
        _require(shape[-1] == width and all(
            statically_equal(a, b) or statically_equal(a, 1)
            for a, b in zip(shape[:-1], token_shape, strict=True)),
            "cos/sin tables are not [..tokens.., rotary_dim] for x's tokens")
    return source


def _stream_chunk(node: Node) -> tuple[Node, int, int, int] | None:
    """``node`` = ``select(t[..., start:start + width], 0, stream)`` (or the select first):
    returns (t, stream, start, width)."""
    if op_of(node) is aten.select.int and node.args[1] == 0 and isinstance(node.args[0], Node):
        sliced = _last_dim_range(node.args[0])
        if sliced is None or sliced[2] != 1:
            return None
        src, stream, start = sliced[0], node.args[2], sliced[1]
    else:
        sliced = _last_dim_range(node)
        if sliced is None or sliced[2] != 1:
            return None
        picked = sliced[0]
        if op_of(picked) is not aten.select.int or picked.args[1] != 0:
            return None
        src, stream, start = picked.args[0], picked.args[2], sliced[1]
    val, src_val = _val(node), _val(src)
    if val is None or src_val is None or src_val.dim() != val.dim() + 1 or not isinstance(
            val.shape[-1], int) or not statically_equal(src_val.shape[0], 3):
        return None
    return src, stream, start, val.shape[-1]


def _assembled_streams(node: Node) -> tuple[Node, tuple[int, ...]] | None:
    """``node`` = ``cat([m[i % 3] for i, m in enumerate(t.split(sizes, -1))], -1)`` with t
    ``[3, .., n]``, every column of t taken once, in order: (t, sizes), else None."""
    if op_of(node) is not aten.cat.default or not _last_dim(
            node, node.args[1] if len(node.args) > 1 else 0):
        return None
    chunks = [_stream_chunk(part) if isinstance(part, Node) else None for part in node.args[0]]
    if not chunks or None in chunks or len({id(c[0]) for c in chunks}) != 1:
        return None
    streams, offset = chunks[0][0], 0
    for i, (_, stream, start, width) in enumerate(chunks):
        if stream != i % 3 or start != offset:
            return None
        offset += width
    if not statically_equal(_val(streams).shape[-1], offset):
        return None
    return streams, tuple(c[3] for c in chunks)


def _mrope_table(table: Node, rot: int) -> tuple[Node, tuple[int, int, int], bool] | None:
    """mRoPE (HF Qwen2-VL): ``table`` (through casts) is assembled from 3 position streams
    ``t`` by sections. Either ``cat((g, g), -1)`` with g assembled by ``sections`` from t
    ``[3, .., rot/2]`` (transformers 5) or assembled by ``sections * 2`` from t
    ``[3, .., rot]`` (``apply_multimodal_rotary_pos_emb``). Returns (t, sections, whether the
    op must read all rot columns of t), or None."""
    node = table
    while _float_cast(node) or op_of(node) is aten.clone.default:
        node = node.args[0]
    try:
        half = _duplication_of(node)
    except NoMatch:
        half = None
    if half is not None:
        found = _assembled_streams(half)
        if found is None or len(found[1]) != 3 or sum(found[1]) * 2 != rot:
            return None
        return found[0], found[1], False
    found = _assembled_streams(node)
    if found is None:
        return None
    streams, sizes = found
    if len(sizes) != 6 or sizes[:3] != sizes[3:] or sum(sizes) != rot:
        return None
    try:  # equal halves of every stream: the op reads rot/2 columns of t
        _duplicated_halves(streams)
        return streams, sizes[:3], False
    except NoMatch:
        return streams, sizes[:3], True


def _mrope_source(cos: Node, sin: Node, rot: int) -> SectionedTables | None:
    found = _mrope_table(cos, rot), _mrope_table(sin, rot)
    if None in found or found[0][1:] != found[1][1:]:
        return None
    (cos_streams, sections, full), (sin_streams, _, _) = found
    return SectionedTables(cos_streams, sin_streams, sections, full)


def match_rope(candidate: Node) -> RopeMatch:
    """Prove that ``candidate`` is RoPE of some tensor, or raise NoMatch: the rotated block,
    the head it rotates, and where its cos/sin come from."""
    block = match_rotated_block(candidate)
    try:
        base = match_head_base(block, _val(candidate).dtype)
        trig = match_trig_source(block, base)
    except NearMiss:
        raise
    except NoMatch as why:
        raise NearMiss(str(why)) from None
    out_val, base_val = _val(candidate), _val(base)
    head_size = base_val.shape[-1]
    _require(isinstance(head_size, int), "head size is symbolic")
    _require(out_val.dtype == base_val.dtype, f"RoPE output dtype {out_val.dtype} differs from "
                                              f"input dtype {base_val.dtype}")
    _require(out_val.dim() == base_val.dim() and all(
        statically_equal(a, b) for a, b in zip(out_val.shape, base_val.shape, strict=True)),
        "RoPE output shape differs from the input's")
    if base_val.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise NearMiss(f"dtype {base_val.dtype} not supported by the fused op")
    return RopeMatch(base, candidate, trig, 2 * block.x1.count, head_size, block.is_neox,
                     block.heads_dim, block.nodes)


def enclosing_head_size(match: RopeMatch) -> int:
    """The last dim of the tensor ``match.base`` is a contiguous last-dim slice of (itself if
    it is none): the head an axial RoPE rotates one part of (``q[..., 64:]`` of a 128 head)."""
    node = match.base
    while isinstance(node, Node):
        sliced = _last_dim_range(node)
        if sliced is None or sliced[2] != 1:
            break
        node = sliced[0]
    val = _val(node)
    return val.shape[-1] if val is not None else match.head_size
