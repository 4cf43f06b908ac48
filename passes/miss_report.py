"""Explain every miss: the RoPE-like subgraphs the matcher rejected, each with one reason.

``match_rope`` proves a candidate or raises ``NoMatch``; on its own that leaves a rejected RoPE
silent. This module finds, in one linear walk, the subgraphs that *look* like RoPE and were not
proven, and says for each the first proof step that failed, in a model author's words::

    o1 = x1 * cos - x2 * sin          (or HF: x * cos + rotate_half(x) * sin)
    o2 = x2 * cos + x1 * sin          \\  "products": a multiply of a part of x by a cos/sin factor
    out = cat(o1, o2)                 <-- the candidate output (one per RoPE, the outermost)

A *cos/sin factor* is a tensor reached, through casts, views, slices, unsqueeze, expand, splits
and multiplies by a scalar, from an ``aten.cos``/``aten.sin`` node, from rows gathered out of a
table (``index``, ``index_select``, ``embedding``, ``gather``), or from a float graph input
unsqueezed or broadcast in its product (HF cos/sin computed in another graph, passed in already
shaped ``[1, 1, S, D]``, or a ``[T, D]`` table). A *RoPE-like* candidate is an
add or sub of two such products whose other operands are two different parts of one tensor (its
two halves, or ``x`` and ``rotate_half(x)``), climbed up to the node that consumes the products
(the ``cat`` of the halves, a partial-rotary ``cat`` with the tail, a cast). ``x * sin(x)`` alone,
attention, MLPs and norms have no such pair, and are never reported.

A candidate whose products belong to a proven match is not a miss (the pass counts those as
``skipped: <reason>`` or rewrites them). The reason of a miss is the ``NoMatch`` message of its
outermost candidate node (a ``NearMiss`` first), in the words of ``_FRIENDLY`` where the
matcher's are terse.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .rope_pattern import NearMiss, NoMatch, RopeMatch

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["BACKWARD_REASON", "GRAPH_INPUT_TABLES", "Miss", "find_misses", "looks_like_rope"]

_CASTS = (prims.convert_element_type.default, aten._to_copy.default)
# Ops that pass their first tensor argument's values through, rearranged (walked back over;
# slice_scatter keeps the rest of its first argument: sglang's interleaved mRoPE tables, when
# their proof fails).
_PASS_THROUGH = (*_CASTS, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                 aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim,
                 aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
                 aten.permute.default, aten.transpose.int, aten.clone.default, aten.alias.default,
                 aten.split.Tensor, aten.split_with_sizes.default, operator.getitem,
                 aten.slice_scatter.default)
_GATHERS = (aten.index.Tensor, aten.index_select.default, aten.embedding.default,
            aten.gather.default)
_TRIG = (aten.cos.default, aten.sin.default)
_SCALE = (aten.mul.Tensor, aten.div.Tensor)
_COMBINE = (aten.add.Tensor, aten.sub.Tensor)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)

GRAPH_INPUT_TABLES = ("cos/sin are graph inputs (computed outside this graph): their equal "
                      "halves cannot be proven")

# The matcher's terse messages (substring, regex allowed) -> a model author's words.
_FRIENDLY = (
    (r"cos/sin table is not cos\(\) or sin\(\) of an angle table",
     "cos/sin tables are not cos()/sin() of angles computed in this graph: their equal halves "
     "cannot be proven"),
    (r"rotate_half's first half is not negated",
     "rotate_half is not cat(-x2, x1): its first half is not negated (halves swapped?)"),
    (r"cos term does not multiply the same x\[\.\.\., :rot\]",
     "rotate_half(x) does not rotate the x that multiplies cos (halves swapped, or another "
     "tensor)"),
    (r"rotate_half is not a cat of two halves", "rotate_half(x) is not a cat of x's two halves"),
    (r"a half is not a sum or difference of products",
     "a half is not x1 * cos - x2 * sin or x2 * cos + x1 * sin (not a sum or difference of two "
     "products)"),
    (r"second half is not x2\*cos \+ x1\*sin",
     "second half is not x2 * cos + x1 * sin (signs, halves or cos and sin swapped; the "
     "rotation by -θ is x1 * cos + x2 * sin, x2 * cos - x1 * sin)"),
    (r"cos/sin do not come from a cache row gather \(found (?P<op>[^)]+)\)",
     "cos/sin are not plain rows of a cos_sin_cache: {op} between the gather and the multiply "
     "is not followed (an unrelated scale?)"),
    (r"cos/sin are not the two halves of a \[max_position, rot\] cos_sin_cache",
     "cos and sin are not the first and second halves of the cos_sin_cache rows (cos and sin "
     "swapped?)"),
    (r"product is not features times a \[T, 1, n\] cos/sin factor",
     "a product is not x times a cos/sin factor broadcast over heads ([T, 1, n])"),
)


def _friendly(message: str) -> str:
    for pattern, words in _FRIENDLY:
        found = re.search(pattern, message)
        if found:
            return words.format(**found.groupdict())
    return message


@dataclass(frozen=True)
class _Origin:
    """Where a tensor's values come from, walking back over ``_PASS_THROUGH`` ops."""

    trig: bool  # an aten.cos / aten.sin node
    gathered: bool  # rows gathered from a table on the way
    unsqueezed: bool  # unsqueezed (broadcast) on the way
    leaf: Node | None  # the graph input or buffer reached (None: an op outside the walk)


