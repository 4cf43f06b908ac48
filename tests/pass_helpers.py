"""Shared models, graph capture and rendering for the fused-RoPE pass and backend tests.

* :class:`CaptureGraph`: a ``CustomGraphPass`` that records the post-grad graph it sees (a compact
  rendering, see :func:`render_graph`, and a copy that keeps every node's ``meta["val"]``, so the
  pass can later be applied to it directly). Its ``uuid()`` is None, which bypasses the FX graph
  cache: the graph is always compiled, and the passes always run.
* :func:`fresh_compile`: the context every compile test runs in: dynamo reset, counters cleared,
  FX graph and AOTAutograd caches off (a cache hit would skip the pass), ``no_grad``.
* :class:`QKVRope` / :class:`AttnLayer` / :class:`AttnStack`: the model shapes the tests compile;
  all rotate with ``RotaryEmbedding.forward_native`` (the spelling the pass matches).
* :func:`count_fused_calls`, :func:`copy_kinds`: what the generated code does.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from rope_compile.passes.fuse_qk_rope import FuseQKRopePass
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, Node

from rope_compile import RotaryEmbedding

# What one call of the fused op looks like in Inductor's generated wrapper code.
FUSED_CALL = "fused_qk_rope_with_cos_sin_cache_inplace.default("
FUSED_TARGET = "rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default"
# The op the pass emits where it reads a model's own cos/sin tables (HF, gpt-fast, torchtune).
TABLES_TARGET = "rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default"
FUSED_OP_CALL = re.compile(r"fused_qk_\w+_inplace\.default\(")
# Pass options that force the pass on for CPU graphs and make pass errors raise.
CPU_OPTIONS = {"devices": ("cpu",), "strict": True}
# Pass options that turn the layout-copy rule off (passes/layout_copy_rule.py, a cost policy
# that only ever leaves a pair to Inductor): every rewrite the pass can make is made.
FORCE_REWRITE = {"skip_pairs_only_read_by_copies": False}


def cpu_pass(**options) -> FuseQKRopePass:
    return FuseQKRopePass(**{**CPU_OPTIONS, **options})


def rope_counters() -> dict[str, int]:
    """``counters["rope_compile"]`` as a plain dict (without zero entries)."""
    return {k: v for k, v in counters["rope_compile"].items() if v}


@contextlib.contextmanager
def fresh_compile(grad: bool = False):
    """Independent compile: dynamo reset, counters cleared, caches off, no_grad by default."""
    torch._dynamo.reset()
    counters.clear()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        if not grad:
            stack.enter_context(torch.no_grad())
        yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# graph capture and rendering

_DTYPE_NAMES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "b8",
}
_WIDTH = 96


def _fmt(arg) -> str:
    if isinstance(arg, Node):
        return arg.name
    if isinstance(arg, list):
        return "[" + ", ".join(_fmt(a) for a in arg) + "]"
    if isinstance(arg, tuple):
        return "(" + ", ".join(_fmt(a) for a in arg) + ("," if len(arg) == 1 else "") + ")"
    if isinstance(arg, torch.dtype):
        return _DTYPE_NAMES.get(arg, str(arg))
    if isinstance(arg, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(arg)
    return repr(arg)


def _target_name(node: Node) -> str:
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(target)
    return getattr(target, "__name__", str(target))


def _type(node: Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f": {_DTYPE_NAMES.get(val.dtype, str(val.dtype))}{list(val.shape)}"
    return ""


def render_node(node: Node) -> str:
    if node.op == "placeholder":
        return f"{node.name}{_type(node)}"
    if node.op == "output":
        return f"return {_fmt(node.args[0])}"
    if node.op == "call_function" and node.target.__name__ == "getitem":
        return f"{node.name}{_type(node)} = {_fmt(node.args[0])}[{_fmt(node.args[1])}]"
    parts = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
    head = f"{node.name}{_type(node)} = {_target_name(node)}("
    line = head + ", ".join(parts) + ")"
    if len(line) <= _WIDTH:
        return line
    return head + "\n" + ",\n".join("    " + p for p in parts) + ")"


def render_graph(graph: Graph) -> str:
    """One line per node: ``name: dtype[shape] = target(args, kwargs)`` (long calls wrapped)."""
    return "\n".join(render_node(n) for n in graph.nodes) + "\n"


def copy_graph(graph: Graph) -> Graph:
    """A copy of ``graph`` with the same node names and (shallow-copied) meta."""
    new = Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


class CaptureGraph(CustomGraphPass):
    """Records every graph it is run on: ``renders`` (text) and ``graphs`` (copies)."""

    def __init__(self) -> None:
        self.renders: list[str] = []
        self.graphs: list[Graph] = []

    def __call__(self, graph: Graph) -> None:
        self.renders.append(render_graph(graph))
        self.graphs.append(copy_graph(graph))

    def uuid(self) -> None:
        return None


def capture_compile(fn, *inputs, rope_pass: FuseQKRopePass | None = None):
    """Compile ``fn`` with plain ``torch.compile`` (Inductor), ``rope_pass`` (if any) installed as
    the post-grad custom pass between two :class:`CaptureGraph` passes; run it on ``inputs``.

    Returns (outputs, before, after, rope counters); ``after`` is empty without ``rope_pass``."""
    before, after = CaptureGraph(), CaptureGraph()
    passes = (before,) if rope_pass is None else (before, rope_pass, after)
    with fresh_compile(), torch._inductor.config.patch(post_grad_custom_post_pass=passes):
        out = torch.compile(fn)(*inputs)
        counts = rope_counters()
    return out, before, after, counts


def fused_nodes(graph: Graph) -> list[Node]:
    """The ``auto_functionalized_v2`` nodes calling the fused op."""
    return [n for n in graph.nodes if n.op == "call_function"
            and "auto_functionalized" in _target_name(n)
            and str(n.args[0]) in (FUSED_TARGET, TABLES_TARGET)]


# --------------------------------------------------------------------------------------------
# generated code


def count_fused_calls(code: str) -> int:
    return len(FUSED_OP_CALL.findall(code))


def compile_with_misses(model, args, caplog, options: dict, *, no_errors: bool = False):
    """Compile ``model`` with the backend and ``options``, check it against eager (1e-4);
    returns (counters, the ``missed:`` counters, the DEBUG lines about RoPE-like misses, the
    generated code). No pass error, and with ``no_errors`` no error counter at all (candidate
    errors included)."""
    import logging

    from torch._inductor.utils import run_and_get_code

    expected = model(*args)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rope_compile"), fresh_compile():
        out, codes = run_and_get_code(torch.compile(model, backend="rope_compile",
                                                    options=dict(options)), *args)
        counts = rope_counters()
    assert "pass_errors" not in counts, counts
    if no_errors:
        assert not {k for k in counts if "error" in k}, counts
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    missed = {k: v for k, v in counts.items() if k.startswith("missed: ")}
    lines = [r.getMessage() for r in caplog.records if r.name == "rope_compile"
             and r.levelno == logging.DEBUG and "RoPE-like" in r.getMessage()]
    return counts, missed, lines, "\n".join(codes)


def with_call_count(found) -> tuple:
    """``compile_with_misses``' result with the number of fused calls in place of the code."""
    counts, missed, lines, code = found
    return counts, missed, lines, count_fused_calls(code)


