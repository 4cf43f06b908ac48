"""Inductor post-grad pass: fuse the Q RoPE and the K RoPE into one in-place op call.

Before (sglang / vLLM ``forward_native``; one such chain for q and one for k)::

    qkv = mm(x, w_qkv)
    q, k, v = split_with_sizes(qkv, [Hq*D, Hk*D, Hk*D], -1)
    rows = index(cos_sin_cache, [positions])          # shared by q and k
    cos, sin = split(rows, rot/2, -1)
    xq = reshape(q, [T, Hq, D])
    q1, q2 = split(xq[..., :rot], rot/2, -1)          # GPT-J: xq[..., 0::2], xq[..., 1::2]
    rq = cat([q1*cos - q2*sin, q2*cos + q1*sin], -1)   # GPT-J: view(cat([o1[..., None], ...]))
    q_out = reshape(cat([rq, xq[..., rot:]], -1), [T, Hq*D])
    ... the same for k with xk ...

After::

    xq = reshape(q, [T, Hq, D]);  xk = reshape(k, [T, Hk, D])
    af = auto_functionalized_v2(rope_compile.fused_qk_rope_with_cos_sin_cache_inplace,
                                cos_sin_cache, positions, rot, is_neox,
                                q = slice(xq, -1, 0, rot), k = slice(xk, -1, 0, rot),
                                _all_bases=[xq, xk])
    q_out = reshape(af[1], [T, Hq*D]);  k_out = reshape(af[2], [T, Hk*D])

(The call's base is the storage root, ``qkv``; views of it that do not overlap q or k, such as v,
are re-pointed at the call's output, as functionalization would, so nothing blocks reinplacing.)
Inductor's reinplacing then turns ``auto_functionalized_v2`` into a direct in-place call on
``xq``/``xk`` (views of ``qkv``) when nothing reads the pre-RoPE values later, and into a copy
plus call otherwise (for example when q is a graph input): the result is the same either way.
On GPUs ``rope_compile.inductor_lowering`` then launches the Triton kernel from generated code.

Table forms (HF ``rotate_half``, gpt-fast ``freqs_cis``) have no cache/positions pair in the
graph: the pass builds ``cos_sin_cache = cat(cos, sin).reshape(-1, rot)`` from the model's own
per-token tables (once per table source) and ``positions = arange(T)``.

Negative positions keep eager's meaning (``docs/index_ranges.md``): rows gathered by ``index``
(``cache[positions]``) read a position in ``[-P, 0)`` from the cache's end, so the call gets
``wrap_negative_positions=True``; ``index_select`` and ``embedding`` raise there, as the op does
by default (an ``index_select`` reaches the pass as ``index``: its ``meta["original_aten"]``
tells them apart, ``rope_pattern.eager_wraps_negative``).

Only pairs that share positions, cache, style, rotary_dim and head size, whose head size is
in ``head_sizes`` and whose device type is in ``devices`` are rewritten; every other candidate
is left untouched, with the reason logged at DEBUG and counted in
``torch._dynamo.utils.counters["rope_compile"]``. So is a pair whose rotated q and k are read
only by layout copies (``.contiguous()``, ``cat``, a cast), which Inductor computes the RoPE
inside: the rewrite would add a pass over q and k (``passes/layout_copy_rule.py``; the option
``skip_pairs_only_read_by_copies=False`` forces it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from rope_compile.constants import DEFAULT_DEVICES, DEFAULT_HEAD_SIZES
from rope_compile.layout import may_overlap
from rope_compile.options import (
    validate_pass_options,
    validate_skip_pairs_only_read_by_copies,
)
from rope_compile.validation import (
    validate_fused,
    validate_qk_mrope_cache,
    validate_qk_rope_tables,
)

from .events import inherit_source, option_hint, record, with_source
from .fx_surgery import (
    GraphTransaction,
    aliases_an_input,
    fake_value,
    is_view_of_input,
    shares_storage,
    view_chain,
)
from .layout_copy_rule import COPY_ONLY_REASON, read_only_by_layout_copies
from .miss_report import find_misses
from .readers import (
    can_copy_in_layout,
    copy_in_layout,
    layout_readers,
    reaches_the_user,
    rebase_views,
)
from .rope_pattern import NoMatch, RopeMatch, enclosing_head_size, match_rope
from .table_views import TableRows, table_rows
from .trig_sources import PairTables

log = logging.getLogger("rope_compile")
aten = torch.ops.aten

__all__ = ["DEFAULT_DEVICES", "DEFAULT_HEAD_SIZES", "FuseQKRopePass", "find_rope_matches",
           "pair_matches", "view_chain"]

_CANDIDATE_TARGETS = (
    torch.ops.aten.cat.default,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.prims.convert_element_type.default,
    torch.ops.aten.add.Tensor,
)


def _fused_op():
    import rope_compile.ops  # noqa: F401  (registers the op)

    return torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default


def _mrope_op():
    import rope_compile.ops  # noqa: F401  (registers the op)

    return torch.ops.rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace.default


def _tables_op():
    import rope_compile.ops  # noqa: F401  (registers the op)

    return torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default


def count(name: str, amount: int = 1) -> None:
    counters["rope_compile"][name] += amount


def _raise_errors(node: Node, err: Exception) -> None:
    raise err


def find_rope_matches(graph: Graph, on_error=_raise_errors,
                      outcomes: dict | None = None) -> list[RopeMatch]:
    """Every proven RoPE application in ``graph``, in graph order.

    A candidate whose matching raises anything but ``NoMatch`` is handed to ``on_error`` (the
    pass counts and logs it, or re-raises under ``strict``) and skipped: it costs no other.
    ``outcomes``, if given, receives each candidate's match or exception, from which
    ``miss_report.find_misses`` explains the RoPE-like candidates that were not proven."""
    matches = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _CANDIDATE_TARGETS:
            continue
        try:
            matches.append(match_rope(node))
            if outcomes is not None:
                outcomes[node] = matches[-1]
        except NoMatch as why:  # explained once, by find_misses, if it looks like RoPE
            if outcomes is not None:
                outcomes[node] = why
            continue
        except Exception as err:
            if outcomes is not None:
                outcomes[node] = err
            on_error(node, err)
    # A partial-rotary RoPE also contains a full RoPE of its x[..., :rot] slice: keep the
    # outermost match only.
    inner = {n for m in matches for n in m.nodes if n is not m.output}
    return [m for m in matches if m.output not in inner]


def _describe_difference(a: RopeMatch, b: RopeMatch) -> str:
    if a.trig.pairing_key() != b.trig.pairing_key():
        return a.trig.describe_difference(b.trig)
    if a.rotary_dim != b.rotary_dim:
        return f"q and k use different rotary_dim ({a.rotary_dim} vs {b.rotary_dim})"
    if a.is_neox != b.is_neox:
        return "q and k use different styles (neox vs GPT-J)"
    if a.head_size != b.head_size:
        return f"q and k have different head sizes ({a.head_size} vs {b.head_size})"
    dtypes = (a.base.meta["val"].dtype, b.base.meta["val"].dtype)
    return f"q and k have different dtypes ({dtypes[0]} vs {dtypes[1]})"


def pair_matches(matches: list[RopeMatch]) -> tuple[list[tuple[RopeMatch, RopeMatch]],
                                                     list[tuple[RopeMatch, str]]]:
    """Pair consecutive matches (graph order) that share positions, cache, style and sizes.

    Returns (pairs, unpaired with reason)."""
    pending: dict[tuple, RopeMatch] = {}
    pairs = []
    for match in matches:
        partner = pending.pop(match.key, None)
        if partner is None:
            pending[match.key] = match
        else:
            pairs.append((partner, match))
    leftovers = list(pending.values())
    unpaired = []
    for match in leftovers:
        others = [m for m in leftovers if m is not match]
        reason = (_describe_difference(match, others[0]) if others
                  else "lone RoPE: no second RoPE shares its positions and cos_sin_cache")
        unpaired.append((match, reason))
    return pairs, unpaired


def _depends_on(node: Node, target: Node, order: dict[Node, int]) -> bool:
    """Whether ``node`` is ``target`` or computed from it. The graph is in topological order,
    so the walk never goes above ``target``'s position (no whole-graph ancestor sets)."""
    limit = order[target]
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current is target:
            return True
        for inp in current.all_input_nodes:
            if inp not in seen and order.get(inp, -1) >= limit:
                seen.add(inp)
                stack.append(inp)
    return False


