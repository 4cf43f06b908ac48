"""Inductor post-grad pass: extend a fused RoPE call forwards over the KV-cache write of the
rotated k and of v, into one call of the RoPE + KV-store op.

Before (sglang ``forward_native(..., fused_set_kv_buffer_arg=...)`` /
``set_kv_buffer_native``, or a hand-written ``k_cache[loc] = k``, after ``FuseQKRopePass``;
k_buffer / v_buffer are graph inputs, written functionally and copied back at the end)::

    af  = auto_functionalized_v2(rope_compile.fused_qk_rope_with_cos_sin_cache_inplace,
                                 cos_sin_cache, positions, rot, neox,
                                 _q_*=view of qkv, _k_*=view of qkv, _all_bases=[qkv])
    qkv' = af[1]
    k'  = reshape(split(qkv')[1], [T, Hk, D])             # the rotated k (views only)
    v   = reshape(split(qkv')[2], [T, Hk, Dv])
    kb' = index_put(k_buffer, [loc], convert(div(convert(k', f32), k_scale), kb.dtype))
    vb' = index_put(v_buffer, [loc], convert(div(convert(v, f32), v_scale), vb.dtype))
    ... readers of kb' / vb' (attention) ...
    copy_(k_buffer, kb');  copy_(v_buffer, vb')

After::

    v0  = reshape(split(qkv)[2], [T, Hk, Dv])             # v read before the call
    af  = auto_functionalized_v2(rope_compile.fused_qk_rope_kv_store_inplace,
                                 v=v0, cache_loc=loc, cos_sin_cache, positions, rot, neox,
                                 k_scale, v_scale, _q_*/_k_*=whole heads of qkv,
                                 _k_buffer_base_index=1, _v_buffer_base_index=2,
                                 _all_bases=[qkv, k_buffer, v_buffer])
    qkv' = af[1];  kb' = af[2];  vb' = af[3]
    ... the same readers ...;  copy_(k_buffer, kb');  copy_(v_buffer, vb')

Inductor's reinplacing then calls the op in place on qkv and on the cache inputs. The same
extension applies to every op of the family (``passes/fused_call.py``): QK-norm + RoPE becomes
QK-norm + RoPE + KV store, and the table forms (HF, read in place) their ``*_tables_inplace``
store ops. HF ``StaticCache.update`` (``keys.index_copy_(2, cache_position, k)`` or
``keys[:, :, cache_position] = k`` on ``[B, Hk, L, D]``) is the 4-D form: the op gets
``keys.permute(0, 2, 1, 3)`` (``[B, L, Hk, D]``) and ``cache_loc = cache_position``; token
``t = b * S + s`` writes batch ``t // S``, row ``cache_position[t % S]``.

What is proven before a rewrite (else no rewrite, the reason logged and counted as
``kv_store skipped: <reason>``):

- the k write is ``index_put(buf, [loc], x)`` with ``accumulate=False`` (or ``index_copy`` on
  the same dim), of values exactly ``[T, Hk, D]`` (no broadcast), and ``x`` is the call's
  rotated k read back through views only: its ``[T, Hk, :rot]`` is exactly the view the call
  rotates, with the pass-through tail (whole heads); optionally ``/ scale`` (a Python number,
  the division in float32 after an exact cast to float32) and casts that equal the kernel's
  single rounding to the buffer dtype;
- the v write uses the same ``loc`` node, the same form, another buffer, values ``[T, Hk, Dv]``
  with the same cast/scale rules; v is read where the call has not written it (its pre-call
  value is its value);
- ``loc`` is a 1-D int32/int64 tensor addressing dim 0 of a ``[S, Hk, D]`` buffer (or the
  sequence dim of HF's ``[B, Hk, L, D]``, the batches equal);
- the buffers are graph inputs, distinct, and share no memory with q/k's storage, v, loc,
  cos/sin/positions or the norm weights; the op's own checks pass on the exact views the new
  call gets (its fake implementation runs on them);
- every later reader of the written buffers reads the new call's output, and every reader of
  the rotated q/k (attention) still reads the rotated q/k.

Duplicate ``loc`` values: eager ``index_put`` (accumulate=False) leaves one unspecified winner per
row, and so does the kernel; for distinct ``loc`` (every deterministic case) they are equal.

Negative ``loc`` keep eager's meaning (``docs/index_ranges.md``): ``index_put`` / setitem write a
``loc`` in ``[-S, 0)`` to row ``S + loc``, which is the op's default
(``wrap_negative_cache_loc=True``); ``index_copy_`` raises there (``index_copy_(): index -1 is
out of bounds``), so its call gets ``wrap_negative_cache_loc=False`` and the op raises too (on
GPUs with ``set_check_positions(True)``; without it that token's rows are not written).
AOTAutograd has decomposed ``index_copy_`` into ``index_put`` by now (whose Inductor code
wraps): the node's ``meta["original_aten"]`` says which it was
(``rope_pattern.eager_wraps_negative``). k and v written by different rules are not fused. A
``loc`` outside the range raises ``IndexError`` in eager and in the op alike (GPUs: the same
rule).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from rope_compile.layout import may_overlap

from .accepted_ops import op_of
from .fuse_qk_rope import _as_graph_ints, _depends_on
from .fused_call import (
    ExtensionPass,
    FusedCall,
    NotACandidate,
    PlanError,
    as_strided_view,
    check_accepted,
    emit_call,
    family_op,
    graph_nodes_in,
    latest,
    rebase_views,
    table_form_miss,
)
from .fx_surgery import GraphTransaction, fake_value, shares_storage, view_chain
from .fx_surgery import statically_equal as _eq
from .rope_pattern import eager_wraps_negative

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["FuseKVStorePass", "KVStorePlan", "find_writes"]

# Intermediate dtypes that hold a float16 / bfloat16 / float32 value exactly.
_EXACT = (torch.float32, torch.float64)
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



@dataclass
class Write:
    """One functional cache write: ``buffer`` with ``values`` stored at ``loc`` along ``dim``
    (0: ``[S, Hk, D]``; 2: HF's ``[B, Hk, L, D]``)."""

    node: Node
    buffer: Node
    dim: int
    loc: Node
    values: Node
    accumulate: bool
    wrap_negative: bool  # a loc in [-S, 0) is row S + loc (index_put); index_copy raises


def _as_write(node: Node) -> Write | None:
    if op_of(node) is aten.index_put.default:
        buf, indices, values = node.args[:3]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        present = [i for i, x in enumerate(indices) if x is not None]
        if len(present) != 1 or not isinstance(indices[present[0]], Node):
            return None
        dim = present[0]
        if any(x is not None for x in indices[:dim]):
            return None
        return Write(node, buf, dim, indices[dim], values, bool(accumulate),
                     eager_wraps_negative(node))  # False: an index_copy_, decomposed
    if op_of(node) is aten.index_copy.default:
        buf, dim, index, source = node.args[:4]
        val = fake_value(buf)
        if val is None or not isinstance(dim, int):
            return None
        return Write(node, buf, dim % val.dim(), index, source, False, False)
    return None


def find_writes(graph: Graph) -> list[Write]:
    return [w for w in map(_as_write, graph.nodes) if w is not None]


def _is_cast(node: Node) -> torch.dtype | None:
    if op_of(node) is prims.convert_element_type.default and isinstance(node.args[1],
                                                                          torch.dtype):
        return node.args[1]
    if op_of(node) is aten._to_copy.default:  # layout, device: accepted_ops pins them
        dtype = node.kwargs.get("dtype")
        return dtype if isinstance(dtype, torch.dtype) else None
    return None


_SIZE1_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default)


