"""Inductor post-grad pass: a fused RoPE call computes its cos/sin in the kernel, from the
model's angles, instead of reading cos/sin tables that one more kernel must materialise.

Before (the HF rotary module, after ``FuseQKRopePass`` read its tables in place)::

    freqs = transpose(bmm(inv_freq, positions))                        # [B', S, rot/2] fp32
    cos   = convert_element_type(mul(cos(cat([freqs, freqs], -1)), s), bf16)   # [B', S, rot]
    sin   = convert_element_type(mul(sin(cat([freqs, freqs], -1)), s), bf16)
    af    = auto_functionalized_v2(rope_compile.fused_qk_rope_with_cos_sin_tables_inplace,
                                   cos=reshape(slice(cos, -1, 0, rot/2), [-1, rot/2]),
                                   sin=reshape(slice(sin, -1, 0, rot/2), [-1, rot/2]), ...)

After::

    af    = auto_functionalized_v2(rope_compile.fused_qk_rope_with_angles_inplace,
                                   angles=reshape(slice(freqs, -1, 0, rot/2), [-1, rot/2]),
                                   cos_scale=s, sin_scale=s, table_dtype=bf16, ...)

Plain Inductor inlines the table's computation into its RoPE kernels; once a fused call reads
the tables, they need a kernel of their own (one per forward, shared by the layers). With the
angles form, cos/sin are dead unless something else reads them, and that kernel is gone.

Proven (else the call is left as it was, the reason logged and counted as
``trig_in_kernel skipped: <reason>``; a call without such a chain is not a candidate):

- each table the call reads is exactly ``convert(mul(f(cat(a, a)), s))`` (the convert and the
  mul optional, in that order), ``f`` being ``cos`` for the cos table and ``sin`` for the sin
  table, computed in float32 on float32 angles, ``s`` a Python number, and the equal-halves
  duplication of ``a`` the one the matcher proves (``cat((a, a), -1)`` or its expand
  spelling); cos and sin share ``a`` and the table dtype;
- the call reads rows ``t % R`` of the tables' first ``rot/2`` columns (pair tables, no heads
  dim squeezed, no mRoPE sections): the same rows of ``a`` are its angles; a call that reads
  ``-sin`` (the backward's rotation by -θ) gets ``sin_scale`` negated (rounding is odd);
- the angles op's own checks pass on the exact arguments (its fake implementation runs).

The kernel's cos/sin is Triton's (``tl.cos``), what Inductor's generated code uses for the same
chain; it may differ from eager's by an ulp of float32 before the rounding to the table dtype.
Only the plain RoPE op is converted: the QK-norm and KV-store ops have no angles form (their
calls keep reading the tables).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .accepted_ops import bound_arguments, op_of
from .fused_call import (
    CallError,
    ExtensionPass,
    FusedCall,
    NotACandidate,
    PlanError,
    check_accepted,
    emit_call,
    graph_nodes_in,
    latest,
    rebase_views,
)
from .fx_surgery import GraphTransaction, fake_value
from .rope_pattern import NoMatch, _duplication_of, _float_cast

aten = torch.ops.aten
prims = torch.ops.prims


def _angles_op():
    import rope_compile.ops  # noqa: F401  (registers the op)

    if not hasattr(torch.ops.rope_compile, "fused_qk_rope_with_angles_inplace"):
        raise CallError("rope_compile::fused_qk_rope_with_angles_inplace is not registered")
    return torch.ops.rope_compile.fused_qk_rope_with_angles_inplace.default


@dataclass(frozen=True)
class AngleChain:
    """``table = convert(mul(trig(cat(angles, angles)), scale), table_dtype)``."""

    angles: Node
    scale: float
    table_dtype: torch.dtype


def _cast_dtype(node: Node) -> torch.dtype:
    if node.target is prims.convert_element_type.default:
        return node.args[1]
    return node.kwargs["dtype"]


def angle_chain(table: Node, trig) -> AngleChain:
    """Prove ``table`` is ``trig`` of duplicated float32 angles, scaled and cast; or raise
    ``PlanError`` saying which step is not."""
    table_val = fake_value(table)
    if table_val is None:
        raise PlanError("the cos/sin table has no tensor value")
    node, scale = table, 1.0
    if _float_cast(node):
        if _cast_dtype(node) != table_val.dtype:
            raise PlanError("the cos/sin table's cast is not to its own dtype")
        node = node.args[0]
    if (op_of(node) is aten.mul.Tensor and isinstance(node.args[0], Node)
            and type(node.args[1]) in (int, float)):
        scale = float(node.args[1])
        node = node.args[0]
    name = trig.__name__.split(".")[0]
    if op_of(node) is not trig:
        raise PlanError(f"the {name} table is not {name}() of angles times a number, cast")
    trig_val = fake_value(node)
    if trig_val is None or trig_val.dtype != torch.float32:
        raise PlanError(f"{name}() is not computed in float32")
    try:
        angles = _duplication_of(node.args[0])
    except NoMatch as why:
        raise PlanError(f"{name}()'s angles are not proven duplicated halves: {why}") from None
    angles_val = fake_value(angles)
    if angles_val is None or angles_val.dtype != torch.float32:
        raise PlanError("the angles are not float32")
    return AngleChain(angles, scale, table_val.dtype)


def _table_of_rows(rows: Node, half: int) -> Node:
    """The table a ``reshape(slice(table, -1, 0, half, 1), [-1, half])`` row view reads (the
    pair-table reading ``passes/table_views.py`` builds), or ``NotACandidate``."""
    if op_of(rows) is not aten.reshape.default or list(rows.args[1]) != [-1, half]:
        raise NotACandidate
    sliced = rows.args[0]
    if op_of(sliced) is not aten.slice.Tensor or [
            bound_arguments(sliced)[a] for a in ("dim", "start", "end", "step")] != [
                -1, 0, half, 1]:
        raise NotACandidate
    table = sliced.args[0]
    if not isinstance(table, Node):
        raise NotACandidate
    return table


@dataclass
class AnglesPlan:
    call: FusedCall
    cos: AngleChain
    sin: AngleChain


class ComputeTrigInKernelPass(ExtensionPass):
    """Rewrite tables-op calls whose tables are the model's ``cos``/``sin`` of angles into the
    angles op. Options as ``FuseQKRopePass``."""

    prefix = "trig_in_kernel"

    def plan(self, call: FusedCall, graph: Graph, symbols: dict) -> AnglesPlan:
        if call.norm or call.store or not call.tables:
            raise NotACandidate
        if call.device_type() not in self.devices:
            raise NotACandidate
        if call.args.get("mrope_section") is not None:
            raise NotACandidate
        half = call.args["rotary_dim"] // 2
        cos_rows, sin_rows = call.args.get("cos"), call.args.get("sin")
        if not isinstance(cos_rows, Node) or not isinstance(sin_rows, Node):
            raise NotACandidate
        # The rotation by -θ reads -sin (table_views.TableRows.negate): sin_scale negated is
        # the same table, since rounding to the table dtype is odd (round(-x) = -round(x)).
        sin_sign = 1.0
        if op_of(sin_rows) is aten.neg.default and isinstance(sin_rows.args[0], Node):
            sin_rows, sin_sign = sin_rows.args[0], -1.0
        cos_table = _table_of_rows(cos_rows, half)
        sin_table = _table_of_rows(sin_rows, half)
        if not (_float_cast(cos_table) or op_of(cos_table) in (aten.mul.Tensor, aten.cos.default)):
            raise NotACandidate  # a table read as it is (an input, a gather): nothing to compute
        cos = angle_chain(cos_table, aten.cos.default)
        sin = angle_chain(sin_table, aten.sin.default)
        if cos.angles is not sin.angles:
            raise PlanError("cos and sin are of different angles")
        if cos.table_dtype != sin.table_dtype:
            raise PlanError("the cos and sin tables have different dtypes")
        views = {name: call.fake_view(name) for name in ("q", "k")}
        angles_val = fake_value(cos.angles)
        with torch._guards.detect_fake_mode([angles_val]) or contextlib.nullcontext():
            rows = angles_val[..., :half].reshape(-1, half)
            if fake_value(cos_rows).shape[0] != rows.shape[0]:
                raise PlanError("the angles' rows differ from the tables'")
            args = {k: v for k, v in call.fake_args().items() if k not in ("cos", "sin")}
            sin = dataclasses.replace(sin, scale=sin_sign * sin.scale)
            check_accepted(_angles_op(), views, {
                **args, "angles": rows, "cos_scale": cos.scale, "sin_scale": sin.scale,
                "table_dtype": cos.table_dtype})
        return AnglesPlan(call, cos, sin)

    def rewrite(self, tx: GraphTransaction, plan: AnglesPlan) -> list[Node]:
        call, graph = plan.call, tx.graph
        half = call.args["rotary_dim"] // 2
        anchor = latest([*call.bases, plan.cos.angles, *graph_nodes_in(call.args)], graph)
        sliced = tx.add(anchor, aten.slice.Tensor, (plan.cos.angles, -1, 0, half))
        angles = tx.add(sliced, aten.reshape.default, (sliced, [-1, half]))
        args = {k: v for k, v in call.args.items() if k not in ("cos", "sin")}
        args.update(angles=angles, cos_scale=plan.cos.scale, sin_scale=plan.sin.scale,
                    table_dtype=plan.cos.table_dtype)
        _, outs = emit_call(tx, angles, _angles_op(), args, call.views, call.bases)
        for index, old in call.outputs.items():
            rebase_views(tx, old, outs[index])
        sin_rows = call.args["sin"]
        negated = [sin_rows.args[0]] if op_of(sin_rows) is aten.neg.default else []
        return [call.node, *call.outputs.values(), call.args["cos"], sin_rows, *negated]

    def describe(self, plan: AnglesPlan) -> str:
        return (f"{plan.call.node.name} computes cos/sin in the kernel from "
                f"{plan.cos.angles.name} (scale {plan.cos.scale:g}, {plan.cos.table_dtype})")
