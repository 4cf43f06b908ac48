"""Inductor post-grad pass: extend a fused RoPE call backwards over an RMSNorm of q and of k
(QK-norm: per head, or over the whole projection), into one call of the QK-norm + RoPE op.

Before (HF Qwen3 / Qwen3-MoE ``q_norm`` / ``k_norm``, ``Qwen3RMSNorm``; the same for k, after
``FuseQKRopePass``)::

    xq  = reshape(split(qkv)[0], [T, Hq, D])              # the norm's input (a view)
    xf  = convert(xq, f32)                                 # absent for float32
    r   = rsqrt(add(mean(pow(xf, 2), [-1], keepdim), eps))
    nq  = mul(w_q, convert(mul(xf, r), xq.dtype))          # Gemma3: convert(mul(mul(xf, r),
                                                           #          add(convert(w, f32), 1)))
    af  = auto_functionalized_v2(rope_compile.fused_qk_rope_with_cos_sin_cache_inplace,
                                 ..., _q_*=nq[..., :rot], _k_*=nk[..., :rot], _all_bases=[nq, nk])
    q'  = af[1];  k' = af[2]

Before, HF OLMo2 (``q_norm = Olmo2RMSNorm(Hq * D)``: one norm of the whole q projection, then
the view into heads; the same for k with ``[Hk * D]``)::

    xq  = split(qkv)[0]                                    # [T, Hq * D], the norm's input
    nq  = convert(mul(w_q, mul(xf, r)), xq.dtype)          # w_q [Hq * D] (promoted to f32 by
                                                           # the mul), r per token; no convert
                                                           # in float32
    af  = auto_functionalized_v2(..., _q_*=reshape(nq, [T, Hq, D])[..., :rot], ...)

After (either; OLMo2's call gets the ``[H * D]`` weights, which the op reads as one norm over
all of a token's heads)::

    af  = auto_functionalized_v2(rope_compile.fused_qk_norm_rope_inplace,
                                 q_weight=w_q, k_weight=w_k, eps, weight_offset=0.0 (Gemma: 1.0),
                                 [round_once=True (OLMo2's rounding, bf16/fp16),]
                                 ..., _q_*=whole heads of qkv, _k_*=whole heads of qkv,
                                 _all_bases=[qkv])
    q'  = reshape(split(af[1])[0], [T, Hq, D]);  k' = ...   (the norm input's views, replayed)

Each op of the family (``passes/fused_call.py``) is extended the same way: RoPE + KV store
becomes QK-norm + RoPE + KV store, a table form its ``*_tables_inplace`` norm op.

What is proven before a rewrite (else no rewrite, the reason logged and counted as
``qk_norm skipped: <reason>``):

- the call's q (and k) storage root is the norm output, ``x`` normalised over its last dim with
  HF's rounding order, one of the kernel's (``kernels/rope_kv_store.py``): Qwen3/Llama
  ``round(w * round(xf * r))``, Gemma3 ``round(xf * r * (1 + float(w)))`` or OLMo2
  ``round(float(w) * (xf * r))`` (one rounding after the weight, either operand order: the op's
  ``round_once=True``; in float32, where nothing is rounded, it is matched as the Qwen3 form),
  ``xf`` the exact float32 value of ``x``, ``r = rsqrt(mean(xf^2) + eps)`` in float32, the
  products in float32, the weight ``[N]`` over the normalised dim of N; the output has x's
  dtype;
- the normalised dim is either the head (N = D, ``[.., H, D]``) and the call rotates
  ``norm_out[.., :rot]`` of exactly those heads, or the whole projection (N = H * D, OLMo2) and
  the call's ``[T, H, D]`` view splits each norm row in head order (row element ``h * D + c`` is
  head h, column c; all H * D of them, the weight ``[H * D]``); tokens in the same order either
  way; x is viewed as ``[T, H, D]`` the same way without a copy (last stride 1, token dims
  merge) from a storage root Inductor lays out as the fake strides say;
- q and k use the same eps and the same form (weight offset, rounding); the norm outputs have no
  reader
  but the call (their pre-RoPE value would be gone);
- a tables call reads pair tables ``[R, rotary_dim/2]``, the norm ops' only table form (the
  call's full ``[R, rotary_dim]`` tables or mRoPE streams are a skip with that reason);
- the op's own checks pass on the exact views the new call gets (its fake implementation runs).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .accepted_ops import argument_miss, bound_arguments, op_of
from .fuse_qk_rope import PlanError as RopePlanError
from .fuse_qk_rope import _as_graph_ints, _check_root, _redirect_disjoint_views
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
from .fx_surgery import GraphTransaction, fake_value, view_chain
from .fx_surgery import statically_at_most as _le
from .fx_surgery import statically_equal as _eq
from .trig_sources import value_key

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["FuseQKNormPass", "NormMatch", "match_rms_norm"]


@dataclass(frozen=True)
class NormMatch:
    """``output = rms_norm(x, weight, eps)`` over x's last dim (``weight`` ``[x.shape[-1]]``);
    ``weight_offset`` 0.0 (Qwen3 / Llama / OLMo2: ``w * x``) or 1.0 (Gemma3: ``(1 + w) * x``);
    ``round_once``: the op's argument, True for OLMo2's one rounding after the weight, None
    where the offset says the rounding (Qwen3 twice, Gemma3 once)."""

    output: Node
    x: Node
    weight: Node
    eps: float
    weight_offset: float
    nodes: tuple[Node, ...]
    round_once: bool | None = None

    @property
    def form(self) -> tuple[float, bool | None]:
        return self.weight_offset, self.round_once


def _call(node, *targets) -> bool:
    """``node`` calls one of ``targets`` with arguments the proofs hold for
    (``accepted_ops``)."""
    return op_of(node) in targets


def _check_arguments(node: Node, what: str) -> None:
    why = argument_miss(node)
    if why is not None:
        raise PlanError(f"{what}: {why}")


def _cast_to(node, dtype=None) -> Node | None:
    """The input of ``convert_element_type(input, dtype)`` (any float dtype if None)."""
    if _call(node, prims.convert_element_type.default) and (
            dtype is None or node.args[1] == dtype):
        return node.args[0]
    return None


def _operands(node: Node) -> tuple:
    return tuple(node.args[:2])


def _match_rsqrt(node, xf: Node) -> tuple[float, list[Node]]:
    """``node = rsqrt(mean(xf^2, -1, keepdim) + eps)`` in float32: (eps, nodes)."""
    if not _call(node, aten.rsqrt.default):
        raise PlanError("the norm's scale is not rsqrt(mean(x^2) + eps)")
    add = node.args[0]
    if not (isinstance(add, Node) and add.target is aten.add.Tensor):
        raise PlanError("the norm's scale is not rsqrt(mean(x^2) + eps)")
    _check_arguments(add, "the norm's mean(x^2) + eps")
    mean, eps = add.args[:2]
    if isinstance(eps, Node):
        mean, eps = eps, mean
    if isinstance(eps, Node) or not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise PlanError("the norm's eps is not a number")
    if isinstance(mean, Node) and mean.target is aten.mean.dim:
        _check_arguments(mean, "the norm's variance")
    if not _call(mean, aten.mean.dim):
        raise PlanError("the norm's variance is not mean(x^2) over the last dim")
    bound = bound_arguments(mean)
    dims, keep = bound["dim"], bound["keepdim"]  # dim None: every dim
    last = fake_value(xf).dim() - 1
    if not isinstance(dims, (list, tuple)) or list(dims) not in ([-1], [last]) or not keep:
        raise PlanError("the norm's variance is not mean(x^2) over the last dim")
    square = mean.args[0]
    # x.float() may be spelled twice (``x.float().pow(2)`` and ``x.float() * r``): the same
    # value, not the same node.
    same = value_key(xf)
    if _call(square, aten.pow.Tensor_Scalar):
        ok = value_key(square.args[0]) == same and square.args[1] == 2
    elif _call(square, aten.mul.Tensor):
        ok = value_key(square.args[0]) == same and value_key(square.args[1]) == same
    else:
        ok = False
    if not ok:
        raise PlanError("the norm's variance is not mean(x^2) of the normalised x")
    for n in (node, add, mean, square):
        if fake_value(n).dtype != torch.float32:
            raise PlanError("the norm is not computed in float32")
    return float(eps), [node, add, mean, square]


def _split_product(node: Node, is_left) -> tuple[Node, Node] | None:
    """(a, b) of ``mul(a, b)`` or ``mul(b, a)`` where ``is_left(a)``."""
    if not _call(node, aten.mul.Tensor):
        return None
    a, b = _operands(node)
    if isinstance(a, Node) and is_left(a):
        return a, b
    if isinstance(b, Node) and is_left(b):
        return b, a
    return None


def _normalised(node: Node) -> tuple[Node, Node, float, list[Node]]:
    """``node = xf * rsqrt(...)`` (either order): (x, xf, eps, nodes)."""
    if not _call(node, aten.mul.Tensor):
        raise PlanError("the norm does not multiply x by rsqrt(mean(x^2) + eps)")
    for xf, r in (_operands(node), _operands(node)[::-1]):
        if isinstance(xf, Node) and _call(r, aten.rsqrt.default):
            eps, nodes = _match_rsqrt(r, xf)
            x = _cast_to(xf, torch.float32)
            if x is None:
                x = xf
            val, x_val = fake_value(xf), fake_value(x)
            if val.dtype != torch.float32 or x_val.dtype not in (
                    torch.float16, torch.bfloat16, torch.float32):
                raise PlanError("the normalised value is not the exact float32 value of x")
            return x, xf, eps, [node, *nodes]
    raise PlanError("the norm does not multiply x by rsqrt(mean(x^2) + eps)")


def _check_output_dtype(out_val: torch.Tensor, x: Node) -> None:
    if out_val.dtype != fake_value(x).dtype:
        raise PlanError(f"the norm output dtype {out_val.dtype} differs from its input's "
                        f"{fake_value(x).dtype}")


def _weighted_in_float32(xn: Node, w: Node, product: Node, out_val: torch.Tensor,
                         product_error: str) -> tuple[Node, Node, float, list[Node]]:
    """The Gemma and OLMo2 forms' shared proof: ``product`` multiplies the normalised ``xn``
    by the (float32) weight ``w`` in float32, and the norm's output has x's dtype.
    (x, weight, eps, nodes of the normalisation); ``product_error`` names the form."""
    weight = _cast_to(w, torch.float32) or w
    x, _, eps, nodes = _normalised(xn)
    if fake_value(product).dtype != torch.float32:
        raise PlanError(product_error)
    _check_output_dtype(out_val, x)
    return x, weight, eps, nodes


def match_rms_norm(output: Node) -> NormMatch:
    """Prove ``output`` is an RMSNorm of some x over its last dim, rounded as the kernel does
    (see the module docstring), or raise ``PlanError``."""
    out_val = fake_value(output)
    if out_val is None:
        raise PlanError("the norm output has no tensor value")
    # Gemma3: [convert(] mul(mul(xf, r), add(float(w), 1.0)) [, x.dtype)]
    inner = _cast_to(output) or output
    gemma = _split_product(inner, lambda n: _call(n, aten.mul.Tensor) and any(
        _call(a, aten.rsqrt.default) for a in _operands(n)))
    if gemma is not None and isinstance(gemma[1], Node) and gemma[1].target is aten.add.Tensor:
        xn, plus = gemma
        _check_arguments(plus, "the Gemma norm's factor 1 + float(weight)")
        w, one = plus.args[:2]
        if not isinstance(w, Node):
            w, one = one, w
        if one != 1 or isinstance(one, Node) or fake_value(plus).dtype != torch.float32:
            raise PlanError("the Gemma norm's factor is not 1 + float(weight) in float32")
        x, weight, eps, nodes = _weighted_in_float32(
            xn, w, inner, out_val, "the Gemma norm's product is not in float32")
        return _checked(NormMatch(output, x, weight, eps, 1.0,
                                  (output, inner, plus, *nodes)))
    if gemma is not None and inner is not output:
        # HF OLMo2: convert(mul(float(w), mul(xf, r)), x.dtype), one rounding after the weight
        xn, w = gemma
        if not isinstance(w, Node):
            raise PlanError("the norm's weight is not a tensor")
        x, weight, eps, nodes = _weighted_in_float32(
            xn, w, inner, out_val, "the norm's product w * x_normed is not in float32")
        return _checked(NormMatch(output, x, weight, eps, 0.0, (output, inner, *nodes),
                                  round_once=True))
    # Qwen3 / Llama: mul(w, [convert(] mul(xf, r) [, x.dtype)])
    qwen = _split_product(output, lambda n: (_cast_to(n) is not None
                                             and _call(_cast_to(n), aten.mul.Tensor))
                          or (_call(n, aten.mul.Tensor) and any(
                              _call(a, aten.rsqrt.default) for a in _operands(n))))
    if qwen is None:
        raise PlanError("the norm output is not weight * normalised x")
    rounded, weight = qwen
    xn = _cast_to(rounded) or rounded
    x, xf, eps, nodes = _normalised(xn)
    x_dtype = fake_value(x).dtype
    if fake_value(rounded).dtype != x_dtype:
        raise PlanError("the normalised x is not rounded to x's dtype before the weight")
    _check_output_dtype(out_val, x)
    return _checked(NormMatch(output, x, weight, eps, 0.0, (output, rounded, *nodes)))


def _checked(match: NormMatch) -> NormMatch:
    x_val, w_val, out_val = (fake_value(match.x), fake_value(match.weight),
                             fake_value(match.output))
    if w_val is None or w_val.dim() != 1 or not _eq(w_val.shape[0], x_val.shape[-1]):
        raise PlanError("the norm weight is not [D] over the normalised dim")
    if not w_val.dtype.is_floating_point:
        raise PlanError("the norm weight is not floating point")
    if list(out_val.shape) != list(x_val.shape):
        raise PlanError("the norm output's shape differs from its input's")
    return match


_ELEMENTWISE = (aten.mul.Tensor, aten.add.Tensor, prims.convert_element_type.default)


def _looks_like_norm(node: Node, depth: int = 4) -> bool:
    """Whether an rsqrt feeds ``node`` through a few elementwise ops (mul, add, casts): an
    RMSNorm output; otherwise the call is not a candidate (nothing counted)."""
    stack, seen = [(node, 0)], set()
    while stack:
        current, d = stack.pop()
        if _call(current, aten.rsqrt.default):
            return True
        if d >= depth or current in seen or current.target not in _ELEMENTWISE:
            continue
        seen.add(current)
        stack.extend((n, d + 1) for n in current.all_input_nodes)
    return False


def _heads_view(val: torch.Tensor):
    """``val`` (``[..tokens.., H, D]``) as ``[T, H, D]``: (size, stride, offset), or None when the
    token dims do not merge as a view or the last stride is not 1."""
    if val.dim() < 3 or not _eq(val.stride(-1), 1):
        return None
    tokens = [d for d in range(val.dim() - 2) if not _eq(val.shape[d], 1)] or [val.dim() - 3]
    size, stride = val.shape[tokens[-1]], val.stride(tokens[-1])
    for outer in reversed(tokens[:-1]):
        if not _eq(val.stride(outer), size * stride):
            return None
        size = size * val.shape[outer]
    return [size, val.shape[-2], val.shape[-1]], [stride, val.stride(-2), 1], val.storage_offset()


def _in_order(val: torch.Tensor, order: list[int], head_size: int,
              whole: bool) -> torch.Tensor:
    """``val`` with its dims in ``order`` and, ``whole``, its last dim (``H * D``) split into
    ``[H, D]``, D = ``head_size`` (row element ``h * D + c`` is head h, column c)."""
    val = val.permute(order)
    if whole:
        with torch._guards.detect_fake_mode([val]) or contextlib.nullcontext():
            val = val.unflatten(-1, (val.shape[-1] // head_size, head_size))
    return val


def _rotated_heads_order(out_val: torch.Tensor, view: torch.Tensor, head_size: int = 0,
                         whole: bool = False) -> list[int] | None:
    """A dim order of the norm output (its last dim, the normalised one, kept last) in which
    its ``[T, H, D]`` view (:func:`_heads_view`; ``whole``: of the output with its last dim
    split into ``[H, head_size]``, :func:`_in_order`) holds the call's rotated ``view``
    ``[T, H, n]`` as its first n <= D columns: the same T and H, the same strides where a size
    is not 1 (the last one 1), the same offset. None when there is none. (The call rotates
    ``[..., :rot]`` of what it gets, rot <= n; the new call gets whole heads and the same
    rotary_dim, so partial rotary is the same computation.)

    HF Gemma3 normalises after ``transpose(1, 2)`` (``[B, H, S, D]``), Qwen3 before it
    (``[B, S, H, D]``); either way the call rotates the same rows. OLMo2 normalises
    ``[B, S, H * D]``: only the token dims are reordered, the split ``[H, D]`` stays last, so
    token t of the view is one whole norm row in head order. The norm's input is then viewed
    in the same order, so token t and head h of the new call are the same logical index of x
    as of the norm output (the norm is per row of the last dim)."""
    lead = out_val.dim() - 1
    for order in itertools.permutations(range(lead)):
        canon = _heads_view(_in_order(out_val, [*order, lead], head_size, whole))
        if canon is None:
            continue
        size, stride, offset = canon
        if (all(_eq(a, b) for a, b in zip(view.shape[:2], size[:2], strict=True))
                and _le(view.shape[2], size[2])
                and all(_eq(n, 1) or _eq(a, b)
                        for n, a, b in zip(view.shape, view.stride(), stride, strict=True))
                and _eq(view.storage_offset(), offset)):
            return [*order, lead]
    return None


def _norm_args(norm: NormMatch) -> dict:
    """The new call's eps, weight_offset and (only where it is not the default: a call of the
    Qwen3 or Gemma3 form reads as before) round_once."""
    args = {"eps": norm.eps, "weight_offset": norm.weight_offset}
    if norm.round_once is not None:
        args["round_once"] = norm.round_once
    return args


@dataclass
class NormPlan:
    call: FusedCall
    norms: dict[str, NormMatch]  # "q", "k"
    whole: dict[str, bool]  # q/k: normalised over the whole projection (weight [H * D])
    bases: list[Node]  # the new call's bases
    views: dict[str, dict]
    chains: dict[str, tuple[Node, list[Node]]]  # q/k: (x's root, its view chain to x)
    op: object


class FuseQKNormPass(ExtensionPass):
    """Extends each fused RoPE call (cache or tables, with or without the KV store) backwards
    over a proven RMSNorm of q and of k (per head, or of the whole projection); same options
    as ``FuseQKRopePass``."""

    prefix = "qk_norm"

    def describe(self, plan: NormPlan) -> str:
        spans = "".join(f", {n}: whole projection" for n, whole in plan.whole.items() if whole)
        return (f"fused the QK-norm of {plan.norms['q'].output.name} and "
                f"{plan.norms['k'].output.name} into {plan.call.node.name} ({plan.op}{spans})")

    def plan(self, call: FusedCall, graph: Graph, symbols: dict) -> NormPlan:
        if call.norm:
            raise NotACandidate
        q_base = call.bases[call.views["q"]["base_index"]]
        k_base = call.bases[call.views["k"]["base_index"]]
        if not (_looks_like_norm(q_base) or _looks_like_norm(k_base)):
            raise NotACandidate
        if call.device_type() not in self.devices:
            raise PlanError(f"device {call.device_type()} not in {self.devices}")
        if q_base is k_base:
            raise PlanError("q and k are rotated in one norm output")
        norms = {}
        for name, base in (("q", q_base), ("k", k_base)):
            try:
                norms[name] = match_rms_norm(base)
            except PlanError as why:
                raise PlanError(f"{name}: {why}") from None
        q, k = norms["q"], norms["k"]
        if q.eps != k.eps:
            raise PlanError(f"q and k norms use different eps ({q.eps} vs {k.eps})")
        if q.weight_offset != k.weight_offset:
            raise PlanError("q and k norms differ in form (x * w vs x * (1 + w))")
        if q.form != k.form:
            raise PlanError("q and k norms differ in rounding (x_normed rounded before the "
                            "weight vs once after it)")
        table_form = table_form_miss(call, "the QK-norm ops")
        if table_form is not None:
            raise PlanError(table_form)
        others = [b for b in call.bases if b not in (q_base, k_base)]
        new_bases: list[Node] = []
        views: dict[str, dict] = {}
        chains = {}
        whole_norm = {}
        for name, norm in norms.items():
            out_val = fake_value(norm.output)
            if len(norm.output.users) != 1:
                raise PlanError(f"the {name} norm output has another reader")
            view = call.fake_view(name)
            width, heads = out_val.shape[-1], view.shape[-2]
            # Per head: each norm row is one head (D = the row). Else the whole projection: each
            # row is the H heads, D = row / H (one head: the same norm, the same D).
            head, whole = width, False
            order = _rotated_heads_order(out_val, view, head)
            if (order is None and isinstance(width, int) and isinstance(heads, int)
                    and width % heads == 0):
                head, whole = width // heads, True
                order = _rotated_heads_order(out_val, view, head, whole=True)
            if order is None:
                raise PlanError(f"the call's {name} heads ([T, {heads}, {view.shape[-1]}]) are "
                                f"not the rows of the {name} norm output ([.., {width}]) nor "
                                f"{heads} consecutive parts of each row, in token order")
            if isinstance(head, int) and head not in self.head_sizes:
                raise PlanError(f"head_size {head} not in {self.head_sizes}")
            whole_norm[name] = whole and heads != 1
            x_view = _heads_view(_in_order(fake_value(norm.x), order, head, whole))
            if x_view is None:
                raise PlanError(f"the {name} norm's input is not [T, H, D] as a view (last "
                                "stride 1, token dims merged)")
            root, chain = view_chain(norm.x)
            try:
                _check_root(name, root)
            except RopePlanError as why:
                raise PlanError(str(why)) from None
            if root in others:
                raise PlanError(f"{name}'s norm input shares its root with a KV buffer")
            if root not in new_bases:
                new_bases.append(root)
            chains[name] = (root, chain)
            views[name] = as_strided_view(new_bases.index(root),
                                          *(_as_graph_ints(x, symbols) for x in x_view[:2]),
                                          _as_graph_ints([x_view[2]], symbols)[0])
        bases = [*new_bases, *others]
        for name, spec in call.views.items():
            if name not in ("q", "k"):
                spec = dict(spec)
                spec["base_index"] = bases.index(call.bases[spec["base_index"]])
                views[name] = spec
        op = family_op(True, call.store, call.tables)
        plan = NormPlan(call, norms, whole_norm, bases, views, chains, op)
        self._check_op(plan)
        return plan

    def _check_op(self, plan: NormPlan) -> None:
        call = plan.call
        probe = FusedCall(call.node, True, call.store, call.tables, {}, plan.views, plan.bases)
        views = {name: probe.fake_view(name) for name in plan.views}
        q, k = plan.norms["q"], plan.norms["k"]
        args = {**call.fake_args(), "q_weight": fake_value(q.weight),
                "k_weight": fake_value(k.weight), **_norm_args(q)}
        check_accepted(plan.op, views, args)

    def rewrite(self, tx: GraphTransaction, plan: NormPlan) -> list[Node]:
        call = plan.call
        graph = tx.graph
        q, k = plan.norms["q"], plan.norms["k"]
        args = {**call.args, "q_weight": q.weight, "k_weight": k.weight, **_norm_args(q)}
        anchor = latest([*plan.bases, q.weight, k.weight, *graph_nodes_in(call.args)], graph)
        new, outs = emit_call(tx, anchor, plan.op, args, plan.views, plan.bases)
        for index, old in call.outputs.items():
            base = call.bases[index]
            for name, norm in plan.norms.items():
                if base is norm.output:
                    root, chain = plan.chains[name]
                    value = tx.replay_views(chain, root, outs[plan.bases.index(root)])
                    break
            else:
                value = outs[plan.bases.index(base)]
            rebase_views(tx, old, value)
        whole = [probe_view for probe_view in (
            FusedCall(call.node, True, call.store, call.tables, {}, plan.views,
                      plan.bases).fake_view(n) for n in ("q", "k"))]
        for root in {r for r, _ in plan.chains.values()}:
            _redirect_disjoint_views(tx, root, outs[plan.bases.index(root)], new, whole)
        return [call.node, *call.outputs.values(), q.output, k.output]
