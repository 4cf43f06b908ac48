"""General FX surgery used by the fusion passes, apart from any fusion's policy.

* :func:`view_chain` / :func:`replay_views`: the chain of view ops from a storage root to a
  tensor, and the same chain re-applied on another root.
* :func:`add_node`: insert a call with its fake value as ``meta["val"]``.
* :class:`GraphTransaction`: every mutation of one rewrite, recorded so that the rewrite is
  either committed whole (dead nodes erased once the graph is proven well formed) or rolled
  back, leaving the graph exactly as it was.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.multiprocessing.reductions import StorageWeakRef

aten = torch.ops.aten

_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
# Ops whose output aliases their (first) input's storage: what the chain from a storage root
# to a rotated tensor may consist of.
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.slice.Tensor, aten.as_strided.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.default, aten.permute.default, aten.transpose.int,
            aten.t.default, aten.select.int, aten.expand.default, aten.alias.default,
            *_SPLITS)


def fake_value(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def statically_equal(a, b) -> bool:
    """Sizes or strides (ints or symbolic) equal for every value of their symbols; no guard is
    added, and what cannot be decided is not equal."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def statically_at_most(a, b) -> bool:
    """``a <= b`` for every value of their symbols (as :func:`statically_equal`)."""
    try:
        return bool(statically_known_true(a <= b))
    except Exception:
        return False


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())


def is_view_of_input(node: Node) -> bool:
    """``node`` is a view op (or a getitem of a split) sharing its input's storage."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, Node) and src.target in _SPLITS
    if node.target not in VIEW_OPS or not isinstance(node.args[0], Node):
        return False
    if node.target in _SPLITS:
        return True
    val, src_val = fake_value(node), fake_value(node.args[0])
    return val is not None and src_val is not None and shares_storage(val, src_val)


def aliases_an_input(node: Node) -> bool:
    """Whether ``node``'s value shares storage with one of its inputs (an unknown view op)."""
    val = fake_value(node)
    if val is None or node.op != "call_function":
        return False
    return any(fake_value(arg) is not None and shares_storage(val, fake_value(arg))
               for arg in node.all_input_nodes)


def view_chain(node: Node) -> tuple[Node, list[Node]]:
    """(storage root, view nodes from the root (exclusive) to ``node`` (inclusive))."""
    chain = []
    while is_view_of_input(node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def propagate_fake(node: Node) -> Node:
    """Set ``node.meta["val"]``: its target run on its inputs' fake values."""
    fake_args, fake_kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                   lambda n: n.meta["val"])
    fake_tensors = [a for a in torch.utils._pytree.tree_leaves((fake_args, fake_kwargs))
                    if isinstance(a, torch.Tensor)]
    with torch._guards.detect_fake_mode(fake_tensors):
        node.meta["val"] = node.target(*fake_args, **fake_kwargs)
    return node


def add_node(graph: Graph, after: Node, target, args, kwargs=None) -> Node:
    """Insert ``target(*args, **kwargs)`` after ``after``, with its fake value as meta."""
    with graph.inserting_after(after):
        node = graph.call_function(target, tuple(args), kwargs or {})
    return propagate_fake(node)


class GraphTransaction:
    """The mutations of one rewrite, undoable until :meth:`commit`.

    New nodes are added through :meth:`record_new` (or :meth:`add` / :meth:`replay_views`),
    uses are moved through :meth:`replace_uses` / :meth:`replace_input`, and nothing is erased
    before :meth:`commit`: so :meth:`rollback` restores the graph exactly."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.new_nodes: dict[Node, None] = {}  # in insertion order
        self.moved_uses: list[tuple[Node, Node, Node]] = []  # (user, old input, new input)
        self.maybe_dead: list[Node] = []

    def record_new(self, node: Node) -> Node:
        self.new_nodes[node] = None
        return node

    def add(self, after: Node, target, args, kwargs=None) -> Node:
        return self.record_new(add_node(self.graph, after, target, args, kwargs))

    def replay_views(self, chain: list[Node], old_root: Node, new_root: Node,
                     env: dict | None = None) -> Node:
        """Re-apply the view ``chain`` (built on ``old_root``) on ``new_root``; the last node.
        Views already replayed in ``env`` (old node -> new node) are reused, so readers that
        shared a view keep sharing one."""
        env = {} if env is None else env
        env.setdefault(old_root, new_root)
        last = new_root
        for node in chain:
            if node in env:
                last = env[node]
                continue
            with self.graph.inserting_after(last):
                copy = self.record_new(self.graph.node_copy(node, lambda n: env.get(n, n)))
            env[node] = last = propagate_fake(copy)
        return last

    def replace_input(self, user: Node, old: Node, new: Node) -> None:
        user.replace_input_with(old, new)
        self.moved_uses.append((user, old, new))
        self.maybe_dead.append(old)

    def replace_uses(self, old: Node, new: Node, keep=lambda user: False) -> None:
        for user in list(old.users):
            if user is not new and not keep(user):
                self.replace_input(user, old, new)

    def rollback(self) -> None:
        for user, old, new in reversed(self.moved_uses):
            user.replace_input_with(new, old)
        for node in reversed(self.new_nodes):
            if not node._erased:
                self.graph.erase_node(node)
        self.new_nodes, self.moved_uses, self.maybe_dead = {}, [], []

    def commit(self, also_dead: Iterable[Node] = ()) -> None:
        """Erase what the rewrite left unused (and their now-unused inputs)."""
        erase_dead(self.graph, [*self.maybe_dead, *also_dead])


def erase_dead(graph: Graph, nodes: Iterable[Node]) -> None:
    """Erase ``nodes`` (and their now-unused inputs) that nothing uses any more."""
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
