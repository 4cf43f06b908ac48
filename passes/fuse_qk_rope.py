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

Only pairs that share positions, cache, style, rotary_dim and head size, whose head size is
in ``head_sizes`` and whose device type is in ``devices`` are rewritten; every other candidate
is left untouched, with the reason logged at DEBUG and counted in
``torch._dynamo.utils.counters["rope_compile"]``.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.multiprocessing.reductions import StorageWeakRef

from rope_compile.validation import may_overlap

from . import rope_pattern
from .rope_pattern import NoMatch, RopeMatch, match_rope

log = logging.getLogger("rope_compile")

DEFAULT_HEAD_SIZES = (128, 256, 512)
DEFAULT_DEVICES = ("xpu", "cuda")

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


def count(name: str, amount: int = 1) -> None:
    counters["rope_compile"][name] += amount


def find_rope_matches(graph: Graph) -> list[RopeMatch]:
    """Every proven RoPE application in ``graph``, in graph order."""
    matches = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _CANDIDATE_TARGETS:
            continue
        try:
            matches.append(match_rope(node))
        except NoMatch:
            continue
    # A partial-rotary RoPE also contains a full RoPE of its x[..., :rot] slice: keep the
    # outermost match only.
    inner = {n for m in matches for n in m.nodes if n is not m.output}
    return [m for m in matches if m.output not in inner]


def _describe_difference(a: RopeMatch, b: RopeMatch) -> str:
    if (a.positions is None) != (b.positions is None):
        return "q and k take cos/sin in different forms (cache gather vs tables)"
    if a.sin_table is not b.sin_table:
        return "q and k use different sin tables"
    if a.positions is not b.positions:
        return "q and k use different positions"
    if a.cache is not b.cache:
        return "q and k use different cos_sin_caches"
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


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def _depends_on(node: Node, target: Node) -> bool:
    return node is target or target in _ancestors(node)


def _device_type(match: RopeMatch) -> str:
    return match.base.meta["val"].device.type


aten = torch.ops.aten
# Ops whose output aliases their (first) input's storage; what the chain from a storage root
# to x may consist of.
_VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             aten.slice.Tensor, aten.as_strided.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.permute.default, aten.transpose.int, aten.t.default,
             aten.split.Tensor, aten.split_with_sizes.default, aten.alias.default)


