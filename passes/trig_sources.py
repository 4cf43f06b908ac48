"""Where a proven RoPE takes its cos/sin from: one small type per form.

Each type owns what differs between the forms:

* ``pairing_key()``: what q and k must share to be rotated by one call;
* ``describe_difference(other)``: why two matches with different keys cannot pair;
* ``reads()``: the graph nodes the fused call will read (for the disjointness proof);
* ``materialise(tx, after, ...)``: the ``(cos_sin_cache, positions)`` nodes the op needs.

=================  ======================================  ===================================
form               graph                                   materialised as
=================  ======================================  ===================================
GatheredCache      ``cache[positions]`` halves (sglang),   the cache and positions themselves
                   or their mRoPE sections (positions      (the mRoPE cache op with
                   ``[3, T]``, sglang's MRotaryEmbedding)  ``mrope_section``)
HalfTables         HF ``cos``/``sin`` ``[..tokens.., rot]``  ``cat(cos[..., :rot/2],
                   with proven equal halves                sin[..., :rot/2])`` as ``[T, rot]``,
                                                           ``positions = arange(T)``
PairTables         gpt-fast ``freqs_cis[input_pos]``       ``cat(cos, sin)`` of the picked
                   (cos, sin) pairs                        pairs as ``[T, rot]``, ``arange(T)``
PairwiseTables     HF ``rotate_every_two`` (Cohere, GLM,   ``cat(cos[..., ::2], sin[..., ::2])``
                   GPT-J): ``cos``/``sin`` with proven     as ``[T, rot]``, ``arange(T)``
                   equal columns 2i, 2i+1 (heads dim kept)
ComplexTables      Meta Llama / torchtitan complex         ``cat(real, imag)`` of
                   ``freqs_cis`` times view_as_complex(x)  ``view_as_real(freqs_cis)``,
                                                           ``arange(T)``
HalfWidthTables    nanochat: half-width ``cos``/``sin``    ``cat(cos, sin)`` (``-sin`` for the
                   ``[..tokens.., rot/2]`` times x's       rotation by -θ) as ``[T, rot]``,
                   halves, either sign convention          ``arange(T)``
=================  ======================================  ===================================

FullTables         HF ``rotate_half`` / ``rotate_every_two``  nothing: no ``[T, rot]`` cache can
                   with cos/sin NOT proven to have equal   hold them (the tables op reads all
                   halves / pairs (graph inputs: litgpt,   ``rot`` columns, ``[R, rot]`` rows)
                   dynamic NTK; any table)
SectionedTables    mRoPE (Qwen2-VL): the table assembled   nothing (the tables op reads the
                   from ``[3, ..tokens.., n]`` streams by  ``[3, R, n]`` streams with
                   sections (``m[i % 3]`` per chunk)       ``mrope_section``)
=================  ======================================  ===================================

Every per-token form also says where the model's own tables hold the values the tables op
reads for each token: ``table_width(rot)`` columns, ``rot/2`` (one cos/sin per pair, when equal
halves or pairs are proven, or the pair forms) or ``rot`` (``FullTables``: the op then computes
``x_a*cos[a] - x_b*sin[a]``, ``x_b*cos[b] + x_a*sin[b]`` for each pair's columns (a, b), HF's
formula for any cos/sin). ``cos_view`` and ``sin_view`` are ``TableView(node, start, step,
part)``, the values being ``node[..., start::step][..., :width]`` (of ``view_as_real(node)[...,
part]`` for a complex ``node``); ``table_heads_dim`` is the size-1 dim of those nodes that
broadcasts over heads, or None when they are ``[..tokens.., n]`` (``PairTables``' picks keep the
heads dim of their match: ``RopeMatch.heads_dim``); ``sections`` is the mRoPE section list
(the view's node then has a leading dim of 3 streams), else None.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.fx import Node

from .fx_surgery import GraphTransaction

aten = torch.ops.aten


class TableView(NamedTuple):
    """Where a table holds what the tables op reads: ``node[..., start::step]`` (of
    ``view_as_real(node)[..., part]`` when ``part`` is not None: a complex table)."""

    node: Node | None
    start: int = 0
    step: int = 1
    part: int | None = None


@dataclass(frozen=True)
class GatheredCache:
    """cos/sin are the two halves of ``cache[positions]`` (``cache`` ``[max_position, rot]``);
    ``wrap_negative``: gathered by ``index`` (a negative position is a row from the end, the op's
    ``wrap_negative_positions``), not by ``index_select`` / ``embedding`` (it raises)."""

    cache: Node
    positions: Node
    wrap_negative: bool = False
    # mRoPE (sglang's MRotaryEmbedding): positions [3, T], pair column i read from stream s
    # by the section s it lies in; the call is the mRoPE cache op.
    sections: tuple[int, ...] | None = None
    interleaved: bool = False  # the streams interleaved by column (Qwen3-VL), not sectioned

    table_form = False

    def pairing_key(self):
        return ("gathered", self.cache, self.positions, self.wrap_negative, self.sections,
                self.interleaved)

    def describe_difference(self, other) -> str:
        if not isinstance(other, GatheredCache):
            return "q and k take cos/sin in different forms"
        if self.positions is not other.positions:
            return "q and k use different positions"
        if self.wrap_negative != other.wrap_negative:
            return "q and k gather cos/sin rows with different index rules"
        if (self.sections, self.interleaved) != (other.sections, other.interleaved):
            return "q and k use different mrope sections"
        return "q and k use different cos_sin_caches"

    def reads(self) -> tuple[Node, ...]:
        return (self.cache, self.positions)

    def materialise(self, tx: GraphTransaction, after: Node, rotary_dim: int, heads_dim: int,
                    table_shape) -> tuple[Node, Node, Node]:
        return after, self.cache, self.positions


def _first_columns(tx: GraphTransaction, after: Node, tables, width: int) -> tuple[Node, Node]:
    """``tables``' cos and sin (``HalfTables`` / ``HalfWidthTables``), their first ``width``
    columns with their size-1 heads dim squeezed, sin negated with ``negate_sin``."""
    halves, last = [], after
    for table in (tables.cos, tables.sin):
        last = tx.add(last, aten.slice.Tensor, (table, -1, 0, width))
        if tables.heads_dim is not None:
            last = tx.add(last, aten.squeeze.dim, (last, tables.heads_dim))
        halves.append(last)
    if tables.negate_sin:
        halves[1] = tx.add(halves[1], aten.neg.default, (halves[1],))
    return tuple(halves)


@dataclass(frozen=True)
class _PerTokenTables:
    """Per-token cos and sin tables, which the op takes as a ``[T, rot]`` cache read at
    ``arange(T)``."""

    cos: Node
    sin: Node

    table_form = True
    # The op reads rot/2 columns (one cos/sin per pair) unless the form says otherwise.
    full_width, sections = False, None

    def reads(self) -> tuple[Node, ...]:
        return (self.cos, self.sin)

    column_start, column_step, table_heads_dim = 0, 1, None

    def table_width(self, rotary_dim: int) -> int:
        return rotary_dim if self.full_width else rotary_dim // 2

    @property
    def cos_view(self) -> TableView:
        return TableView(self.cos, self.column_start, self.column_step)

    @property
    def sin_view(self) -> TableView:
        return TableView(self.sin, self.column_start, self.column_step)

    def _halves(self, tx, after, rotary_dim, heads_dim) -> tuple[Node, Node]:
        raise NotImplementedError

    def materialise(self, tx: GraphTransaction, after: Node, rotary_dim: int, heads_dim: int,
                    table_shape) -> tuple[Node, Node, Node]:
        """``cos_sin_cache = cat(cos_half, sin_half)`` expanded over the token dims
        (``table_shape``, graph ints) as ``[T, rot]``, and ``positions = arange(T)``.
        Returns (last node, cache, positions)."""
        cos_half, sin_half = self._halves(tx, after, rotary_dim, heads_dim)
        table = tx.add(sin_half, aten.cat.default, ([cos_half, sin_half], -1))
        table = tx.add(table, aten.expand.default, (table, list(table_shape)))
        cache = tx.add(table, aten.reshape.default, (table, [-1, rotary_dim]))
        tokens = cache.meta["val"].shape[0]
        last = cache
        if not isinstance(tokens, int):  # symbolic: read it off the table (a SymInt node)
            tokens = last = tx.add(cache, aten.sym_size.int, (cache, 0))
        positions = tx.add(last, torch.ops.prims.iota.default, (tokens,), {
            "start": 0, "step": 1, "dtype": torch.int64, "device": cache.meta["val"].device,
            "requires_grad": False})
        return positions, cache, positions


@dataclass(frozen=True)
class HalfTables(_PerTokenTables):
    """HF ``rotate_half``: ``cos``/``sin`` ``[..tokens.., rot]`` whose two halves the matcher
    proved equal (``cos(cat(f, f))``); ``heads_dim``: their size-1 dim that broadcasts over
    heads, where they come already shaped for x (None: ``[..tokens.., rot]``)."""

    heads_dim: int | None = None
    # The rotation by -θ (the backward of HF's RoPE, rope_pattern._match_rotate_half_transposed):
    # the op reads -sin.
    negate_sin: bool = False

    @property
    def table_heads_dim(self) -> int | None:
        return self.heads_dim

    def pairing_key(self):
        return ("half tables", self.cos, self.sin, self.heads_dim, self.negate_sin)

    def describe_difference(self, other) -> str:
        if not isinstance(other, HalfTables):
            return "q and k take cos/sin in different forms"
        if self.negate_sin != other.negate_sin:
            return "q and k rotate in different directions (θ and -θ)"
        if self.sin is not other.sin:
            return "q and k use different sin tables"
        return "q and k use different cos tables"

    def _halves(self, tx, after, rotary_dim, heads_dim):
        # the halves are equal: keep the first
        return _first_columns(tx, after, self, rotary_dim // 2)


@dataclass(frozen=True)
class PairTables(_PerTokenTables):
    """gpt-fast / torchtune: ``cos``/``sin`` are the ``[.., 1 (heads), .., rot/2]`` picks of
    gathered (or sliced) ``(cos, sin)`` pair rows ``rows``; q and k pick them separately (and
    torchtune gathers them separately), so the key is the picks' value, not the nodes: the call
    reads q's picks, which k's must equal (the same rows viewed with the same size, the same
    casts; the rows alone are not enough: ``view(B, 1, 1, ..)`` of them broadcasts over another
    token dim than ``view(1, S, 1, ..)``)."""

    rows: Node | None = None

    def pairing_key(self):
        return ("pair tables", value_key(self.cos), value_key(self.sin))

    def describe_difference(self, other) -> str:
        if not isinstance(other, PairTables):
            return "q and k take cos/sin in different forms"
        if value_key(self.rows) == value_key(other.rows):
            return "q and k pick cos/sin from the same freqs_cis rows differently"
        return "q and k use different freqs_cis rows"

    def _halves(self, tx, after, rotary_dim, heads_dim):
        cos_half = tx.add(after, aten.squeeze.dim, (self.cos, heads_dim))
        sin_half = tx.add(cos_half, aten.squeeze.dim, (self.sin, heads_dim))
        return cos_half, sin_half


@dataclass(frozen=True)
class HalfWidthTables(_PerTokenTables):
    """Half-width tables ``cos``/``sin`` ``[..tokens.., rot/2]`` multiplying x's halves
    directly (nanochat's ``x1 * cos + x2 * sin`` with ``[1, T, 1, rot/2]`` buffers; a
    ``[T, rot/2]`` table), already shaped to broadcast over x's heads: ``heads_dim`` is their
    size-1 dim that does (None: they have none). ``negate_sin``: the rotation by -θ (nanochat's
    sign convention, ``x1*cos + x2*sin``, ``x2*cos - x1*sin``), the rotation by θ with sin
    negated: the op reads ``-sin`` (one small elementwise kernel per forward, shared by the
    layers)."""

    heads_dim: int | None = None
    negate_sin: bool = False

    @property
    def table_heads_dim(self) -> int | None:
        return self.heads_dim

    def pairing_key(self):
        return ("half-width tables", value_key(self.cos), value_key(self.sin), self.heads_dim,
                self.negate_sin)

    def describe_difference(self, other) -> str:
        if not isinstance(other, HalfWidthTables):
            return "q and k take cos/sin in different forms"
        if self.negate_sin != other.negate_sin:
            return "q and k rotate in different directions (θ and -θ)"
        if value_key(self.sin) != value_key(other.sin):
            return "q and k use different sin tables"
        return "q and k use different cos tables"

    def _halves(self, tx, after, rotary_dim, heads_dim):
        return _first_columns(tx, after, self, rotary_dim // 2)


# Pure ops that recompute the same value from the same inputs: a table that models rebuild for
# q and for k (HF GPT-J repeats ``repeat_interleave`` in each call) is one table.
_PURE = {aten.unsqueeze.default, aten.expand.default, aten.clone.default, aten.view.default,
         aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.squeeze.dim,
         aten.select.int, aten.cos.default, aten.sin.default, aten.mul.Tensor, aten.div.Tensor,
         aten.neg.default, aten.cat.default, aten.permute.default,
         torch.ops.prims.convert_element_type.default, operator.getitem,
         aten.split.Tensor, aten.split_with_sizes.default, aten.index.Tensor,
         aten.index_select.default, aten.embedding.default, aten.view_as_real.default}


def value_key(node, depth: int = 12):
    """A key equal for two nodes that compute the same value: the same node, or the same pure
    op on arguments with equal keys (bounded depth; beyond it, the node itself)."""
    if isinstance(node, (list, tuple)):
        return tuple(value_key(a, depth) for a in node)
    if not isinstance(node, Node):
        return ("const", type(node).__name__, repr(node))
    if depth == 0 or node.op != "call_function" or node.target not in _PURE:
        return ("node", node)
    return ("op", node.target, value_key(list(node.args), depth - 1),
            tuple(sorted((k, value_key(v, depth - 1)) for k, v in node.kwargs.items())))


@dataclass(frozen=True)
class PairwiseTables(_PerTokenTables):
    """HF ``rotate_every_two`` (Cohere, GLM, GPT-J): ``cos``/``sin`` are x-ranked factors
    ``[.., 1 (heads at heads_dim), .., rot]`` whose columns 2i and 2i+1 the matcher proved
    equal (``repeat_interleave(f, 2, -1)``): GPT-J pairs rotated by ``cos[..., ::2]``."""

    heads_dim: int = 1

    column_step = 2

    @property
    def table_heads_dim(self) -> int:
        return self.heads_dim

    def pairing_key(self):
        return ("pairwise tables", value_key(self.cos), value_key(self.sin), self.heads_dim)

    def describe_difference(self, other) -> str:
        if not isinstance(other, PairwiseTables):
            return "q and k take cos/sin in different forms"
        if value_key(self.sin) != value_key(other.sin):
            return "q and k use different sin tables"
        return "q and k use different cos tables"

    def _halves(self, tx, after, rotary_dim, heads_dim):
        halves, last = [], after
        for table in (self.cos, self.sin):  # the pairs are equal: keep the even columns
            last = tx.add(last, aten.slice.Tensor, (table, -1, 0, rotary_dim, 2))
            last = tx.add(last, aten.squeeze.dim, (last, self.heads_dim))
            halves.append(last)
        return tuple(halves)


@dataclass(frozen=True)
class ComplexTables(_PerTokenTables):
    """Meta Llama / torchtitan: one complex ``freqs_cis`` factor ``[.., 1 (heads), .., rot/2]``
    (``cos`` and ``sin`` are both that node): cos is its real part, sin its imaginary part."""

    heads_dim: int = 1

    @property
    def table_heads_dim(self) -> int:
        return self.heads_dim

    # cos and sin are view_as_real(freqs_cis)[..., 0] and [..., 1]: read in place (column
    # stride 2 of the complex storage).
    @property
    def cos_view(self) -> TableView:
        return TableView(self.cos, 0, 1, 0)

    @property
    def sin_view(self) -> TableView:
        return TableView(self.cos, 0, 1, 1)

    def reads(self) -> tuple[Node, ...]:
        return (self.cos,)

    def pairing_key(self):
        return ("complex freqs_cis", value_key(self.cos), self.heads_dim)

    def describe_difference(self, other) -> str:
        if not isinstance(other, ComplexTables):
            return "q and k take cos/sin in different forms"
        return "q and k use different freqs_cis"

    def _halves(self, tx, after, rotary_dim, heads_dim):
        pairs = tx.add(after, aten.view_as_real.default, (self.cos,))
        halves, last = [], pairs
        for part in (0, 1):
            last = tx.add(last, aten.select.int, (pairs, -1, part))
            last = tx.add(last, aten.squeeze.dim, (last, self.heads_dim))
            halves.append(last)
        return tuple(halves)


@dataclass(frozen=True)
class FullTables(_PerTokenTables):
    """HF ``rotate_half`` / ``rotate_every_two`` whose cos/sin are not proven to have equal
    halves (or pairs): graph inputs (litgpt's buffers, HF dynamic NTK after its graph break) or
    any table the proof cannot follow. ``x * cos + rotate_half(x) * sin`` is still exactly what
    the tables op computes from ``[R, rot]`` rows (``x_a*cos[a] - x_b*sin[a]``,
    ``x_b*cos[b] + x_a*sin[b]``), so the op reads all ``rot`` columns. ``cos``/``sin`` are
    ``[..tokens.., rot]`` (x-ranked with a size-1 heads dim at ``heads_dim`` when not None).
    No ``[T, rot]`` cos_sin_cache can hold such tables: there is no materialised form."""

    heads_dim: int | None = None
    why: str = field(default="", compare=False)  # why equal halves were not proven (logs)
    # The backward of HF's rotate_half RoPE (rope_pattern._match_rotate_half_transposed):
    # ``g*cos + rotate_half^T(g*sin)`` is the op's full-table map with the same cos and
    # ``sin' = -cat(sin2, sin1)`` (the transpose of each pair's matrix): the op reads that.
    adjoint_sin: bool = False

    full_width = True

    @property
    def table_heads_dim(self) -> int | None:
        return self.heads_dim

    def pairing_key(self):
        return ("full tables", value_key(self.cos), value_key(self.sin), self.heads_dim,
                self.adjoint_sin)

    def describe_difference(self, other) -> str:
        if not isinstance(other, FullTables):
            return "q and k take cos/sin in different forms"
        if self.adjoint_sin != other.adjoint_sin:
            return "q and k rotate in different directions (θ and -θ)"
        if value_key(self.sin) != value_key(other.sin):
            return "q and k use different sin tables"
        return "q and k use different cos tables"

    def materialise(self, tx, after, rotary_dim, heads_dim, table_shape):
        raise NotImplementedError("full cos/sin tables have no [T, rot] cos_sin_cache form")


@dataclass(frozen=True)
class SectionedTables(_PerTokenTables):
    """mRoPE (HF Qwen2-VL / Qwen2.5-VL): the model's cos/sin table is assembled from three
    position streams, ``cat([m[i % 3] for i, m in enumerate(t.split(sizes, -1))], -1)`` with
    ``t`` = ``cos``/``sin`` ``[3, ..tokens.., n]``. The matcher proved the split sizes are
    ``sections`` (n = rot/2, the assembled half then duplicated: ``cat((g, g), -1)``) or
    ``sections * 2`` (n = rot, ``full_width``; equal per-stream halves proven make it rot/2
    of the same node), that chunk i is stream ``i % 3`` and that the chunks are concatenated
    in order: exactly what the tables op reads from ``[3, R, n]`` with ``mrope_section``."""

    mrope_section: tuple[int, int, int] = (0, 0, 0)
    full_width: bool = False

    @property
    def sections(self) -> tuple[int, int, int]:
        return self.mrope_section

    def pairing_key(self):
        return ("sectioned tables", value_key(self.cos), value_key(self.sin),
                self.mrope_section, self.full_width)

    def describe_difference(self, other) -> str:
        if not isinstance(other, SectionedTables):
            return "q and k take cos/sin in different forms"
        if self.mrope_section != other.mrope_section:
            return "q and k use different mrope sections"
        return "q and k use different cos/sin streams"

    def materialise(self, tx, after, rotary_dim, heads_dim, table_shape):
        raise NotImplementedError("mRoPE streams have no [T, rot] cos_sin_cache form")


TrigSource = (GatheredCache | HalfTables | PairTables | PairwiseTables | ComplexTables
              | HalfWidthTables | FullTables | SectionedTables)