def check_fused(found, layers: int) -> dict:
    """``with_call_count``'s result: rewritten once per layer, one fused call each, no miss;
    the counters."""
    counts, missed, lines, calls = found
    assert counts.get("rewritten") == layers and calls == layers, counts
    assert not missed and not lines, (missed, lines)
    return counts


def check_missed(found, layers: int) -> dict:
    """``with_call_count``'s result: not rewritten, each layer's two RoPEs counted misses with
    a DEBUG line each; the ``missed:`` counters."""
    counts, missed, lines, calls = found
    assert calls == 0 and "rewritten" not in counts, counts
    assert sum(missed.values()) == 2 * layers and len(lines) == 2 * layers, (missed, lines)
    return missed


# View ops Inductor names kernels after; what is left of a kernel's name without them tells
# whether the kernel computes anything or only copies.
_VIEW_OP_NAMES = ("_unsafe_view", "split_with_sizes", "as_strided", "transpose", "unsqueeze",
                  "squeeze", "permute", "reshape", "expand", "select", "slice", "split", "alias",
                  "view")
COPY_KINDS = ("clone", "copy")


def _kernel_calls(code: str) -> list[str]:
    body = code[code.index("def call("):]
    return re.findall(r"^\s+((?:cpp|triton_\w+?)_fused_\w+?)_\d+(?:\.run)?\(", body, re.M)