def _is_view_of_input(node: Node) -> bool:
    """``node`` is a view op (or getitem of a split) sharing its input's storage."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, Node) and src.target in (aten.split.Tensor,
                                                        aten.split_with_sizes.default)
    if node.target not in _VIEW_OPS or not isinstance(node.args[0], Node):
        return False
    if node.target in (aten.split.Tensor, aten.split_with_sizes.default):
        return True
    val, src_val = node.meta.get("val"), node.args[0].meta.get("val")
    return (isinstance(val, torch.Tensor) and isinstance(src_val, torch.Tensor)
            and StorageWeakRef(val.untyped_storage()) == StorageWeakRef(src_val.untyped_storage()))


def view_chain(node: Node) -> tuple[Node, list[Node]]:
    """(storage root, view nodes from the root (exclusive) to ``node`` (inclusive))."""
    chain = []
    while _is_view_of_input(node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _replay(graph: Graph, chain: list[Node], old_root: Node, new_root: Node) -> Node:
    """Re-apply the view ``chain`` (built on ``old_root``) on ``new_root``; returns the last."""
    env = {old_root: new_root}
    last = new_root
    for node in chain:
        with graph.inserting_after(last):
            last = graph.node_copy(node, lambda n: env.get(n, n))
        env[node] = last
    return last


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
                raise PlanError(f"symbolic size {expr} has no node in the graph")
        else:
            out.append(int(value))
    return tuple(out)


@dataclass
class PairPlan:
    q: RopeMatch
    k: RopeMatch
    roots: list[Node]
    chains: tuple[list[Node], list[Node]]
    kwargs: dict
    # Table form: the [..tokens.., rot] shape the cos/sin tables are expanded to (graph ints).
    table_shape: tuple | None = None


def _token_view(match: RopeMatch) -> tuple[list, list, object]:
    """(size, stride, storage_offset) of x[..., :rot] seen as [tokens, heads, rot]: the token
    dims (all but heads and features) must merge into one, as a view."""
    val = match.base.meta["val"]
    dims = [d for d in range(val.dim() - 1) if d != match.heads_dim]
    size, stride = val.shape[dims[-1]], val.stride(dims[-1])
    for outer in reversed(dims[:-1]):
        if not statically_known_true(val.stride(outer) == size * stride):
            raise PlanError("x's token dims do not merge into one without a copy")
        size = size * val.shape[outer]
    return ([size, val.shape[match.heads_dim], match.rotary_dim],
            [stride, val.stride(match.heads_dim), 1], val.storage_offset())


def plan_pair(q: RopeMatch, k: RopeMatch, symbols: dict) -> PairPlan:
    """Everything the rewrite needs, computed without touching the graph."""
    rot = q.rotary_dim
    kwargs = {"cos_sin_cache": q.cache, "positions": q.positions, "rotary_dim": rot,
              "is_neox": q.is_neox}
    roots: list[Node] = []
    chains = []
    for name, match in (("q", q), ("k", k)):
        root, chain = view_chain(match.base)
        if root not in roots:
            roots.append(root)
        chains.append(chain)
        # The op's argument x[..., :rot] as [T, H, rot], described against the root's storage.
        size, stride, offset = _token_view(match)
        kwargs[f"_{name}_base_index"] = roots.index(root)
        kwargs[f"_{name}_size"] = _as_graph_ints(size, symbols)
        kwargs[f"_{name}_stride"] = _as_graph_ints(stride, symbols)
        kwargs[f"_{name}_storage_offset"] = _as_graph_ints([offset], symbols)[0]
    kwargs["_all_bases"] = roots
    table_shape = None
    if q.sin_table is not None:
        val = q.base.meta["val"]
        tokens = [n for d, n in enumerate(val.shape[:-1]) if d != q.heads_dim]
        table_shape = _as_graph_ints([*tokens, rot], symbols)
    return PairPlan(q, k, roots, tuple(chains), kwargs, table_shape)


def _add_node(graph: Graph, after: Node, target, args, kwargs=None) -> Node:
    """Insert ``target(*args, **kwargs)`` after ``after``, with its fake value as meta."""
    kwargs = kwargs or {}
    with graph.inserting_after(after):
        node = graph.call_function(target, tuple(args), kwargs)
    fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    fake_tensors = [a for a in torch.utils._pytree.tree_leaves(fake_args)
                    if isinstance(a, torch.Tensor)]
    with torch._guards.detect_fake_mode(fake_tensors):
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def _materialise_tables(graph: Graph, after: Node, plan: PairPlan) -> tuple[Node, Node, Node]:
    """Table form: build ``cos_sin_cache = cat(cos[..., :rot/2], sin[..., :rot/2])`` as
    ``[T, rot]`` (expanded over broadcast token dims) and ``positions = arange(T)`` from the
    model's own cos/sin tables, whose two halves the matcher proved equal.
    Returns (last node, cache, positions)."""
    match = plan.q
    half = match.rotary_dim // 2
    if match.tables_have_heads:  # interleaved form: [.., 1, .., rot/2] picks, squeeze heads
        cos_half = _add_node(graph, after, aten.squeeze.dim, (match.cache, match.heads_dim))
        sin_half = _add_node(graph, cos_half, aten.squeeze.dim,
                             (match.sin_table, match.heads_dim))
    else:  # HF form: duplicated halves, keep the first
        cos_half = _add_node(graph, after, aten.slice.Tensor, (match.cache, -1, 0, half))
        sin_half = _add_node(graph, cos_half, aten.slice.Tensor, (match.sin_table, -1, 0, half))
    table = _add_node(graph, sin_half, aten.cat.default, ([cos_half, sin_half], -1))
    table = _add_node(graph, table, aten.expand.default, (table, list(plan.table_shape)))
    cache = _add_node(graph, table, aten.reshape.default, (table, [-1, match.rotary_dim]))
    tokens = cache.meta["val"].shape[0]
    last = cache
    if not isinstance(tokens, int):  # symbolic: read it off the table (a SymInt node)
        tokens = last = _add_node(graph, cache, aten.sym_size.int, (cache, 0))
    positions = _add_node(graph, last, torch.ops.prims.iota.default, (tokens,), {
        "start": 0, "step": 1, "dtype": torch.int64, "device": cache.meta["val"].device,
        "requires_grad": False})
    return positions, cache, positions


def _fake_call(plan: PairPlan):
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    def fake(arg):
        return arg.meta["val"]

    fake_kwargs = torch.fx.node.map_arg(plan.kwargs, fake)
    with torch._guards.detect_fake_mode([plan.q.base.meta["val"]]):
        return auto_functionalized_v2(_fused_op(), **fake_kwargs)


def rewrite_pair(graph: Graph, plan: PairPlan, tables: dict | None = None) -> None:
    """Replace the two RoPE subgraphs by one functional call of the fused op."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    q, k = plan.q, plan.k
    # The call needs the roots, cache and positions: put it after the last of them
    # (stable_topological_sort, run by Inductor right after custom passes, orders the rest).
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [*plan.roots, q.cache, q.positions if q.sin_table is None else q.sin_table]
    anchor = max(inputs, key=order.__getitem__)
    if q.sin_table is not None:
        # One [T, rot] table per distinct cos/sin source, shared by every layer that uses it.
        memo_key = (q.key[0], plan.table_shape)
        if tables is not None and memo_key in tables:
            cache, positions = tables[memo_key]
            anchor = max([anchor, positions], key=order.__getitem__)
        else:
            anchor, cache, positions = _materialise_tables(graph, anchor, plan)
            if tables is not None:
                tables[memo_key] = (cache, positions)
        plan.kwargs.update(cos_sin_cache=cache, positions=positions)
    fake_result = _fake_call(plan)
    with graph.inserting_after(anchor):
        call = graph.call_function(auto_functionalized_v2, (_fused_op(),), plan.kwargs)
    call.meta["val"] = fake_result
    new_roots = {}
    last = call
    for index, root in enumerate(plan.roots, start=1):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (call, index))
        last.meta["val"] = fake_result[index]
        new_roots[root] = last
    for name, match, chain in (("q", q, plan.chains[0]), ("k", k, plan.chains[1])):
        root = plan.roots[plan.kwargs[f"_{name}_base_index"]]
        new_value = _replay(graph, chain, root, new_roots[root])
        match.output.replace_all_uses_with(new_value)
    for match in (q, k):
        _erase_dead(graph, [match.output, *match.nodes])
    for root in plan.roots:
        _redirect_disjoint_views(graph, root, new_roots[root], call,
                                 [q.base.meta["val"][..., :q.rotary_dim],
                                  k.base.meta["val"][..., :k.rotary_dim]])


