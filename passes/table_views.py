"""Read a model's own per-token cos/sin tables in place: the views the tables op takes.

A table-form RoPE (HF ``rotate_half`` / ``rotate_every_two``, gpt-fast / torchtune pair picks)
has no ``cos_sin_cache`` and no positions in the graph. Instead of building a ``[T, rot]`` cache
and ``arange(T)`` (two kernels per forward), the pass hands the model's tables to
``rope_compile::fused_qk_rope_with_cos_sin_tables_inplace`` as ``[R, rot/2]`` views, token ``t``
reading row ``t % R``::

    before (HF, x [B, H, S, D], cos [B', S, rot] with equal halves, B' = 1 or B):
        cos_sin_cache = reshape(expand(cat(cos[..., :rot/2], sin[..., :rot/2])), [T, rot])
        positions     = iota(T)
        fused_qk_rope_with_cos_sin_cache_inplace(q, k, cos_sin_cache, positions, rot, neox)
    after:
        cos_rows = reshape(slice(cos, -1, start, start + step * rot/2, step), [R, rot/2])
        sin_rows = ... the same for sin
        fused_qk_rope_with_cos_sin_tables_inplace(q, k, cos_rows, sin_rows, rot, neox)

Valid when the flattened token index of x, ``t``, and the table row agree modulo ``R``: the
table's token dims are x's trailing token dims, with size 1 (broadcast) before them. Otherwise
(a table broadcast in the middle, e.g. ``[B, 1]``) there is no such view and the pass builds the
cache as before. The reshape is a view wherever the table's rows are evenly strided (every
table seen in model code); where they are not, Inductor copies the table, which is still right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fx_surgery import GraphTransaction

aten = torch.ops.aten


def _equal(a, b) -> bool:
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


@dataclass(frozen=True)
class TableRows:
    """How to read one table as ``[R, rot/2]``: ``node`` (its heads dim ``heads_dim`` of size 1
    squeezed away, when not None), then columns ``start::step`` (``rot/2`` of them), then
    ``[-1, rot/2]`` (the leading broadcast dims are 1)."""

    node: Node
    start: int
    step: int
    heads_dim: int | None

    def fake(self, half: int) -> torch.Tensor:
        val = self.node.meta["val"]
        if self.heads_dim is not None:
            val = val.squeeze(self.heads_dim)
        val = val[..., self.start:self.start + self.step * half:self.step]
        return val.reshape(-1, half)

    def build(self, tx: GraphTransaction, after: Node, half: int) -> Node:
        node = self.node
        if self.heads_dim is not None:
            node = after = tx.add(after, aten.squeeze.dim, (node, self.heads_dim))
        node = tx.add(after, aten.slice.Tensor,
                      (node, -1, self.start, self.start + self.step * half, self.step))
        return tx.add(node, aten.reshape.default, (node, [-1, half]))


def table_rows(table: tuple[Node, int, int], heads_dim: int | None, token_shape,
               half: int) -> tuple[TableRows | None, str]:
    """The ``[R, rot/2]`` reading of ``table`` = ``(node, column start, column step)`` for x's
    token dims ``token_shape`` (x's dims but heads and features, outermost first), or (None, why
    not)."""
    node, start, step = table
    val = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(val, torch.Tensor):
        return None, "the cos/sin table has no tensor value"
    shape = list(val.shape)
    if heads_dim is not None:
        if not _equal(shape[heads_dim], 1):
            return None, "the cos/sin table is not broadcast over heads"
        del shape[heads_dim]
    if len(shape) != len(token_shape) + 1:
        return None, "the cos/sin table's token dims differ from x's"
    if not _equal(shape[-1], start + step * (half - 1) + 1) and not statically_known_true(
            shape[-1] >= start + step * (half - 1) + 1):
        return None, "the cos/sin table is narrower than rotary_dim"
    # Leading dims of size 1 broadcast; from the first that is not 1 (for x), sizes agree.
    dims = list(zip(shape[:-1], token_shape, strict=True))
    first = 0
    while first < len(dims) and _equal(dims[first][0], 1):
        first += 1
    if not all(_equal(a, b) for a, b in dims[first:]):
        return None, ("the cos/sin table broadcasts over a token dim inside others "
                      "(no row = t % R reading)")
    return TableRows(node, start, step, heads_dim), ""