def _device_type(match: RopeMatch) -> str:
    return match.base.meta["val"].device.type


class PlanError(Exception):
    """A pair cannot be rewritten; the message says why."""


def _graph_symbols(graph: Graph) -> dict:
    """sympy expression -> node, for nodes holding a SymInt (size placeholders, sym_size)."""
    table = {}
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            table.setdefault(val.node.expr, node)
    return table


def _as_graph_ints(values, symbols: dict) -> tuple:
    out = []
    for value in values:
        if isinstance(value, torch.SymInt):
            expr = value.node.expr
            if expr.is_number:
                out.append(int(expr))
            elif expr in symbols:
                out.append(symbols[expr])
            else:
                raise PlanError(f"symbolic size {expr} has no node in the graph "
                                f"(in {tuple(values)})")
        else:
            out.append(int(value))
    return tuple(out)


@dataclass
class PairPlan:
    """Everything one rewrite needs, proven before the graph is touched."""

    q: RopeMatch
    k: RopeMatch
    roots: list[Node]
    chains: tuple[list[Node], list[Node]]
    kwargs: dict
    # Table form read in place: the model's cos and sin tables as [R, rot/2] rows (the tables
    # op); else (no such reading) the [..tokens.., rot] shape a built table is expanded to.
    table_rows: tuple[TableRows, TableRows] | None = None
    table_shape: tuple | None = None
    # Rotated outputs that reach the graph output: (match, dim order of eager's dense layout,
    # the users that read a copy in that layout instead of the in-place result).
    graph_outputs: list[tuple[RopeMatch, list[int], list[Node]]] = field(default_factory=list)

    def touched(self) -> set[Node]:
        """Nodes the rewrite erases, re-points or re-lays out: no other pair of the same round
        may rely on them."""
        nodes = set(self.roots)
        for match, chain in ((self.q, self.chains[0]), (self.k, self.chains[1])):
            nodes |= {match.output, match.base, *match.nodes, *chain}
        return nodes

    def reads(self) -> set[Node]:
        """Nodes the rewrite reads (and must still exist when it runs)."""
        nodes = self.touched()
        nodes |= set(self.q.trig.reads())
        return nodes