def _divided_by_number(node: Node) -> bool:
    return op_of(node) is aten.div.Tensor and not isinstance(node.args[1], Node)


def _size1_view_of_cast(node: Node) -> bool:
    """``node`` only drops or adds size-1 dims of a dtype cast or of a division by a number
    (setitem converts the values to the cache dtype, then strips their leading size-1 dims):
    either commutes with it."""
    if not (op_of(node) in _SIZE1_VIEWS and isinstance(node.args[0], Node)
            and (_is_cast(node.args[0]) is not None or _divided_by_number(node.args[0]))):
        return False
    val, src = fake_value(node), fake_value(node.args[0])
    if val is None or src is None:
        return False
    kept, src_kept = [n for n in val.shape if not _eq(n, 1)], [n for n in src.shape
                                                                if not _eq(n, 1)]
    return len(kept) == len(src_kept) and all(_eq(a, b) for a, b in zip(kept, src_kept,
                                                                        strict=True))


def _peel_casts(node: Node) -> tuple[Node, list[torch.dtype]]:
    """(the tensor under a chain of dtype casts, the cast dtypes from inner to outer); views
    over a cast (or over a division by a number) that only drop or add size-1 dims are passed
    through (the shape checks
    restore those dims, ``_with_leading_ones``)."""
    dtypes = []
    while isinstance(node, Node):
        if _is_cast(node) is not None:
            dtypes.append(_is_cast(node))
        elif not _size1_view_of_cast(node):
            break
        node = node.args[0]
    return node, dtypes[::-1]


