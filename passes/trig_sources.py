"""Where a proven RoPE takes its cos/sin from: one small type per form.

Each type owns what differs between the forms:

* ``pairing_key()``: what q and k must share to be rotated by one call;
* ``describe_difference(other)``: why two matches with different keys cannot pair;
* ``reads()``: the graph nodes the fused call will read (for the disjointness proof);
* ``materialise(tx, after, ...)``: the ``(cos_sin_cache, positions)`` nodes the op needs.

=================  ======================================  ===================================
form               graph                                   materialised as
=================  ======================================  ===================================
GatheredCache      ``cache[positions]`` halves (sglang)    the cache and positions themselves
HalfTables         HF ``cos``/``sin`` ``[..tokens.., rot]``  ``cat(cos[..., :rot/2],
                   with proven equal halves                sin[..., :rot/2])`` as ``[T, rot]``,
                                                           ``positions = arange(T)``
PairTables         gpt-fast ``freqs_cis[input_pos]``       ``cat(cos, sin)`` of the picked
                   (cos, sin) pairs                        pairs as ``[T, rot]``, ``arange(T)``
=================  ======================================  ===================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx_surgery import GraphTransaction

aten = torch.ops.aten


@dataclass(frozen=True)
class GatheredCache:
    """cos/sin are the two halves of ``cache[positions]`` (``cache`` ``[max_position, rot]``)."""

    cache: Node
    positions: Node

    table_form = False

    def pairing_key(self):
        return ("gathered", self.cache, self.positions)

    def describe_difference(self, other) -> str:
        if not isinstance(other, GatheredCache):
            return "q and k take cos/sin in different forms"
        if self.positions is not other.positions:
            return "q and k use different positions"
        return "q and k use different cos_sin_caches"

    def reads(self) -> tuple[Node, ...]:
        return (self.cache, self.positions)

    def materialise(self, tx: GraphTransaction, after: Node, rotary_dim: int, heads_dim: int,
                    table_shape) -> tuple[Node, Node, Node]:
        return after, self.cache, self.positions


@dataclass(frozen=True)
class _PerTokenTables:
    """Per-token cos and sin tables, which the op takes as a ``[T, rot]`` cache read at
    ``arange(T)``."""

    cos: Node
    sin: Node

    table_form = True

    def reads(self) -> tuple[Node, ...]:
        return (self.cos, self.sin)

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
    proved equal (``cos(cat(f, f))``)."""

    def pairing_key(self):
        return ("half tables", self.cos, self.sin)

    def describe_difference(self, other) -> str:
        if not isinstance(other, HalfTables):
            return "q and k take cos/sin in different forms"
        if self.sin is not other.sin:
            return "q and k use different sin tables"
        return "q and k use different cos tables"

    def _halves(self, tx, after, rotary_dim, heads_dim):
        half = rotary_dim // 2  # the halves are equal: keep the first
        cos_half = tx.add(after, aten.slice.Tensor, (self.cos, -1, 0, half))
        sin_half = tx.add(cos_half, aten.slice.Tensor, (self.sin, -1, 0, half))
        return cos_half, sin_half


@dataclass(frozen=True)
class PairTables(_PerTokenTables):
    """gpt-fast / torchtune: ``cos``/``sin`` are the ``[.., 1 (heads), .., rot/2]`` picks of
    gathered ``(cos, sin)`` pair rows ``rows``; q and k pick them separately, so the key is the
    rows, not the picks."""

    rows: Node | None = None

    def pairing_key(self):
        return ("pair tables", self.rows)

    def describe_difference(self, other) -> str:
        if not isinstance(other, PairTables):
            return "q and k take cos/sin in different forms"
        return "q and k use different freqs_cis rows"

    def _halves(self, tx, after, rotary_dim, heads_dim):
        cos_half = tx.add(after, aten.squeeze.dim, (self.cos, heads_dim))
        sin_half = tx.add(cos_half, aten.squeeze.dim, (self.sin, heads_dim))
        return cos_half, sin_half


TrigSource = GatheredCache | HalfTables | PairTables