def _token_view(match: RopeMatch) -> tuple[list, list, object]:
    """(size, stride, storage_offset) of x[..., :rot] seen as [tokens, heads, rot]: the token
    dims (all but heads and features) must merge into one, as a view, and the features must be
    contiguous (last stride 1), which the kernel assumes."""
    val = match.base.meta["val"]
    if not statically_known_true(val.stride(-1) == 1):
        raise PlanError(f"x's last stride is {val.stride(-1)}, not 1")
    dims = [d for d in range(val.dim() - 1) if d != match.heads_dim]
    moving = [d for d in dims if not statically_known_true(val.shape[d] == 1)] or dims[-1:]
    # A size-1 dim (batch 1, or one token) does not move: only the others must merge.
    size, stride = val.shape[moving[-1]], val.stride(moving[-1])
    for outer in reversed(moving[:-1]):
        if not statically_known_true(val.stride(outer) == size * stride):
            raise PlanError("x's token dims do not merge into one without a copy")
        size = size * val.shape[outer]
    return ([size, val.shape[match.heads_dim], match.rotary_dim],
            [stride, val.stride(match.heads_dim), 1], val.storage_offset())


def _check_root(name: str, root: Node) -> None:
    """The storage root must be a tensor whose layout Inductor either asserts (a graph input)
    or pins to its fake strides (any computed buffer read through ``as_strided``, as the call's
    views are once Inductor decomposes it); a view Inductor does not know is a view is not."""
    val = fake_value(root)
    if val is None:
        raise PlanError(f"{name}'s storage root {root.name} has no tensor value")
    if root.op == "call_function" and aliases_an_input(root):
        raise PlanError(f"{name}'s storage root {root.name} ({root.target}) is a view the "
                        "pass cannot follow")
    if root.op not in ("placeholder", "call_function", "get_attr"):
        raise PlanError(f"{name}'s storage root {root.name} is a {root.op} node")


def _dense(val: torch.Tensor) -> bool:
    """Non-overlapping and dense, for sure (False when it depends on symbols)."""
    check = getattr(torch._prims_common, "is_non_overlapping_and_dense_or_false", None)
    if check is None:  # older torch
        try:
            return bool(torch._prims_common.is_non_overlapping_and_dense(val))
        except Exception:
            return False
    return bool(check(val))


def _views_read_by_output(view: Node) -> list[tuple[Node, list[Node]]]:
    """``view`` and the views below it (view ops only) that the graph output reads, each with
    its view chain from ``view``'s source (``[view, ..., it]``); empty when the output reads
    none of them."""
    found, stack, seen = [], [(view, [view])], {view}
    while stack:
        current, chain = stack.pop()
        if any(user.op == "output" and reaches_the_user(user, current)
               for user in current.users):
            found.append((current, chain))
        for user in current.users:
            if user not in seen and is_view_of_input(user):
                seen.add(user)
                stack.append((user, [*chain, user]))
    return found


def _graph_output_layout(match: RopeMatch) -> tuple[RopeMatch, list[int], list[Node]] | None:
    """If the rotated ``match.output`` reaches the graph output (itself, or a view of it:
    ``reshape(T, H * D)``, a transpose, a head slice): (match, the dim order, outermost first,
    of eager's dense layout, the users to re-point at a copy in that layout). The in-place
    result is a strided view into the root, sharing its storage with v; eager's is a fresh
    tensor, and its views are views of that."""
    users = [user for user in match.output.users
             if (user.op == "output" and reaches_the_user(user, match.output))
             or (is_view_of_input(user) and _views_read_by_output(user))]
    if not users:
        return None
    val = fake_value(match.output)
    if val is None or not _dense(val):
        raise PlanError("the rotated tensor is a graph output with a non-dense layout")
    dims = list(range(val.dim()))
    if _contiguous(val):
        return match, dims, users
    strides = val.stride()
    if not all(isinstance(s, int) for s in strides):
        raise PlanError("the rotated tensor is a graph output with a symbolic, non-contiguous "
                        "layout")
    order = sorted(dims, key=lambda d: -strides[d])
    return match, order, users