def _redirect_disjoint_views(graph: Graph, root: Node, new_root: Node, call: Node,
                             rotated: list[torch.Tensor]) -> None:
    """Make readers of ``root``'s views that are disjoint from the rotated regions (e.g. v of
    the same qkv projection) read the call's output instead, as functionalization would.

    Their values are identical either way, but while they read the old root Inductor cannot
    reinplace the call and copies the whole projection. Views that overlap q or k keep reading
    the pre-RoPE root (then Inductor copies, which is what those readers need)."""
    stack = [root]
    while stack:
        node = stack.pop()
        for user in list(node.users):
            if user is call or user.graph is not graph:
                continue
            if _is_view_of_input(user):
                stack.append(user)
                continue
            if node is root:
                continue  # a direct reader of the whole root overlaps q and k
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or any(may_overlap(val, r) for r in rotated):
                continue
            _, chain = view_chain(node)
            # chain runs from the root: replay it on the new root for this reader.
            replayed = _replay(graph, chain, root, new_root)
            user.replace_input_with(node, replayed)
            _erase_dead(graph, [node])


def _erase_dead(graph: Graph, nodes: Iterable[Node]) -> None:
    """Erase the matched nodes (and their now-unused inputs) that nothing uses any more."""
    worklist = list(nodes)
    while worklist:
        node = worklist.pop()
        if node.graph is not graph or node.op != "call_function" or node.users:
            continue
        if node._erased or node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        worklist.extend(inputs)