def copy_kinds(code: str) -> dict[str, int]:
    """How many calls in the wrapper code only copy data, by kind (``clone``, ``copy``): calls of
    kernels fused from nothing but view ops and clone/copy (e.g. ``cpp_fused_as_strided_clone_0``,
    how a failed reinplace of the fused op shows), plus ATen clone/copy_ fallback calls."""
    found = dict.fromkeys(COPY_KINDS, 0)
    for name in _kernel_calls(code):
        ops = name.split("_fused_", 1)[1]
        for view in _VIEW_OP_NAMES:
            ops = ops.replace(view, "")
        rest = {t for t in ops.split("_") if t}
        if rest and rest <= {"clone", "copy"}:
            for kind in rest:
                found[kind] += 1
    body = code[code.index("def call("):]
    found["clone"] += len(re.findall(r"\baten\.clone(?:\.default)?\(", body))
    found["copy"] += len(re.findall(r"\baten\.copy_(?:\.default)?\(|\.copy_\(", body))
    return found


# --------------------------------------------------------------------------------------------
# models


def _init_linear(linear: nn.Linear, generator: torch.Generator) -> nn.Linear:
    with torch.no_grad():
        fan_in = linear.weight.shape[1]
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / fan_in**0.5)
    return linear


class QKVRope(nn.Module):
    """qkv projection -> split -> ``RotaryEmbedding.forward_native`` -> (q, k, v)."""

    def __init__(self, hidden: int = 64, num_q_heads: int = 4, num_kv_heads: int = 2,
                 head_size: int = 128, rotary_dim: int | None = None, is_neox: bool = True,
                 max_position: int = 64, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hq, self.hk, self.d = num_q_heads, num_kv_heads, head_size
        self.qkv = _init_linear(
            nn.Linear(hidden, (num_q_heads + 2 * num_kv_heads) * head_size, bias=False), g)
        self.rope = RotaryEmbedding(head_size, rotary_dim or head_size, max_position, 10000.0,
                                    is_neox, torch.float32)
        self.qkv.to(dtype)  # the cos_sin_cache stays fp32, as in sglang's models

    def forward(self, positions: torch.Tensor, x: torch.Tensor):
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.hq * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        q, k = self.rope.forward_native(positions, q, k)
        return q, k, v


class AttnLayer(nn.Module):
    """qkv projection -> split -> RoPE -> causal GQA attention -> o projection (+ residual).

    ``gqa="repeat"`` repeats the kv heads (``repeat_interleave``) before SDPA, ``"sdpa"`` passes
    ``enable_gqa=True`` (SDPA then reads k and v as strided views of the projection)."""

    def __init__(self, hidden: int, num_q_heads: int, num_kv_heads: int, head_size: int,
                 rotary_dim: int, is_neox: bool, gqa: str, generator: torch.Generator) -> None:
        super().__init__()
        self.gqa = gqa
        self.hq, self.hk, self.d = num_q_heads, num_kv_heads, head_size
        self.qkv = _init_linear(
            nn.Linear(hidden, (num_q_heads + 2 * num_kv_heads) * head_size, bias=False),
            generator)
        self.o = _init_linear(nn.Linear(num_q_heads * head_size, hidden, bias=False), generator)
        self.rope = RotaryEmbedding(head_size, rotary_dim, 512, 10000.0, is_neox, torch.float32)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.hq * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        q, k = self.rope.forward_native(positions, q, k)
        q = q.view(t, self.hq, self.d).transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
        k = k.view(t, self.hk, self.d).transpose(0, 1).unsqueeze(0)
        v = v.view(t, self.hk, self.d).transpose(0, 1).unsqueeze(0)
        if self.gqa == "repeat":
            rep = self.hq // self.hk
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o = o.squeeze(0).transpose(0, 1).reshape(t, self.hq * self.d)
        return x + self.o(o)


class AttnStack(nn.Module):
    def __init__(self, num_layers: int = 2, hidden: int = 64, num_q_heads: int = 4,
                 num_kv_heads: int = 2, head_size: int = 128, rotary_dim: int | None = None,
                 is_neox: bool = True, gqa: str = "repeat", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(
            AttnLayer(hidden, num_q_heads, num_kv_heads, head_size, rotary_dim or head_size,
                      is_neox, gqa, g)
            for _ in range(num_layers))
        for layer in self.layers:  # the cos_sin_caches stay fp32
            layer.qkv.to(dtype)
            layer.o.to(dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(positions, x)
        return x


def positions_for(num_tokens: int, max_position: int = 64, seed: int = 0) -> torch.Tensor:
    """Distinct-ish, unsorted positions (not arange: a wrong row gather must show)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_position, (num_tokens,), generator=g)


def tokens(num_tokens: int, hidden: int = 64, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=g).to(dtype)