def _reader_layouts(match: RopeMatch) -> tuple[RopeMatch, list[int], list[Node]] | None:
    """:func:`_graph_output_layout`, once the readers that need the rotated tensor's own layout
    (``passes/readers.py``: ``as_strided``, a custom op, a view op not proven layout-free...)
    are known to get a copy in it."""
    _, _, layout = layout_readers(match.output)
    if any(user.op != "output" for user, _ in layout) and not can_copy_in_layout(
            fake_value(match.output)):
        names = sorted({user.name for user, _ in layout if user.op != "output"})
        raise PlanError(f"{', '.join(names)} need the rotated tensor's own layout, which is "
                        "not dense at offset 0 for every size (no copy in it can be made)")
    return _graph_output_layout(match)


def _contiguous(val: torch.Tensor) -> bool:
    check = getattr(torch._prims_common, "is_contiguous_or_false", None)
    if check is not None:
        return bool(check(val))
    return statically_known_true(val.is_contiguous())


def plan_pair(q: RopeMatch, k: RopeMatch, symbols: dict) -> PairPlan:
    """Prove every fact the fused call relies on and compute the rewrite, without touching the
    graph; raise ``PlanError`` with the reason when a fact cannot be proven."""
    rot = q.rotary_dim
    kwargs = {"rotary_dim": rot, "is_neox": q.is_neox}
    roots: list[Node] = []
    chains = []
    fake = {}
    for name, match in (("q", q), ("k", k)):
        root, chain = view_chain(match.base)
        _check_root(name, root)
        if root not in roots:
            roots.append(root)
        chains.append(chain)
        # The op's argument x[..., :rot] as [T, H, rot], described against the root's storage.
        size, stride, offset = _token_view(match)
        kwargs[f"_{name}_base_index"] = roots.index(root)
        kwargs[f"_{name}_size"] = _as_graph_ints(size, symbols)
        kwargs[f"_{name}_stride"] = _as_graph_ints(stride, symbols)
        kwargs[f"_{name}_storage_offset"] = _as_graph_ints([offset], symbols)[0]
        fake[name] = (size, stride, offset)
    kwargs["_all_bases"] = roots
    root_vals = [r.meta["val"] for r in roots]
    # What the kernel reads (cache, positions, model tables) must not share memory with what
    # it writes.
    for reader in q.trig.reads():
        reader_val = fake_value(reader)
        if reader_val is not None and any(shares_storage(reader_val, r) for r in root_vals):
            raise PlanError(f"{reader.name} (read by the call) shares storage with q or k")
    # The op's own checks, on the exact views the call will get: never emit what it rejects.
    views = []
    for name in ("q", "k"):
        size, stride, offset = fake[name]
        root_val = root_vals[kwargs[f"_{name}_base_index"]]
        with torch._guards.detect_fake_mode([root_val]) or contextlib.nullcontext():
            views.append(torch.as_strided(root_val, size, stride, offset))
    if len(roots) == 1:
        if may_overlap(*views):
            raise PlanError("q and k overlap in memory (an in-place call would rotate twice)")
        # The rotated outputs read their whole head back from the root after the call: a
        # pass-through tail x[..., rot:] of one must not be rotated as part of the other.
        q_head, k_head = q.base.meta["val"], k.base.meta["val"]
        if may_overlap(q_head, views[1]) or may_overlap(k_head, views[0]):
            raise PlanError("the rotated part of q or k overlaps the other's head (its "
                            "pass-through features would change)")
    rows = _plan_table_rows(q, views) if q.trig.table_form else None
    with torch._guards.detect_fake_mode(root_vals) or contextlib.nullcontext():
        if rows is not None:
            try:
                validate_qk_rope_tables(views[0], views[1], rows[0].fake(), rows[1].fake(),
                                        rot, q.trig.sections)
            except ValueError as err:
                raise PlanError(f"the op would reject the call: {err}") from None
            outputs = [layout for layout in map(_reader_layouts, (q, k)) if layout]
            return PairPlan(q, k, roots, tuple(chains), kwargs, rows, None, outputs)
        if not q.trig.table_form:
            cache_val = q.trig.cache.meta["val"]
            positions_val = q.trig.positions.meta["val"]
        else:  # the table form's [T, rot] table and arange(T), built at rewrite time
            cache_val = torch.empty(views[0].shape[0], rot, dtype=torch.float32,
                                    device=views[0].device)
            positions_val = torch.empty(views[0].shape[0], dtype=torch.int64,
                                        device=views[0].device)
        try:
            sections = getattr(q.trig, "sections", None)
            if sections is not None and not q.trig.table_form:
                validate_qk_mrope_cache(views[0], views[1], cache_val, positions_val, rot,
                                        list(sections), getattr(q.trig, "interleaved", False))
            else:
                validate_fused(views[0], views[1], cache_val, positions_val, rot)
        except ValueError as err:
            raise PlanError(f"the op would reject the call: {err}") from None
    table_shape = None
    if q.trig.table_form:
        val = q.base.meta["val"]
        tokens = [n for d, n in enumerate(val.shape[:-1]) if d != q.heads_dim]
        table_shape = _as_graph_ints([*tokens, rot], symbols)
    outputs = [layout for layout in map(_reader_layouts, (q, k)) if layout]
    return PairPlan(q, k, roots, tuple(chains), kwargs, None, table_shape, outputs)


