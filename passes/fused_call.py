"""A fused RoPE call in a post-grad graph, read and re-emitted by the fusions that extend it.

``FuseQKRopePass`` leaves one ``auto_functionalized_v2`` node per Q/K pair::

    af = auto_functionalized_v2(rope_compile.<op>, <plain args>, _q_base_index=i, _q_size=...,
                                _k_base_index=j, ..., _all_bases=[root, ...])
    new_root = af[1 + i]

The later fusions (``fuse_qk_norm``: a per-head RMSNorm before it, ``fuse_kv_store``: the
KV-cache write after it) read it as a :class:`FusedCall` (which op of the family, its plain
arguments, the view of each mutable argument into ``_all_bases``, the output getitems) and emit
the wider op of the same family with :func:`emit_call`. The family, by (norm, store, tables)::

    fused_qk_rope_with_cos_sin_cache_inplace      fused_qk_rope_with_cos_sin_tables_inplace
    fused_qk_norm_rope_inplace                    fused_qk_norm_rope_tables_inplace
    fused_qk_rope_kv_store_inplace                fused_qk_rope_kv_store_tables_inplace
    fused_qk_norm_rope_kv_store_inplace           fused_qk_norm_rope_kv_store_tables_inplace

An op that is not registered (an older install) is a reason to skip, never an error.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, Node

from .events import inherit_source, option_hint, record, with_source
from .fx_surgery import GraphTransaction, fake_value
from .fx_surgery import statically_equal as _eq
from .readers import ReaderError
from .readers import rebase_views as rebase_views  # re-exported for the extension passes

# (norm, store, tables) -> op name in the rope_compile namespace
OPS = {
    (False, False, False): "fused_qk_rope_with_cos_sin_cache_inplace",
    (False, False, True): "fused_qk_rope_with_cos_sin_tables_inplace",
    (True, False, False): "fused_qk_norm_rope_inplace",
    (True, False, True): "fused_qk_norm_rope_tables_inplace",
    (False, True, False): "fused_qk_rope_kv_store_inplace",
    (False, True, True): "fused_qk_rope_kv_store_tables_inplace",
    (True, True, False): "fused_qk_norm_rope_kv_store_inplace",
    (True, True, True): "fused_qk_norm_rope_kv_store_tables_inplace",
}
_KIND = {name: kind for kind, name in OPS.items()}
_VIEW_KEYS = ("base_index", "size", "stride", "storage_offset", "alias", "slice_dim",
              "slice_start", "slice_end")


class CallError(Exception):
    """The call cannot be extended; the message says why."""


def family_op(norm: bool, store: bool, tables: bool):
    """The op overload of the family, or raise ``CallError`` if it is not registered."""
    import rope_compile.ops  # noqa: F401  (registers the ops)

    name = OPS[(norm, store, tables)]
    if not hasattr(torch.ops.rope_compile, name):
        raise CallError(f"rope_compile::{name} is not registered in this install")
    return getattr(torch.ops.rope_compile, name).default


def _mutable_names(op) -> list[str]:
    return [a.name for a in op._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write]


def _auto_functionalized_v2():
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    return auto_functionalized_v2


@dataclass
class FusedCall:
    """One ``auto_functionalized_v2`` node calling an op of the family."""

    node: Node
    norm: bool
    store: bool
    tables: bool
    args: dict  # the op's plain (not mutated) arguments, by name
    views: dict[str, dict]  # mutable argument -> {"base_index": i, "size": ..., ...}
    bases: list[Node]
    outputs: dict[int, Node] = field(default_factory=dict)  # base index -> getitem(node, 1 + i)

    @property
    def op_name(self) -> str:
        return OPS[(self.norm, self.store, self.tables)]

    def fake_view(self, name: str) -> torch.Tensor:
        """The fake tensor the op gets as ``name`` (a view of its base's fake value)."""
        from torch._higher_order_ops.auto_functionalize import read_view_information_from_args

        spec = {f"_{name}_{key}": _fake_arg(v) for key, v in self.views[name].items()}
        bases = [b.meta["val"] for b in self.bases]
        info = read_view_information_from_args([name], [torch.TensorType.get()], spec, bases)
        with torch._guards.detect_fake_mode(bases) or contextlib.nullcontext():
            return info[name].regenerate_view(bases)

    def fake_args(self) -> dict:
        return {k: _fake_arg(v) for k, v in self.args.items()}

    def device_type(self) -> str:
        return self.bases[self.views["k"]["base_index"]].meta["val"].device.type


def _fake_arg(value):
    return torch.fx.node.map_arg(value, lambda n: n.meta["val"])


def parse_call(node: Node) -> FusedCall | None:
    """The node as a :class:`FusedCall`, or None if it is not a call of the family."""
    if node.op != "call_function" or node.target is not _auto_functionalized_v2():
        return None
    op = node.args[0] if node.args else None
    name = getattr(getattr(op, "_schema", None), "name", "")
    if not name.startswith("rope_compile::") or name.split("::", 1)[1] not in _KIND:
        return None
    if getattr(op, "_overloadname", "default") != "default":
        return None
    norm, store, tables = _KIND[name.split("::", 1)[1]]
    mutable = _mutable_names(op)
    kwargs = dict(node.kwargs)
    bases = list(kwargs.pop("_all_bases"))
    views = {}
    for arg in mutable:
        views[arg] = {key: kwargs.pop(f"_{arg}_{key}") for key in _VIEW_KEYS
                      if f"_{arg}_{key}" in kwargs}
        if views[arg].get("base_index") is None:
            return None  # a mutable argument that is None: not a call the fusions extend
    outputs = {}
    for user in node.users:
        if user.target is operator.getitem and isinstance(user.args[1], int) and user.args[1]:
            outputs[user.args[1] - 1] = user
    return FusedCall(node, norm, store, tables, kwargs, views, bases, outputs)


def as_strided_view(base_index: int, size, stride, offset) -> dict:
    return {"base_index": base_index, "size": tuple(size), "stride": tuple(stride),
            "storage_offset": offset}


def check_accepted(op, views: dict[str, torch.Tensor], args: dict) -> None:
    """Run the op's fake implementation (its checks) on the exact fake views the new call will
    get; raise ``CallError`` with the op's message if it rejects them."""
    fakes = [t for t in views.values() if isinstance(t, torch.Tensor)]
    with torch._guards.detect_fake_mode(fakes) or contextlib.nullcontext():
        try:
            op(**views, **args)
        except (ValueError, RuntimeError, TypeError, IndexError) as err:
            raise CallError(f"the op would reject the call: {err}") from None


def emit_call(tx: GraphTransaction, anchor: Node, op, args: dict, views: dict[str, dict],
              bases: list[Node]) -> tuple[Node, list[Node]]:
    """Insert ``auto_functionalized_v2(op, **args, <views>, _all_bases=bases)`` after ``anchor``
    and one getitem per base; returns (call, getitems)."""
    graph: Graph = tx.graph
    kwargs = dict(args)
    for arg, spec in views.items():
        for key, value in spec.items():
            kwargs[f"_{arg}_{key}"] = value
    kwargs["_all_bases"] = list(bases)
    like = [b.meta["val"] for b in bases]
    with torch._guards.detect_fake_mode(like) or contextlib.nullcontext():
        fake = (None, *(torch._prims_common.clone_preserve_strides(b) for b in like))
    with graph.inserting_after(anchor):
        call = tx.record_new(graph.call_function(_auto_functionalized_v2(), (op,), kwargs))
    call.meta["val"] = fake
    outs, last = [], call
    for index in range(len(bases)):
        with graph.inserting_after(last):
            last = tx.record_new(graph.call_function(operator.getitem, (call, index + 1)))
        last.meta["val"] = fake[index + 1]
        outs.append(last)
    return call, outs


def latest(nodes, graph: Graph) -> Node:
    """The last of ``nodes`` in graph order."""
    wanted = {n for n in nodes if isinstance(n, Node)}
    last = None
    for node in graph.nodes:
        if node in wanted:
            last = node
    return last


def graph_nodes_in(value) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg(value, found.append)
    return found


def fake_of(node) -> torch.Tensor | None:
    return fake_value(node)


class PlanError(Exception):
    """A candidate cannot be rewritten; the message says why (logged and counted)."""


class NotACandidate(Exception):
    """Nothing for the fusion to extend here (not counted: most calls have no such neighbour)."""


class ExtensionPass(CustomGraphPass):
    """What the fusions extending a fused call share: options (``head_sizes``, ``devices``,
    ``strict``, as ``FuseQKRopePass``), counters ``<prefix> rewritten`` / ``<prefix> skipped:
    <reason>`` in ``counters["rope_compile"]``, one DEBUG line per skip, and per-candidate
    isolation: each candidate is planned without touching the graph, then rewritten in its own
    :class:`GraphTransaction`, the graph sorted and linted, and rolled back alone on any error
    (``candidate_errors``; ``strict`` re-raises)."""

    prefix = ""

    def __init__(self, head_sizes=None, devices=None, strict: bool = False) -> None:
        from rope_compile.constants import DEFAULT_DEVICES, DEFAULT_HEAD_SIZES
        from rope_compile.options import validate_pass_options

        self.head_sizes, self.devices, self.strict = validate_pass_options(
            DEFAULT_HEAD_SIZES if head_sizes is None else head_sizes,
            DEFAULT_DEVICES if devices is None else devices, strict)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(head_sizes={self.head_sizes}, devices={self.devices}, "
                f"strict={self.strict})")

    def uuid(self) -> bytes:
        from .fuse_qk_rope import FuseQKRopePass

        probe = FuseQKRopePass(self.head_sizes, self.devices, self.strict)
        return repr(self).encode() + probe.uuid()  # every pass source, by content

    # subclasses: plan(call, graph, symbols) -> plan; rewrite(tx, plan) -> list of dead nodes;
    # describe(plan) -> str
    def plan(self, call: FusedCall, graph: Graph, symbols: dict):
        raise NotImplementedError

    def rewrite(self, tx: GraphTransaction, plan) -> list[Node]:
        raise NotImplementedError

    def describe(self, plan) -> str:
        return ""

    def __call__(self, graph: Graph) -> None:
        from .fuse_qk_rope import count

        try:
            self.apply(graph)
        except Exception:
            count("pass_errors")
            if self.strict:
                raise
            import logging

            logging.getLogger("rope_compile").warning(
                "rope_compile %s pass failed; each candidate is committed whole or not at all",
                self.prefix, exc_info=True)

    def skip(self, call: FusedCall, reason: str) -> None:
        import logging

        from .fuse_qk_rope import count

        count(f"{self.prefix} skipped: {reason}")
        hint = option_hint(reason)
        logging.getLogger("rope_compile").debug(
            "not extending %s (%s) with %s: %s%s", with_source(call.node), call.op_name,
            self.prefix, reason, f"; to extend it: {hint}" if hint else "")
        record("skipped", self.prefix, (call.node,), reason)

    def _error(self, what: str, node: Node, err: Exception) -> None:
        import logging

        from .fuse_qk_rope import count

        count("candidate_errors")
        if self.strict:
            raise err
        logging.getLogger("rope_compile").warning(
            "rope_compile: error while %s %s at %s, candidate skipped: %r", what, self.prefix,
            node.name, err, exc_info=True)

    def apply(self, graph: Graph) -> int:
        """Extend every call that qualifies; returns the number rewritten."""
        import logging

        from .fuse_qk_rope import _check_graph, _graph_symbols, _restore_order, count

        done = 0
        for node in list(graph.nodes):
            if node._erased:
                continue
            call = parse_call(node)
            if call is None:
                continue
            try:
                plan = self.plan(call, graph, _graph_symbols(graph))
            except NotACandidate:
                continue
            except (PlanError, CallError) as why:
                self.skip(call, str(why))
                continue
            except Exception as err:
                self._error("planning", node, err)
                continue
            tx = GraphTransaction(graph)
            order = list(graph.nodes)
            try:
                dead = self.rewrite(tx, plan)
                _check_graph(graph)
            except ReaderError as why:  # a reader needs a layout no copy can give: a skip
                tx.rollback()
                _restore_order(graph, order)
                self.skip(call, str(why))
                continue
            except Exception as err:
                tx.rollback()
                _restore_order(graph, order)
                self._error("rewriting", node, err)
                continue
            inherit_source(tx.new_nodes, call.node)
            record("extended", self.prefix, (call.node,), self.describe(plan),
                   calls=tx.new_nodes)
            tx.commit(also_dead=dead)
            done += 1
            count(f"{self.prefix} rewritten")
            logging.getLogger("rope_compile").info("rope_compile: %s", self.describe(plan))
        return done


def table_form_miss(call: FusedCall, ops: str) -> str | None:
    """Why the prologue ops named ``ops`` (the QK-norm ops, the KV-store ops), whose table form
    reads pair tables ``[R, rotary_dim/2]`` (one cos and one sin per pair) only, cannot read the
    cos/sin that ``call`` reads, or None. A RoPE tables call may read full ``[R, rotary_dim]``
    tables (HF tables whose equal halves are not proven) or mRoPE streams: the extension keeps
    the call's own table form, so these are skips with this reason, not calls the op's check
    would reject."""
    if not call.tables:
        return None
    if call.args.get("mrope_section") is not None:
        return (f"the RoPE call reads mRoPE streams (mrope_section); {ops} read pair tables "
                f"[R, rotary_dim/2] only")
    cos, rot = fake_value(call.args.get("cos")), call.args.get("rotary_dim")
    if cos is not None and isinstance(rot, int) and cos.dim() >= 1 and _eq(cos.shape[-1], rot):
        return (f"the RoPE call reads full cos/sin tables [R, rotary_dim = {rot}] (their equal "
                f"halves are not proven); {ops} read pair tables [R, rotary_dim/2] only")
    return None
