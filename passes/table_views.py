"""Read a model's own per-token cos/sin tables in place: the views the tables op takes.

A table-form RoPE (HF ``rotate_half`` / ``rotate_every_two``, gpt-fast / torchtune pair picks)
has no ``cos_sin_cache`` and no positions in the graph. Instead of building a ``[T, rot]`` cache
and ``arange(T)`` (two kernels per forward), the pass hands the model's tables to
``rope_compile::fused_qk_rope_with_cos_sin_tables_inplace`` as ``[R, rot/2]`` views (``[R, rot]``
for tables whose halves are not proven equal; ``[3, R, n]`` for mRoPE streams, with
``mrope_section``; complex ``freqs_cis`` as the real and imaginary parts of
``view_as_real(freqs_cis)``; ``-sin`` rows, one small kernel, for a rotation by -θ), token
``t`` reading row ``t % R``::

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

from .fx_surgery import GraphTransaction, statically_equal

aten = torch.ops.aten



@dataclass(frozen=True)
class TableRows:
    """How to read one table as ``[R, width]`` (``[3, R, width]`` with ``streams``): ``node``
    (``view_as_real(node)[..., part]`` when ``part`` is not None: a complex table), its heads
    dim ``heads_dim`` of size 1 squeezed away (when not None), then columns ``start::step``
    (``width`` of them), then ``[-1, width]`` (the leading broadcast dims are 1; with
    ``streams`` the first dim, 3 position streams, is kept: ``[3, -1, width]``)."""

    node: Node
    start: int
    step: int
    heads_dim: int | None
    width: int
    part: int | None = None
    streams: bool = False
    negate: bool = False  # the op reads -table (the rotation by -θ: sin negated)
    # the op reads cat(table[.., w/2:], table[.., :w/2]) (with negate: the adjoint sin of full
    # neox tables, each pair's matrix transposed)
    swap_halves: bool = False

    def _shape(self) -> list[int]:
        return [3, -1, self.width] if self.streams else [-1, self.width]

    def fake(self) -> torch.Tensor:
        val = self.node.meta["val"]
        if self.part is not None:
            val = torch.view_as_real(val)[..., self.part]
        if self.heads_dim is not None:
            val = val.squeeze(self.heads_dim)
        val = val[..., self.start:self.start + self.step * self.width:self.step]
        val = val.reshape(self._shape())
        if self.swap_halves:
            half = self.width // 2
            val = torch.cat((val[..., half:], val[..., :half]), -1)
        return -val if self.negate else val

    def build(self, tx: GraphTransaction, after: Node) -> Node:
        node = self.node
        if self.part is not None:
            node = after = tx.add(after, aten.view_as_real.default, (node,))
            node = after = tx.add(after, aten.select.int, (node, -1, self.part))
        if self.heads_dim is not None:
            node = after = tx.add(after, aten.squeeze.dim, (node, self.heads_dim))
        node = tx.add(after, aten.slice.Tensor,
                      (node, -1, self.start, self.start + self.step * self.width, self.step))
        node = tx.add(node, aten.reshape.default, (node, self._shape()))
        if self.swap_halves:
            half = self.width // 2
            second = tx.add(node, aten.slice.Tensor, (node, -1, half, self.width))
            first = tx.add(second, aten.slice.Tensor, (node, -1, 0, half))
            node = tx.add(first, aten.cat.default, ([second, first], -1))
        return tx.add(node, aten.neg.default, (node,)) if self.negate else node


def table_rows(table, heads_dim: int | None, token_shape, width: int,
               streams: bool = False) -> tuple[TableRows | None, str]:
    """The ``[R, width]`` reading of ``table`` (a ``TableView``: node, column start, column
    step, complex part) for x's token dims ``token_shape`` (x's dims but heads and features,
    outermost first), or (None, why not). A table of lower rank broadcasts from the right (its
    missing leading dims are 1). With ``streams`` the table's first dim holds 3 position
    streams (mRoPE) and the rest is read the same way: ``[3, R, width]``."""
    node, start, step, part = table
    val = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(val, torch.Tensor):
        return None, "the cos/sin table has no tensor value"
    if part is not None:
        if not val.is_complex():
            return None, "the cos/sin table is not complex"
        val = torch.view_as_real(val)[..., part]
    elif val.is_complex():
        return None, "the cos/sin table is complex"
    shape = list(val.shape)
    if streams:
        if not shape or not statically_equal(shape[0], 3) or heads_dim is not None:
            return None, "the mRoPE cos/sin streams are not [3, ..tokens.., n]"
        del shape[0]
    if heads_dim is not None:
        if not statically_equal(shape[heads_dim], 1):
            return None, "the cos/sin table is not broadcast over heads"
        del shape[heads_dim]
    if len(shape) > len(token_shape) + 1 or not shape:
        return None, "the cos/sin table's token dims differ from x's"
    shape = [1] * (len(token_shape) + 1 - len(shape)) + shape
    last = start + step * (width - 1) + 1
    if not statically_known_true(shape[-1] >= last):
        return None, "the cos/sin table is narrower than rotary_dim"
    # Leading dims of size 1 broadcast; from the first that is not 1 (for x), sizes agree.
    dims = list(zip(shape[:-1], token_shape, strict=True))
    first = 0
    while first < len(dims) and statically_equal(dims[first][0], 1):
        first += 1
    if not all(statically_equal(a, b) for a, b in dims[first:]):
        return None, ("the cos/sin table broadcasts over a token dim inside others "
                      "(no row = t % R reading)")
    return TableRows(node, start, step, heads_dim, width, part, streams), ""