class FuseQKRopePass(CustomGraphPass):
    """The pass. Install into ``torch._inductor.config.post_grad_custom_post_pass``.

    Options: ``head_sizes`` rewritten (default 128, 256, 512), ``devices`` whose graphs are
    rewritten (default xpu, cuda; add "cpu" to force it on CPU), ``strict`` re-raises errors
    raised inside the pass instead of leaving the graph unchanged with a warning.
    """

    def __init__(self, head_sizes: Iterable[int] = DEFAULT_HEAD_SIZES,
                 devices: Iterable[str] = DEFAULT_DEVICES, strict: bool = False) -> None:
        self.head_sizes = tuple(int(h) for h in head_sizes)
        self.devices = tuple(str(d) for d in devices)
        self.strict = bool(strict)

    def __repr__(self) -> str:
        return (f"FuseQKRopePass(head_sizes={self.head_sizes}, devices={self.devices}, "
                f"strict={self.strict})")

    def uuid(self) -> bytes:
        files = (__file__, rope_pattern.__file__)
        return hashlib.sha256(get_hash_for_files(files, repr(self))).digest()

    def __call__(self, graph: Graph) -> None:
        try:
            self.apply(graph)
        except Exception as err:
            count("pass_errors")
            if self.strict:
                raise
            log.warning("rope_compile pass failed, graph left unchanged: %r", err, exc_info=True)

    def skip(self, match: RopeMatch, reason: str) -> None:
        count(f"skipped: {reason}")
        log.debug("not rewriting RoPE at %s: %s", match.output.name, reason)

    def reject_reason(self, q: RopeMatch, k: RopeMatch) -> str | None:
        """Why a structurally valid pair must not be rewritten, or None."""
        if q.head_size not in self.head_sizes:
            return f"head_size {q.head_size} not in {self.head_sizes}"
        if _device_type(q) not in self.devices or _device_type(k) != _device_type(q):
            return f"device {_device_type(q)} not in {self.devices}"
        if _depends_on(k.base, q.output) or _depends_on(q.base, k.output):
            return "k depends on the rotated q (or the reverse)"
        q_rot = q.base.meta["val"][..., :q.rotary_dim]
        k_rot = k.base.meta["val"][..., :k.rotary_dim]
        if StorageWeakRef(q_rot.untyped_storage()) == StorageWeakRef(
                k_rot.untyped_storage()) and may_overlap(q_rot, k_rot):
            return "q and k overlap in memory (an in-place call would rotate twice)"
        return None

    def apply(self, graph: Graph) -> int:
        """Rewrite every accepted pair; returns the number rewritten.

        Each round analyses the graph without mutating it, then rewrites the pairs that do not
        depend on each other; a pair whose input is another pair's output (RoPE of a RoPE) waits
        for the next round, which re-analyses the rewritten graph."""
        rewritten = 0
        found: set[tuple[str, str]] = set()
        tables: dict = {}
        while True:
            pairs, unpaired = pair_matches(find_rope_matches(graph))
            symbols = _graph_symbols(graph)
            skips = [(match, reason) for match, reason in unpaired]
            plans, claimed_outputs, claimed_inputs = [], set(), set()
            for q, k in pairs:
                if (q.output.name, k.output.name) not in found:
                    found.add((q.output.name, k.output.name))
                    count("pairs_found")
                reason = self.reject_reason(q, k)
                if reason:
                    skips.append((q, reason))
                    continue
                inputs = {q.base, k.base} | _ancestors(q.base) | _ancestors(k.base)
                if inputs & claimed_outputs or {q.output, k.output} & claimed_inputs:
                    continue  # chained on a pair rewritten this round: next round
                try:
                    plans.append(plan_pair(q, k, symbols))
                except PlanError as why:
                    skips.append((q, str(why)))
                    continue
                claimed_outputs |= {q.output, k.output}
                claimed_inputs |= inputs
            for plan in plans:
                rewrite_pair(graph, plan, tables)
                rewritten += 1
                count("rewritten")
                q, k = plan.q, plan.k
                log.info("rope_compile: fused the RoPE of %s and %s into one in-place call "
                         "(rotary_dim=%d, head_size=%d, %s)", q.output.name, k.output.name,
                         q.rotary_dim, q.head_size, "neox" if q.is_neox else "GPT-J")
            if not plans:
                for match, reason in skips:  # final round: each miss counted once
                    self.skip(match, reason)
                return rewritten