def _stored_source(values: Node, buffer_dtype: torch.dtype) -> tuple[Node, float | None]:
    """``values`` = cast(source / scale) as the kernel computes it: (source, scale or None).

    Without a scale: casts from the source's dtype to the buffer's, every intermediate dtype
    exact (float32/float64), so one rounding, as the kernel's. With one: an exact cast to
    float32, the division in float32 by a positive finite Python number, then such casts."""
    outer, outer_casts = _peel_casts(values)
    scale = None
    inner = outer
    inner_casts: list[torch.dtype] = []
    if op_of(outer) is aten.div.Tensor:
        num, den = outer.args[:2]
        if isinstance(den, Node) or not isinstance(den, (int, float)) or isinstance(den, bool):
            raise PlanError("the stored value is divided by a tensor, not a number")
        if not math.isfinite(den) or den <= 0:
            raise PlanError(f"the stored value is divided by {den!r} (the op takes a finite "
                            "scale > 0)")
        if not isinstance(num, Node) or fake_value(outer).dtype != torch.float32:
            raise PlanError("the stored value is divided in another dtype than float32 (the "
                            "kernel divides in float32)")
        scale = float(den)
        inner, inner_casts = _peel_casts(num)
    source_val = fake_value(inner)
    if source_val is None:
        raise PlanError("the stored value has no tensor value")
    if source_val.dtype not in _INPUT_DTYPES:
        raise PlanError(f"the stored tensor's dtype {source_val.dtype} is not one the kernel "
                        "rotates")
    if scale is not None:
        if any(d not in _EXACT for d in inner_casts) or (
                (inner_casts[-1] if inner_casts else source_val.dtype) != torch.float32):
            raise PlanError("the value divided by the scale is not the exact float32 value of "
                            "the stored tensor")
    elif inner_casts:
        raise PlanError("the stored value is not a cast of the stored tensor")
    if any(d not in _EXACT for d in outer_casts[:-1]):
        raise PlanError(f"the stored value is rounded more than once (casts {outer_casts})")
    if fake_value(values).dtype != buffer_dtype:
        raise PlanError("the stored value's dtype differs from the buffer's")
    return inner, scale


def _same_view(a: torch.Tensor, size, stride, offset) -> bool:
    """``a`` has this size, stride (where the size is not 1) and storage offset."""
    if a.dim() != len(size) or not all(_eq(x, y) for x, y in zip(a.shape, size, strict=True)):
        return False
    if not all(_eq(n, 1) or _eq(s, t) for n, s, t in zip(size, a.stride(), stride,
                                                           strict=True)):
        return False
    return _eq(a.storage_offset(), offset)


def _merged_token_view(val: torch.Tensor, dim: int):
    """The stored tensor (and the buffer) as the op sees it: for ``dim == 0`` itself
    ``[T, Hk, D]``; for HF's ``dim == 2`` (``[B, Hk, S, D]``) ``permute(0, 2, 1, 3)`` with
    (B, S) merged into tokens, or None if they do not merge as a view."""
    if dim == 0:
        return (list(val.shape), list(val.stride()), val.storage_offset())
    p = val.permute(0, 2, 1, 3)
    b, s = p.shape[0], p.shape[1]
    if not (_eq(b, 1) or _eq(s, 1) or _eq(p.stride(0), s * p.stride(1))):
        return None
    token_stride = p.stride(0) if _eq(s, 1) else p.stride(1)
    return ([b * s, p.shape[2], p.shape[3]], [token_stride, p.stride(2), p.stride(3)],
            val.storage_offset())