def _plan_table_rows(q: RopeMatch, views) -> tuple[TableRows, TableRows] | None:
    """The model's cos and sin tables read in place by the tables op: ``[R, rot/2]`` rows (one
    cos/sin per pair), ``[R, rot]`` (full tables, halves not proven equal) or ``[3, R, n]``
    (mRoPE streams). None where there is no such reading: the pass then builds a ``[T, rot]``
    cache, as before, with the reason logged; forms no cache can hold (full tables, mRoPE
    streams) raise ``PlanError`` instead."""
    trig = q.trig
    width = trig.table_width(q.rotary_dim)
    val = q.base.meta["val"]
    token_shape = [n for d, n in enumerate(val.shape[:-1]) if d != q.heads_dim]
    # gpt-fast / torchtune pair picks keep x's heads dim (size 1); HF tables may have one.
    heads_dim = q.heads_dim if isinstance(trig, PairTables) else trig.table_heads_dim
    streams = trig.sections is not None
    no_cache = trig.full_width or streams

    def give_up(why: str) -> None:
        if no_cache:
            raise PlanError(f"{why} (no cos_sin_cache can hold "
                            f"{'mRoPE streams' if streams else 'full cos/sin tables'})")
        log.debug("rope_compile: building a cos/sin cache for %s: %s", q.output.name, why)
        count("tables built")

    found = []
    for view in (trig.cos_view, trig.sin_view):
        rows, why = table_rows(view, heads_dim, token_shape, width, streams)
        if rows is None:
            return give_up(why)
        found.append(rows)
    if getattr(trig, "negate_sin", False):  # the rotation by -θ: the op reads -sin
        found[1] = dataclasses.replace(found[1], negate=True)
    if getattr(trig, "adjoint_sin", False):  # full tables, the backward: -cat(sin2, sin1)
        found[1] = dataclasses.replace(found[1], negate=True, swap_halves=True)
    try:
        with torch._guards.detect_fake_mode([val]) or contextlib.nullcontext():
            tokens = views[0].shape[0]
            for rows in found:
                num_rows = rows.fake().shape[-2]
                if not statically_known_true(tokens % num_rows == 0):
                    raise ValueError(f"{num_rows} rows for {tokens} tokens")
    except Exception as err:
        return give_up(repr(err))
    if trig.full_width:
        log.debug("rope_compile: %s reads full cos/sin tables ([R, %d] rows): %s",
                  q.output.name, width, getattr(trig, "why", "") or "mRoPE streams")
    return found[0], found[1]


def _fake_call(kwargs: dict, like: torch.Tensor) -> tuple:
    """The fake value of ``auto_functionalized_v2(op, **kwargs)``: the op returns nothing, and
    each base comes back as a new tensor of the same layout (``clone_preserve_strides``). The
    op's checks already ran on the exact views in ``plan_pair``."""
    with torch._guards.detect_fake_mode([like]):
        bases = [base.meta["val"] for base in kwargs["_all_bases"]]
        return (None, *(torch._prims_common.clone_preserve_strides(b) for b in bases))