_NOWHERE = _Origin(False, False, False, None)


def _float_input(node: Node) -> bool:
    val = node.meta.get("val")
    return (node.op in ("placeholder", "get_attr") and isinstance(val, torch.Tensor)
            and val.dtype.is_floating_point)


def _is_scalar(value) -> bool:
    if isinstance(value, (int, float)):
        return True
    val = value.meta.get("val") if isinstance(value, Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 0


class _Walker:
    """Memoised walks back from a node, so the detector stays linear in the graph's size."""

    # A cos/sin factor is a few ops from its source: a longer walk (a chain of hundreds of cats
    # or views) stops there, rather than recursing as deep.
    MAX_DEPTH = 64

    def __init__(self) -> None:
        self.origins: dict[Node, _Origin] = {}
        self.bases: dict[Node, Node] = {}

    def origin(self, node: Node, depth: int = 0) -> _Origin:
        if node in self.origins:
            return self.origins[node]
        if depth > self.MAX_DEPTH:
            return _NOWHERE
        depth += 1
        if node.op in ("placeholder", "get_attr"):
            found = _Origin(False, False, False, node)
        elif node.op != "call_function":
            found = _NOWHERE
        elif node.target in _TRIG:
            found = _Origin(True, False, False, None)
        elif node.target in _GATHERS and isinstance(node.args[0], Node):
            up = self.origin(node.args[0], depth)
            found = _Origin(up.trig, True, up.unsqueezed, up.leaf)
        elif node.target is aten.cat.default:
            parts = [self.origin(p, depth) for p in node.args[0] if isinstance(p, Node)]
            found = next((p for p in parts if p.trig or p.leaf is not None), _NOWHERE)
        elif node.target in _SCALE and len(node.args) == 2 and (
                isinstance(node.args[0], Node) and _is_scalar(node.args[1])):
            found = self.origin(node.args[0], depth)
        elif node.target in _SCALE and len(node.args) == 2 and (
                isinstance(node.args[1], Node) and _is_scalar(node.args[0])):
            found = self.origin(node.args[1], depth)
        elif node.target in _PASS_THROUGH and node.args and isinstance(node.args[0], Node):
            up = self.origin(node.args[0], depth)
            found = _Origin(up.trig, up.gathered,
                            up.unsqueezed or node.target is aten.unsqueeze.default, up.leaf)
        else:
            found = _NOWHERE
        self.origins[node] = found
        return found

    def trig_kind(self, node, broadcast: bool = False) -> str | None:
        """"computed", "gathered" or "input" if ``node`` looks like a cos/sin factor;
        ``broadcast``: ``node`` is broadcast in its product (a float input already shaped
        ``[1, 1, S, D]`` or ``[T, D]`` is a table even with no unsqueeze in the graph)."""
        if not isinstance(node, Node):
            return None
        found = self.origin(node)
        if found.trig:
            return "computed"
        if found.leaf is not None and found.gathered:
            return "gathered"
        if found.leaf is not None and (found.unsqueezed or broadcast) and _float_input(
                found.leaf):
            return "input"
        return None

    def base(self, node: Node, depth: int = 0) -> Node:
        """The tensor ``node`` is a part of: through casts, views, slices, splits, ``neg`` and
        ``rotate_half``'s ``cat`` of two parts of one tensor."""
        if node in self.bases:
            return self.bases[node]
        if depth > self.MAX_DEPTH:
            return node
        depth += 1
        found = node
        if node.op == "call_function":
            if node.target is aten.cat.default and len(node.args[0]) == 2 and all(
                    isinstance(p, Node) for p in node.args[0]):
                first, second = (self.base(p, depth) for p in node.args[0])
                found = first if first is second else node
            elif (node.target in (*_PASS_THROUGH, aten.neg.default) and node.args
                  and isinstance(node.args[0], Node)):
                found = self.base(node.args[0], depth)
        self.bases[node] = found
        return found


@dataclass(frozen=True)
class _Product:
    node: Node  # the mul
    x: Node  # the part of x it multiplies (casts stripped)
    base: Node  # the tensor that part is taken from
    kind: str  # "computed", "gathered" or "input": where its cos/sin factor comes from


def _strip_casts(node: Node) -> Node:
    while isinstance(node, Node) and node.target in _CASTS:
        node = node.args[0]
    return node


def _broadcast_in(operand: Node, product: Node) -> bool:
    """``operand`` has fewer elements than the ``product`` it is multiplied into (broadcast)."""
    a, b = operand.meta.get("val"), product.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dim() < b.dim():
        return True
    return a.dim() == b.dim() and any(
        isinstance(x, int) and x == 1 and not (isinstance(y, int) and y == 1)
        for x, y in zip(a.shape, b.shape, strict=True))


_ZERO_FILLS = (aten.full.default, aten.zeros.default, aten.new_zeros.default)


def _is_zeros(node) -> bool:
    if not isinstance(node, Node) or node.target not in _ZERO_FILLS:
        return False
    return node.target is not aten.full.default or (len(node.args) > 1 and node.args[1] == 0)


def _into_zeros(node) -> bool:
    """``node`` places its source into zeros (``select_scatter`` / ``slice_scatter``)."""
    return isinstance(node, Node) and node.target in (
        aten.select_scatter.default, aten.slice_scatter.default) and len(node.args) > 1 and (
        _is_zeros(node.args[0]))


def _product(walker: _Walker, node) -> _Product | None:
    """``node`` = (a part of x) * (a cos/sin factor), either order; or such a product placed
    into zeros by ``select_scatter`` / ``slice_scatter`` (torchtune's backward puts each pair
    product into its slot of ``[.., n/2, 2]`` zeros)."""
    while _into_zeros(node):
        node = node.args[1]
    if not isinstance(node, Node) or node.target is not aten.mul.Tensor or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    for x, factor in ((a, b), (b, a)):
        kind = walker.trig_kind(factor, _broadcast_in(factor, node))
        if kind is not None and walker.trig_kind(x, _broadcast_in(x, node)) is None:
            return _Product(node, _strip_casts(x), walker.base(x), kind)
    return None


def _transposed_product(walker: _Walker, node) -> _Product | None:
    """``node`` = ``rotate_half``'s transpose applied after the product: HF's backward of
    ``x * cos + rotate_half(x) * sin`` rotates ``y = g * sin`` as ``cat(y2, -y1)``, spelled
    ``slice_scatter(zeros, -y1, [h:]) + slice_scatter(zeros, y2, [:h])`` (``rotate_every_two``'s:
    the pairs of ``y.view(.., n/2, 2)`` scattered at step 2). The product y."""
    if not isinstance(node, Node) or node.target is not aten.add.Tensor or len(node.args) != 2:
        return None
    found = []
    for scatter in node.args:
        if not (_into_zeros(scatter) and scatter.target is aten.slice_scatter.default):
            return None
        part = scatter.args[1]  # [-]y[..., a:b] (neox), [-]y.view(.., n/2, 2)[..., j] (GPT-J)
        while isinstance(part, Node) and part.target in (aten.neg.default, aten.slice.Tensor,
                                                          aten.select.int, *_VIEWS, *_CASTS):
            part = part.args[0]
        found.append(part)
    if found[0] is not found[1]:
        return None
    return _product(walker, found[0])


def looks_like_rope(node: Node, walker: _Walker | None = None) -> tuple[_Product, _Product] | None:
    """If ``node`` adds or subtracts two cos/sin products of two different parts of one tensor
    (``x1 * cos - x2 * sin``, ``x * cos + rotate_half(x) * sin``, or the backward's
    ``g * cos + rotate_half^T(g * sin)``): the two products."""
    walker = walker or _Walker()
    if node.op != "call_function" or node.target not in _COMBINE or len(node.args) != 2:
        return None
    first, second = (_product(walker, arg) for arg in node.args)
    if node.target is aten.add.Tensor and (first is None) != (second is None):
        other = node.args[0] if first is None else node.args[1]
        turned = _transposed_product(walker, other)
        if turned is not None and turned.base is (first or second).base:
            return (first or turned), (second or turned)
    if first is None or second is None or first.base is not second.base:
        return None
    if first.x is second.x and not all(_into_zeros(a) for a in node.args):
        return None  # x * cos + x * sin is no rotation; placed pair products are (torchtune's)
    return first, second



BACKWARD_REASON = ("the backward of RoPE (a gradient rotated by -θ) is not fused yet: "
                   "Inductor's kernel runs it")


def _is_backward(products: tuple[_Product, _Product]) -> bool:
    """Both products multiply the same x (the transposed form, ``looks_like_rope``), or x is
    computed from a ``tangents_*`` input of an AOTAutograd backward graph (a gradient; a
    recomputed forward reads only the forward's saved values)."""
    if products[0].x is products[1].x:
        return True
    stack, seen = [products[0].base], set()
    while stack and len(seen) < 4096:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder" and node.name.startswith("tangents"):
            return True
        stack.extend(n for n in node.all_input_nodes if n not in seen)
    return False


def _single_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _last_dim(node: Node, dim) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and isinstance(dim, int) and dim in (-1, val.dim() - 1)


def _cat_dim(node: Node):
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _candidate_chain(combine: Node) -> list[Node]:
    """The candidate outputs above ``combine``, innermost first: the rotated block (the ``cat``
    of the two halves, GPT-J's flattened stack, or HF's sum itself), then a partial-rotary
    ``cat`` with the tail and a cast, as ``match_rotated_block`` reads them."""
    node = combine
    user = _single_user(node)
    # Up to the cat of the halves (through casts, scales, GPT-J's unsqueeze).
    while user is not None and (user.target in _CASTS or user.target is aten.unsqueeze.default
                                or (user.target in _SCALE and any(
                                    _is_scalar(a) for a in user.args))):
        node, user = user, _single_user(user)
    if user is not None and user.target is aten.cat.default and len(user.args[0]) == 2 and (
            _last_dim(user, _cat_dim(user))):
        node = user
        flat = _single_user(node)
        if flat is not None and flat.target in _VIEWS and all(
                p.target is aten.unsqueeze.default for p in node.args[0]):
            node = flat  # GPT-J: stack((o1, o2), -1).flatten(-2)
    else:
        node = combine
    chain = [node]
    for _ in range(2):  # cat((rotated, x[..., rot:]), -1), then a cast
        user = _single_user(chain[-1])
        if user is None:
            break
        tail_cat = user.target is aten.cat.default and len(user.args[0]) == 2 and (
            user.args[0][0] is chain[-1])
        if tail_cat or user.target in _CASTS:
            chain.append(user)
    return chain


@dataclass
class Miss:
    """A RoPE-like candidate that was not proven: its outermost node and why."""

    output: Node
    reason: str  # the counter's words
    detail: str  # the matcher's own message (or the error), for the log line


def _explain(chain: list[Node], kinds: set[str], outcomes: dict) -> tuple[str, str]:
    """(reason, matcher's message) for a candidate whose chain raised ``outcomes[node]``."""
    tried = [(node, outcomes[node]) for node in chain if isinstance(outcomes.get(node),
                                                                  Exception)]
    near = [o for o in tried if isinstance(o[1], NearMiss)]
    plain = [o for o in tried if isinstance(o[1], NoMatch)]
    errors = [o for o in tried if not isinstance(o[1], NoMatch)]
    tables_from_inputs = kinds == {"input"}
    for group in (near, plain):
        if group:
            message = str(group[-1][1])
            reason = _friendly(message)
            if tables_from_inputs and "cos/sin table is not cos()" in message:
                reason = GRAPH_INPUT_TABLES
            return reason, message
    if errors:
        err = errors[-1][1]
        detail = f"the matcher raised {err!r} (counted in candidate_errors)"
        return (GRAPH_INPUT_TABLES if tables_from_inputs
                else f"the matcher failed ({type(err).__name__}), see candidate_errors"), detail
    target = chain[-1].target
    name = getattr(target, "__name__", str(target))
    return f"its output ({name}) is not a form the matcher reads", "not a candidate"


def find_misses(graph: Graph, outcomes: dict[Node, RopeMatch | Exception]) -> list[Miss]:
    """Every RoPE-like candidate of ``graph`` that no proven match covers, once each (by its
    outermost node: the halves of one RoPE give one miss), in graph order.

    ``outcomes``: each node ``match_rope`` was tried on -> its match or the exception it raised
    (``find_rope_matches(graph, outcomes=...)`` fills it)."""
    matched = set()
    for outcome in outcomes.values():
        if isinstance(outcome, RopeMatch):
            matched.update(outcome.nodes)
            matched.add(outcome.output)
    walker = _Walker()
    groups: dict[Node, tuple[list[Node], set[Node], set[str]]] = {}
    backward: set[Node] = set()  # candidates in the backward's transposed form
    for node in graph.nodes:
        products = looks_like_rope(node, walker)
        if products is None:
            continue
        chain = _candidate_chain(node)
        _, members, kinds = groups.setdefault(chain[-1], (chain, set(), set()))
        members.update(p.node for p in products)
        kinds.update(p.kind for p in products)
        if _is_backward(products):
            backward.add(chain[-1])
    misses = []
    seen: set[Node] = set()  # products already explained (one RoPE, one miss)
    for top, (chain, members, kinds) in groups.items():
        if members & (matched | seen) or set(chain) & matched:
            continue
        seen |= members
        reason, detail = _explain(chain, kinds, outcomes)
        if top in backward and "(a backward)" not in detail:  # else the proof step's own
            reason = BACKWARD_REASON
        misses.append(Miss(top, reason, detail))
    return misses