def _with_leading_ones(val: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """``val`` with the leading size-1 dims torch's setitem strips put back: ``cache[loc] = k``
    with one token gives ``index_put`` values ``[Hk, D]`` (``[Hk, S, D]`` for HF's
    ``keys[:, :, cp] = k`` at batch 1), which broadcast to ``[1, Hk, D]``: the same write."""
    if val is None or val.dim() >= rank:
        return val
    with torch._guards.detect_fake_mode([val]) or contextlib.nullcontext():
        return val.view([1] * (rank - val.dim()) + list(val.shape))


def _swapped(call: FusedCall) -> FusedCall:
    """The same call with q and k exchanged (and their norm weights): the same computation."""
    views = dict(call.views)
    views["q"], views["k"] = call.views["k"], call.views["q"]
    args = dict(call.args)
    if "q_weight" in args:
        args["q_weight"], args["k_weight"] = call.args["k_weight"], call.args["q_weight"]
    return FusedCall(call.node, call.norm, call.store, call.tables, args, views, call.bases,
                     call.outputs)


def _as_tokens(val: torch.Tensor) -> torch.Tensor:
    """HF's ``[B, H, S, D]`` as ``[B * S, H, D]`` (tokens in (b, s) order)."""
    p = val.permute(0, 2, 1, 3)
    return p.reshape(-1, p.shape[2], p.shape[3])


def _within(size, stride, offset, root: torch.Tensor) -> bool:
    """The view stays inside ``root``'s storage and does not overlap itself."""
    try:
        numel = root.untyped_storage().nbytes() // root.element_size()
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if not statically_known_true(last < numel):
            return False
        dims = sorted((s, n) for n, s in zip(size, stride, strict=True)
                      if not _eq(n, 1))
        extent = 1
        for s, n in dims:
            if not statically_known_true(s >= extent):
                return False
            extent = s * n
        return True
    except Exception:
        return False


@dataclass
class KVStorePlan:
    call: FusedCall
    k_write: Write
    v_write: Write
    v_source: Node  # the stored v (a view chain to replay on the pre-call base, or as is)
    v_replay: tuple[int, list[Node]] | None  # (base index, chain from the base's getitem)
    k_scale: float | None
    v_scale: float | None
    views: dict  # q, k (whole heads), k_buffer, v_buffer
    buffers: list[Node]  # k_buffer root, v_buffer root
    buffer_chains: list[list[Node]]  # view chains root -> written buffer node
    op: object
    symbols: dict


class FuseKVStorePass(ExtensionPass):
    """Extends each fused RoPE call (cache or tables, with or without QK-norm) over the
    KV-cache write of its rotated k and of v; same options as ``FuseQKRopePass``."""

    prefix = "kv_store"

    def describe(self, plan: KVStorePlan) -> str:
        return (f"stored the rotated k and v of {plan.call.node.name} in "
                f"{plan.buffers[0].name}/{plan.buffers[1].name} in the same call ({plan.op})")

    # ---------------------------------------------------------------------------- planning

    def _k_writes(self, call: FusedCall, writes: list[Write]) -> list[tuple[Write, str]]:
        """The writes whose values are read (through casts/div and views) from a rotated
        output of the call, with the name of the call's argument they overlap ("q" or "k": the
        RoPE treats both alike, so the pair may come in either order)."""
        found = []
        for write in writes:
            source, _ = _peel_casts(write.values)
            if op_of(source) is aten.div.Tensor:
                source, _ = _peel_casts(source.args[0])
            val = fake_value(source)
            if val is None:
                continue
            root = view_chain(source)[0]
            for name in ("q", "k"):
                out = call.outputs.get(call.views[name]["base_index"])
                if out is not None and root is out and may_overlap(val, call.fake_view(name)):
                    found.append((write, name))
        return found

    def plan(self, call: FusedCall, graph: Graph, symbols: dict) -> KVStorePlan:
        if call.store:
            raise NotACandidate
        writes = find_writes(graph)
        k_writes = self._k_writes(call, writes)
        if not k_writes:
            raise NotACandidate  # the rotated k is not written into a cache here
        if len(k_writes) > 1:
            raise PlanError("the rotated k is written into more than one buffer")
        kw, k_name = k_writes[0]
        if k_name == "q":  # the pair came as (k, q): the stored one is the op's k
            call = _swapped(call)
        if call.device_type() not in self.devices:
            raise PlanError(f"device {call.device_type()} not in {self.devices}")
        if kw.accumulate:
            raise PlanError("the k write accumulates (index_put accumulate=True), the op "
                            "overwrites")
        k_root = view_chain(kw.buffer)[0]
        if k_root.op not in ("placeholder", "get_attr"):
            raise PlanError("k_buffer is computed in the graph, not a graph input")
        if any(shares_storage(k_root.meta["val"], b.meta["val"]) for b in call.bases):
            raise PlanError("k_buffer shares memory with q/k")
        kbuf_val = fake_value(kw.buffer)
        if kbuf_val is None or (kbuf_val.dim(), kw.dim) not in ((3, 0), (4, 2)):
            raise PlanError("the k write does not address dim 0 of a [S, Hk, D] buffer or the "
                            "sequence dim of a [B, Hk, L, D] one")
        k_source, k_scale = _stored_source(kw.values, kbuf_val.dtype)
        rot = call.args["rotary_dim"]
        kview = call.fake_view("k")
        qview = call.fake_view("q")
        want = list(kbuf_val.shape)
        want[kw.dim] = fake_value(kw.loc).shape[0] if fake_value(kw.loc) is not None else -1
        merged = _merged_token_view(_with_leading_ones(fake_value(k_source), len(want)),
                                    kw.dim)
        values_val = _with_leading_ones(fake_value(kw.values), len(want))
        if list(values_val.shape) != want:
            raise PlanError(f"the k write's values {list(values_val.shape)} are broadcast or "
                            f"do not fill the written rows {want}")
        if merged is None:
            raise PlanError("the written k's batch and sequence dims do not merge into tokens")
        size, stride, offset = merged
        head = size[2]
        if call.norm and not _eq(head, kview.shape[2]):
            raise PlanError("the written k is not the normalised head")
        if not (_eq(size[0], kview.shape[0]) and _eq(size[1], kview.shape[1])
                and _eq(stride[2], 1) and statically_known_true(head >= rot)):
            raise PlanError("the written k is not the call's rotated k (other tokens, heads "
                            "or features)")
        if not _same_view(kview, kview.shape, [*stride[:2], 1], offset):
            raise PlanError("the written k is not the call's rotated k (another view of its "
                            "storage)")
        self._check_head_size(head)
        loc_val = fake_value(kw.loc)
        if loc_val is None or loc_val.dim() != 1 or loc_val.dtype not in (torch.int32,
                                                                           torch.int64):
            raise PlanError("cache_loc is not a 1-D int32/int64 tensor")
        if kw.dim == 0 and not _eq(loc_val.shape[0], size[0]):
            raise PlanError("cache_loc does not have one row per token")
        vw, v_source, v_scale = self._v_write(call, kw, writes, graph)
        # Views of the new call: q and k as whole heads, the buffers (HF: permuted).
        views = {}
        for name, view in (("q", qview), ("k", kview)):
            spec = dict(call.views[name])
            if not _eq(view.shape[2], head):
                base = call.bases[spec["base_index"]].meta["val"]
                wide = [view.shape[0], view.shape[1], head]
                if not _within(wide, view.stride(), view.storage_offset(), base):
                    raise PlanError(f"{name}'s whole heads do not lie within its storage")
                spec = as_strided_view(spec["base_index"],
                                       _as_graph_ints(wide, symbols),
                                       _as_graph_ints(view.stride(), symbols),
                                       _as_graph_ints([view.storage_offset()], symbols)[0])
            views[name] = spec
        buffers, chains = [], []
        base_count = len(call.bases)
        for name, write in (("k_buffer", kw), ("v_buffer", vw)):
            root, chain = view_chain(write.buffer)
            if root.op not in ("placeholder", "get_attr"):
                raise PlanError(f"{name} is computed in the graph, not a graph input")
            buffers.append(root)
            chains.append(chain)
            val = fake_value(write.buffer)
            if write.dim == 0 and not chain:
                views[name] = {"base_index": base_count + len(buffers) - 1}
            else:
                p = val if write.dim == 0 else val.permute(0, 2, 1, 3)
                views[name] = as_strided_view(base_count + len(buffers) - 1,
                                              _as_graph_ints(p.shape, symbols),
                                              _as_graph_ints(p.stride(), symbols),
                                              _as_graph_ints([p.storage_offset()], symbols)[0])
        if buffers[0] is buffers[1] or shares_storage(buffers[0].meta["val"],
                                                      buffers[1].meta["val"]):
            raise PlanError("k_buffer and v_buffer share memory")
        self._check_disjoint(call, buffers, v_source, kw.loc)
        v_replay = None
        v_root, v_chain = view_chain(v_source)
        for index, out in call.outputs.items():
            if v_root is out:
                v_replay = (index, v_chain)
        op = family_op(call.norm, True, call.tables)
        plan = KVStorePlan(call, kw, vw, v_source, v_replay, k_scale, v_scale, views, buffers,
                           chains, op, symbols)
        self._check_op(plan)
        return plan

    def _check_head_size(self, head) -> None:
        if isinstance(head, int) and head not in self.head_sizes:
            raise PlanError(f"head_size {head} not in {self.head_sizes}")

    def _v_write(self, call: FusedCall, kw: Write, writes: list[Write], graph: Graph):
        """The v write paired with the k write ``kw``: same loc node and form, another buffer,
        v not computed from the call's rotated q/k (v read from the same projection wins; else
        the nearest write in graph order). Returns (write, stored v, v scale)."""
        order = {n: i for i, n in enumerate(graph.nodes)}
        same_form = [w for w in writes if w is not kw and w.dim == kw.dim
                     and fake_value(w.buffer) is not None
                     and fake_value(w.buffer).dim() == fake_value(kw.buffer).dim()]
        same_loc = [w for w in same_form if w.loc is kw.loc]
        if not same_loc:
            if same_form:
                raise PlanError("k and v are written at different cache_loc")
            raise PlanError("no v write at the same cache_loc")
        table_form = table_form_miss(call, "the KV-store ops")  # the op's table form
        if table_form is not None:
            raise PlanError(table_form)
        strong, weak = [], []
        for write in same_loc:
            try:
                source, scale = _stored_source(write.values, fake_value(write.buffer).dtype)
            except PlanError:
                continue
            root = view_chain(source)[0]
            if root in call.outputs.values() or root in call.bases:
                strong.append((write, source, scale))
            elif not _depends_on(source, call.node, order):
                weak.append((write, source, scale))
        candidates = strong or sorted(
            weak, key=lambda c: abs(order[c[0].node] - order[kw.node]))
        if not candidates:
            raise PlanError("no v write at the same cache_loc stores a v the call can read")
        if len(strong) > 1:
            raise PlanError("several v writes at the same cache_loc read this projection")
        write, source, scale = candidates[0]
        if write.accumulate:
            raise PlanError("the v write accumulates (index_put accumulate=True), the op "
                            "overwrites")
        if write.wrap_negative != kw.wrap_negative:
            raise PlanError("k and v are written with different index rules (index_put and "
                            "index_copy treat a negative cache_loc differently)")
        buf = fake_value(write.buffer)
        want = list(buf.shape)
        want[write.dim] = fake_value(write.loc).shape[0]
        val = _with_leading_ones(fake_value(write.values), len(want))
        if list(val.shape) != want:
            raise PlanError(f"the v write's values {list(val.shape)} are broadcast or do not "
                            f"fill the written rows {want}")
        return write, source, scale

    def _check_disjoint(self, call: FusedCall, buffers: list[Node], v_source: Node,
                        loc: Node) -> None:
        """The written buffers share no memory with anything else the call reads or writes."""
        others = {"q/k": [b.meta["val"] for b in call.bases]}
        others["cache_loc"] = [loc.meta["val"]]
        others["v"] = [fake_value(v_source)]
        for name, value in call.args.items():
            others[name] = [n.meta["val"] for n in graph_nodes_in(value)
                            if fake_value(n) is not None]
        for label, buf in zip(("k_buffer", "v_buffer"), buffers, strict=True):
            for name, vals in others.items():
                if any(v is not None and shares_storage(buf.meta["val"], v) for v in vals):
                    raise PlanError(f"{label} shares memory with {name}")

    def _check_op(self, plan: KVStorePlan) -> None:
        """v's value is unchanged by the call (read where it writes nothing), and the op's
        own checks pass on the exact views the new call gets."""
        call = plan.call
        bases = [*call.bases, *plan.buffers]
        fake_bases = [b.meta["val"] for b in bases]
        probe = FusedCall(call.node, call.norm, True, call.tables, {}, plan.views, bases)
        views = {name: probe.fake_view(name) for name in plan.views}
        v_val = _with_leading_ones(fake_value(plan.v_source),
                                   fake_value(plan.v_write.buffer).dim())
        if plan.v_replay is not None:
            index, chain = plan.v_replay
            # The same view of the pre-call base: same strides and offset, other storage.
            with torch._guards.detect_fake_mode(fake_bases):
                v_val = torch.as_strided(fake_bases[index], v_val.shape, v_val.stride(),
                                         v_val.storage_offset())
        for name in ("q", "k"):
            if shares_storage(v_val, views[name]) and may_overlap(v_val, views[name]):
                raise PlanError(f"v overlaps the {name} the call writes")
        if plan.v_write.dim != 0:  # HF [B, Hk, S, Dv] -> [T, Hk, Dv]
            with torch._guards.detect_fake_mode(fake_bases):
                v_val = _as_tokens(v_val)
        args = {**call.fake_args(), "v": v_val, "cache_loc": plan.k_write.loc.meta["val"],
                "k_scale": plan.k_scale, "v_scale": plan.v_scale,
                "wrap_negative_cache_loc": plan.k_write.wrap_negative}
        check_accepted(plan.op, views, args)

    # ---------------------------------------------------------------------------- rewriting

    def rewrite(self, tx: GraphTransaction, plan: KVStorePlan) -> list[Node]:
        call = plan.call
        graph = tx.graph
        v_node = plan.v_source
        if plan.v_replay is not None:
            index, chain = plan.v_replay
            v_node = tx.replay_views(chain, call.outputs[index], call.bases[index])
        while v_node.meta["val"].dim() < fake_value(plan.v_write.buffer).dim():
            v_node = tx.add(v_node, aten.unsqueeze.default, (v_node, 0))  # see _with_leading_ones
        if plan.v_write.dim != 0:  # HF [B, Hk, S, Dv] -> [T, Hk, Dv] (a view where it can be)
            v_node = tx.add(v_node, aten.permute.default, (v_node, [0, 2, 1, 3]))
            val = v_node.meta["val"]
            v_node = tx.add(v_node, aten.reshape.default,
                            (v_node, [-1, *_as_graph_ints(val.shape[2:], plan.symbols)]))
        args = {**call.args, "v": v_node, "cache_loc": plan.k_write.loc,
                "k_scale": plan.k_scale, "v_scale": plan.v_scale}
        if not plan.k_write.wrap_negative:  # index_copy: a negative cache_loc is out of range
            args["wrap_negative_cache_loc"] = False
        bases = [*call.bases, *plan.buffers]
        anchor = latest([*bases, v_node, plan.k_write.loc, *graph_nodes_in(call.args)], graph)
        new, outs = emit_call(tx, anchor, plan.op, args, plan.views, bases)
        for index, old in call.outputs.items():
            rebase_views(tx, old, outs[index])
        for i, (write, chain) in enumerate(zip((plan.k_write, plan.v_write),
                                               plan.buffer_chains, strict=True)):
            root = plan.buffers[i]
            new_value = tx.replay_views(chain, root, outs[len(call.bases) + i])
            rebase_views(tx, write.node, new_value)
        return [call.node, *call.outputs.values(), plan.k_write.node, plan.v_write.node]