def rewrite_pair(tx: GraphTransaction, plan: PairPlan, tables: dict,
                 position: dict[Node, int] | None = None) -> dict:
    """Replace the two RoPE subgraphs by one functional call of the fused op, recording every
    mutation in ``tx``. Returns the cos/sin tables it built (table form), for the memo.
    ``position``: node -> index in the graph, computed once per round (new nodes take their
    anchor's)."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    graph = tx.graph
    q, k = plan.q, plan.k
    if position is None:
        position = {n: i for i, n in enumerate(graph.nodes)}
    # The call needs the roots, cache and positions: put it after the last of them
    # (stable_topological_sort, run after each round, orders the rest).
    inputs = [*plan.roots, *q.trig.reads()]
    anchor = max(inputs, key=position.__getitem__)
    built = {}
    if plan.table_rows is not None:
        # The model's own tables, read in place: [R, n] (or [3, R, n]) views, made once per
        # table.
        memo_key = ("rows", plan.table_rows)
        if memo_key in tables:
            cos_rows, sin_rows = tables[memo_key]
            anchor = max([anchor, sin_rows], key=position.__getitem__)
        else:
            where = position[anchor]
            cos_rows = plan.table_rows[0].build(tx, anchor)
            sin_rows = plan.table_rows[1].build(tx, cos_rows)
            anchor = sin_rows
            position.update({n: where for n in tx.new_nodes if n not in position})
            built[memo_key] = (cos_rows, sin_rows)
        kwargs = {"cos": cos_rows, "sin": sin_rows, **plan.kwargs}
        if q.trig.sections is not None:
            kwargs["mrope_section"] = list(q.trig.sections)
        call_op = _tables_op()
    else:
        call_op = _fused_op() if q.trig.sections is None else _mrope_op()
        # One [T, rot] table per distinct cos/sin source (and token shape), shared by every
        # layer that uses it; the gathered form is its own cache.
        memo_key = (q.trig.pairing_key(), plan.table_shape)
        if memo_key in tables:
            cache, positions = tables[memo_key]
            anchor = max([anchor, positions], key=position.__getitem__)
        else:
            where = position[anchor]
            anchor, cache, positions = q.trig.materialise(tx, anchor, q.rotary_dim,
                                                          q.heads_dim, plan.table_shape)
            if q.trig.table_form:  # new nodes: placed right after the anchor
                position.update({cache: where, positions: where})
                built[memo_key] = (cache, positions)
        kwargs = {"cos_sin_cache": cache, "positions": positions, **plan.kwargs}
        if q.trig.sections is not None:  # mRoPE: positions [3, T], columns by stream
            kwargs["mrope_section"] = list(q.trig.sections)
            if getattr(q.trig, "interleaved", False):  # Qwen3-VL's streams by column
                kwargs["mrope_interleaved"] = True
        if getattr(q.trig, "wrap_negative", False):
            # Gathered as cache[positions]: a negative position is a row from the end, as eager
            # (index_select / embedding raise there, as the op does by default).
            kwargs["wrap_negative_positions"] = True
    fake_result = _fake_call(kwargs, q.base.meta["val"])
    with graph.inserting_after(anchor):
        call = tx.record_new(graph.call_function(auto_functionalized_v2, (call_op,), kwargs))
    call.meta["val"] = fake_result
    new_roots = {}
    last = call
    for index, root in enumerate(plan.roots, start=1):
        with graph.inserting_after(last):
            last = tx.record_new(graph.call_function(operator.getitem, (call, index)))
        last.meta["val"] = fake_result[index]
        new_roots[root] = last
    relayouts = {id(match): (order, users) for match, order, users in plan.graph_outputs}
    for name, match, chain in (("q", q, plan.chains[0]), ("k", k, plan.chains[1])):
        root = plan.roots[kwargs[f"_{name}_base_index"]]
        new_value = tx.replay_views(chain, root, new_roots[root])
        if id(match) in relayouts:
            # What reaches the graph output keeps eager's layout and its own storage: those
            # users read a copy in eager's dim order (a contiguous clone, permuted into and
            # out of that order when it is not the identity).
            _, users = relayouts[id(match)]
            copied = copy_in_layout(tx, new_value, match.output.meta["val"], pin=False)
            # Only the graph output reads the copy: a view leading to it is replayed on the
            # copy for the output alone, and its other readers (a KV-cache write of the same
            # view) keep reading the rotated value in place.
            replayed: dict[Node, Node] = {}
            for user in users:
                if user.op == "output":
                    tx.replace_input(user, match.output, copied)
                    continue
                for end, chain in _views_read_by_output(user):
                    new_end = tx.replay_views(chain, match.output, copied, replayed)
                    for out_node in [u for u in end.users if u.op == "output"]:
                        tx.replace_input(out_node, end, new_end)
        # Views of the rotated output are re-created on the new value with fresh fake values
        # (a re-pointed view would keep a fake of the old storage, and the extension passes
        # prove layouts from them).
        rebase_views(tx, match.output, new_value)
    for root in plan.roots:
        _redirect_disjoint_views(tx, root, new_roots[root], call,
                                 [q.base.meta["val"][..., :q.rotary_dim],
                                  k.base.meta["val"][..., :k.rotary_dim]])
    return built


def _redirect_disjoint_views(tx: GraphTransaction, root: Node, new_root: Node, call: Node,
                             rotated: list[torch.Tensor]) -> None:
    """Make readers of ``root``'s views that are disjoint from the rotated regions (e.g. v of
    the same qkv projection) read the call's output instead, as functionalization would.

    Their values are identical either way, but while they read the old root Inductor cannot
    reinplace the call and copies the whole projection. Views that overlap q or k keep reading
    the pre-RoPE root (then Inductor copies, which is what those readers need)."""
    graph = tx.graph
    env: dict[Node, Node] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        for user in list(node.users):
            if user is call or user.graph is not graph or user in tx.new_nodes:
                continue
            if is_view_of_input(user):
                stack.append(user)
                continue
            if node is root:
                continue  # a direct reader of the whole root overlaps q and k
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or any(may_overlap(val, r) for r in rotated):
                continue
            _, chain = view_chain(node)
            # chain runs from the root: replay it on the new root for this reader.
            replayed = tx.replay_views(chain, root, new_root, env)
            tx.replace_input(user, node, replayed)


def _check_graph(graph: Graph) -> None:
    """Order the graph (rewrites insert calls after their last input) and lint it: raises on
    a cycle or a malformed graph."""
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(graph)
    graph.lint()


def _restore_order(graph: Graph, nodes: list[Node]) -> None:
    """Put ``nodes`` (every node of ``graph``) back in this order."""
    previous = nodes[0]
    for node in nodes[1:]:
        if previous.next is not node:
            previous.append(node)
        previous = node


def _source_files() -> list[str]:
    """Every source the rewrite and its lowering depend on: the passes and the package."""
    here = Path(__file__).resolve().parent
    package = Path(__import__("rope_compile").__file__).resolve().parent
    return sorted({str(p) for folder in (here, package) for p in folder.rglob("*.py")})


class FuseQKRopePass(CustomGraphPass):
    """The pass. Install into ``torch._inductor.config.post_grad_custom_post_pass``.

    Options: ``head_sizes`` rewritten (default 128, 256, 512), ``devices`` whose graphs are
    rewritten (default xpu, cuda; add "cpu" to force it on CPU), ``strict`` re-raises errors
    raised inside the pass instead of skipping the candidate that raised them,
    ``skip_pairs_only_read_by_copies`` (default True) leaves a pair whose rotated q and k are
    read only by layout copies to Inductor (``passes/layout_copy_rule.py``); False forces the
    rewrite.
    """

    def __init__(self, head_sizes: Iterable[int] = DEFAULT_HEAD_SIZES,
                 devices: Iterable[str] = DEFAULT_DEVICES, strict: bool = False,
                 skip_pairs_only_read_by_copies: bool = True) -> None:
        self.head_sizes, self.devices, self.strict = validate_pass_options(
            head_sizes, devices, strict)
        self.skip_pairs_only_read_by_copies = validate_skip_pairs_only_read_by_copies(
            skip_pairs_only_read_by_copies)
        self.calls = 0  # graphs this instance ran on (the backend reports cache hits)

    def __repr__(self) -> str:
        return (f"FuseQKRopePass(head_sizes={self.head_sizes}, devices={self.devices}, "
                f"strict={self.strict}, "
                f"skip_pairs_only_read_by_copies={self.skip_pairs_only_read_by_copies})")

    def uuid(self) -> bytes:
        """Inductor's FX graph cache key: every source the rewrite and its lowering depend on
        (by content, read each time: an edited file never serves a stale graph), and the
        options."""
        hasher = hashlib.sha256(repr(self).encode())
        for path in _source_files():
            hasher.update(Path(path).name.encode())
            hasher.update(Path(path).read_bytes())
        return hasher.digest()

    def __call__(self, graph: Graph) -> None:
        self.calls += 1
        committed = 0
        try:
            committed = self.apply(graph)
        except Exception as err:
            count("pass_errors")
            if self.strict:
                raise
            log.warning("rope_compile pass failed after committing %d pair(s); every pair is "
                        "committed whole or not at all: %r", committed, err, exc_info=True)

    def skip(self, match: RopeMatch, reason: str) -> None:
        count(f"skipped: {reason}")
        hint = option_hint(reason)
        log.debug("not rewriting RoPE at %s: %s%s", with_source(match.output), reason,
                  f"; to rewrite it: {hint}" if hint else "")
        record("skipped", "rope", (match.output,), reason)

    def report_misses(self, graph: Graph, outcomes: dict) -> None:
        """Count and log, once each, the RoPE-like candidates the matcher rejected."""
        try:
            misses = find_misses(graph, outcomes)
        except Exception as err:
            self._candidate_error("explaining misses", graph.output_node(), err)
            return
        for miss in misses:
            count(f"missed: {miss.reason}")
            detail = "" if miss.detail == miss.reason else f" [matcher: {miss.detail}]"
            log.debug("not rewriting RoPE-like %s: %s%s", with_source(miss.output), miss.reason,
                      detail)
            record("missed", "rope", (miss.output,), miss.reason, detail=miss.detail)

    def _candidate_error(self, what: str, node: Node, err: Exception) -> None:
        count("candidate_errors")
        if self.strict:
            raise err
        log.warning("rope_compile: error while %s at %s, candidate skipped: %r", what,
                    node.name, err, exc_info=True)

    def reject_reason(self, q: RopeMatch, k: RopeMatch, order: dict[Node, int]) -> str | None:
        """Why a structurally valid pair must not be rewritten by policy, or None."""
        sizes = {q.head_size, enclosing_head_size(q)}
        if not sizes & set(self.head_sizes):
            return f"head_size {q.head_size} not in {self.head_sizes}"
        if _device_type(q) not in self.devices or _device_type(k) != _device_type(q):
            return f"device {_device_type(q)} not in {self.devices}"
        if _depends_on(k.base, q.output, order) or _depends_on(q.base, k.output, order):
            return "k depends on the rotated q (or the reverse)"
        return None

    def _plan_round(self, graph: Graph, found: set, failed: set, outcomes: dict | None = None
                    ) -> tuple[list[PairPlan], list, bool]:
        """Analyse the graph without mutating it: the pairs to rewrite this round (on
        disjoint nodes), the misses, and whether some proven pair waits for a later round.
        ``outcomes`` receives each candidate's match or exception (see find_rope_matches)."""
        on_error = lambda node, err: self._candidate_error("matching", node, err)
        pairs, unpaired = pair_matches(find_rope_matches(graph, on_error, outcomes))
        symbols = _graph_symbols(graph)
        order = {n: i for i, n in enumerate(graph.nodes)}
        skips = list(unpaired)
        plans, touched, deferred = [], set(), False
        for q, k in pairs:
            names = (q.output.name, k.output.name)
            if names not in found:
                found.add(names)
                count("pairs_found")
            if names in failed:
                continue
            try:
                reason = self.reject_reason(q, k, order)
                if reason:
                    skips.append((q, reason))
                    continue
                plan = plan_pair(q, k, symbols)
                if (self.skip_pairs_only_read_by_copies
                        and read_only_by_layout_copies(q.output, k.output)):
                    skips.append((q, COPY_ONLY_REASON))  # the rewrite would save nothing
                    continue
            except PlanError as why:
                skips.append((q, str(why)))
                continue
            except Exception as err:
                self._candidate_error("planning", q.output, err)
                continue
            # Pairs on one root (axial RoPE, several pairs of one projection) and a RoPE of a
            # RoPE output wait for the next round, which re-analyses the rewritten graph.
            if plan.reads() & touched:
                deferred = True
                continue
            plans.append(plan)
            touched |= plan.touched()
        return plans, skips, deferred

    def _rewrite(self, graph: Graph, plans: list[PairPlan], tables: dict, failed: set,
                 check_each: bool) -> tuple[list[tuple[PairPlan, GraphTransaction]], dict]:
        """Rewrite each plan in its own transaction; a failing one is rolled back alone.
        Returns the rewritten plans and the cos/sin table memo including their tables."""
        done, tables = [], dict(tables)
        position = {n: i for i, n in enumerate(graph.nodes)}
        for plan in plans:
            tx = GraphTransaction(graph)
            # Only a check sorts the graph: without one, a rollback leaves the order as it was.
            order = list(graph.nodes) if check_each else None
            try:
                built = rewrite_pair(tx, plan, tables,
                                     None if check_each else position)
                if check_each:
                    _check_graph(graph)
            except Exception as err:
                tx.rollback()
                if order is not None:
                    _restore_order(graph, order)
                failed.add((plan.q.output.name, plan.k.output.name))
                self._candidate_error("rewriting", plan.q.output, err)
                continue
            tables.update(built)
            done.append((plan, tx))
        return done, tables

    def apply(self, graph: Graph) -> int:
        """Rewrite every accepted pair; returns the number rewritten.

        Each round analyses the graph without mutating it, then rewrites the pairs that touch
        disjoint nodes, each in its own transaction; the round is committed once the graph
        sorts (no cycle) and lints. If it does not, the round is undone and its pairs are
        retried one by one, each checked on its own. Rounds repeat while they rewrite."""
        rewritten = 0
        found: set[tuple[str, str]] = set()
        failed: set[tuple[str, str]] = set()
        tables: dict = {}
        while True:
            outcomes: dict = {}
            plans, skips, deferred = self._plan_round(graph, found, failed, outcomes)
            order = list(graph.nodes)
            done, round_tables = self._rewrite(graph, plans, tables, failed, check_each=False)
            try:
                if done:
                    _check_graph(graph)
            except Exception as err:
                for _, tx in reversed(done):
                    tx.rollback()
                _restore_order(graph, order)
                log.debug("rope_compile: round failed its check (%r); retrying pair by pair",
                          err)
                done, round_tables = self._rewrite(graph, plans, tables, failed,
                                                   check_each=True)
            tables = round_tables
            for plan, tx in done:
                inherit_source(tx.new_nodes, plan.q.output)
                record("fused", "rope", (plan.q.output, plan.k.output),
                       f"rotary_dim={plan.q.rotary_dim}, head_size={plan.q.head_size}, "
                       f"{'neox' if plan.q.is_neox else 'GPT-J'}", calls=tx.new_nodes)
                tx.commit(also_dead=[plan.q.output, plan.k.output, *plan.q.nodes,
                                     *plan.k.nodes])
                rewritten += 1
                count("rewritten")
                q, k = plan.q, plan.k
                log.info("rope_compile: fused the RoPE of %s and %s into one in-place call "
                         "(rotary_dim=%d, head_size=%d, %s)", q.output.name, k.output.name,
                         q.rotary_dim, q.head_size, "neox" if q.is_neox else "GPT-J")
            if not done and not deferred:
                for match, reason in skips:  # final round: each miss counted once
                    self.skip(match, reason)
                self.report_misses(graph, outcomes)
                return rewritten
