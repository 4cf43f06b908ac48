"""``rope_compile.explain``: what the passes fuse in a model, and why not the rest.

    report = rope_compile.explain(model, *args, options={"devices": ("cpu",)}, **kwargs)
    print(report)

In the spirit of ``torch._dynamo.explain``: the model runs once, compiled with the
``rope_compile`` backend (dynamo's caches reset before and after, Inductor's FX graph cache off,
so that every pass runs), and the report says, per graph dynamo compiled, each RoPE pair fused
into one call (with its source line), what was fused with it (QK-norm, KV-cache store, cos/sin
computed in the kernel) and what was not and why, and each RoPE skipped or missed, with its
reason and the option that would change it. It is built from the events the passes record
(``rope_compile.passes.events``) beside their counters; ``counters`` per graph are there too.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._dynamo.utils import counters

from rope_compile.constants import DEFAULT_DEVICES, KNOWN_DEVICE_TYPES
from rope_compile.passes.events import PassEvent, format_options, option_change, recording

__all__ = ["ExplainReport", "FusedRope", "GraphReport", "NotFused", "explain"]

# Fusion prefixes (events, counters) in a reader's words.
FUSION_NAMES = {"rope": "RoPE", "qk_norm": "QK-norm", "kv_store": "KV store",
                "trig_in_kernel": "trig in kernel"}
_NO_OPTION = "no option changes this"


@dataclass
class NotFused:
    """A candidate left alone: a RoPE ``skipped`` by policy or proof, a RoPE-like subgraph
    ``missed`` (not proven a RoPE), or an extension of a fused call skipped. ``option``: the
    ``options`` that would rewrite it (the ones given, plus the change), or None."""

    kind: str
    fusion: str
    node: str
    source: str | None
    reason: str
    option: dict | None
    detail: str = ""

    def lines(self, indent: str) -> list[str]:
        what = FUSION_NAMES.get(self.fusion, self.fusion)
        out = [f"{indent}{what} {self.kind} at {self.node}: {self.reason}"]
        if self.detail and self.detail != self.reason:
            out.append(f"{indent}  matcher: {self.detail}")
        if self.source:
            out.append(f"{indent}  at {self.source}")
        out.append(f"{indent}  option: "
                   f"{format_options(self.option) if self.option else _NO_OPTION}")
        return out


@dataclass
class FusedRope:
    """A Q/K RoPE pair rewritten into one call: the rotated q and k nodes, their source lines,
    ``detail`` (rotary_dim, head_size, style), ``fused_with`` (fusion -> what it did: QK-norm,
    KV store, trig in kernel) and ``not_fused_with`` (the extensions tried and skipped)."""

    q: str
    k: str
    q_source: str | None
    k_source: str | None
    detail: str
    fused_with: dict[str, str] = field(default_factory=dict)
    not_fused_with: list[NotFused] = field(default_factory=list)

    def lines(self, indent: str) -> list[str]:
        out = [f"{indent}RoPE fused: {self.q} and {self.k} ({self.detail})"]
        sources = dict.fromkeys(s for s in (self.q_source, self.k_source) if s)
        out += [f"{indent}  at {s}" for s in sources]
        fused = ", ".join(FUSION_NAMES.get(f, f) for f in self.fused_with)
        out.append(f"{indent}  fused with it: {fused or 'nothing else'}")
        for fusion, what in self.fused_with.items():
            out.append(f"{indent}    {FUSION_NAMES.get(fusion, fusion)}: {what}")
        for skip in self.not_fused_with:
            out.append(f"{indent}  not fused with it: {FUSION_NAMES.get(skip.fusion, skip.fusion)}"
                       f": {skip.reason}")
            if skip.option:
                out.append(f"{indent}    option: {format_options(skip.option)}")
        return out


@dataclass
class GraphReport:
    """One graph dynamo compiled: its RoPE pairs fused, the candidates not fused, the
    ``rope_compile`` counters it bumped, and why dynamo ended the graph (a graph break)."""

    index: int
    fused: list[FusedRope]
    not_fused: list[NotFused]
    counters: dict[str, int]
    break_reason: str | None = None
    events: list[PassEvent] = field(default_factory=list, repr=False)

    @property
    def skipped(self) -> list[NotFused]:
        return [n for n in self.not_fused if n.kind == "skipped"]

    @property
    def missed(self) -> list[NotFused]:
        return [n for n in self.not_fused if n.kind == "missed"]

    def __str__(self) -> str:
        head = (f"graph {self.index}: {_plural(len(self.fused), 'RoPE pair')} fused, "
                f"{len(self.skipped)} skipped, {len(self.missed)} missed")
        lines = [head]
        if self.break_reason:
            lines.append(f"  graph break: {self.break_reason}")
        for rope in self.fused:
            lines += rope.lines("  ")
        for other in self.not_fused:
            lines += other.lines("  ")
        errors = {k: v for k, v in self.counters.items() if k in ("candidate_errors",
                                                                   "pass_errors")}
        if errors:
            lines.append(f"  errors inside the passes (see the rope_compile log): {errors}")
        return "\n".join(lines)


@dataclass
class ExplainReport:
    """What :func:`explain` found: one :class:`GraphReport` per graph dynamo compiled."""

    graphs: list[GraphReport]
    options: dict[str, Any]

    @property
    def fused(self) -> list[FusedRope]:
        return [r for g in self.graphs for r in g.fused]

    @property
    def skipped(self) -> list[NotFused]:
        return [n for g in self.graphs for n in g.skipped]

    @property
    def missed(self) -> list[NotFused]:
        return [n for g in self.graphs for n in g.missed]

    def __str__(self) -> str:
        opts = format_options(self.options) if self.options else "default options"
        lines = [f"rope_compile.explain ({opts}): {_plural(len(self.graphs), 'graph')}, "
                 f"{_plural(len(self.fused), 'RoPE pair')} fused, {len(self.skipped)} "
                 f"skipped, {len(self.missed)} missed"]
        for graph in self.graphs:
            lines += ["", str(graph)]
        return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _with_change(options: dict[str, Any], reason: str, devices: tuple[str, ...]) -> dict | None:
    """The given ``options`` with the change that lifts ``reason``; a graph on a device type
    the options leave out gets it added too (the pass checks the head size first, so a skip
    for the head size does not say that the device would be next)."""
    change = option_change(reason)
    if change is None:
        return None
    chosen = tuple(options.get("devices", DEFAULT_DEVICES))
    missing = tuple(d for d in devices if d not in chosen)
    if missing and "devices" not in change:
        change["devices"] = (*chosen, *missing)
    return {**options, **change}


def graph_report(index: int, events: list[PassEvent], options: dict[str, Any],
                 graph_counters: dict[str, int], break_reason: str | None = None,
                 devices: tuple[str, ...] = ()) -> GraphReport:
    """Group one graph's events: each fused pair with the extensions of its call (followed
    from call to call as each extension re-emits it), and everything not fused. ``devices``:
    the device types of the graph's inputs."""
    fused: list[FusedRope] = []
    owner: dict[str, FusedRope] = {}  # fused call node -> its pair
    not_fused: list[NotFused] = []
    for event in events:
        if event.kind == "fused":
            rope = FusedRope(event.nodes[0], event.nodes[-1], event.sources[0],
                             event.sources[-1], event.reason)
            fused.append(rope)
            owner.update(dict.fromkeys(event.calls, rope))
            continue
        rope = owner.get(event.nodes[0]) if event.fusion != "rope" else None
        if event.kind == "extended" and rope is not None:
            rope.fused_with[event.fusion] = event.reason
            owner.update(dict.fromkeys(event.calls, rope))
            continue
        item = NotFused(event.kind, event.fusion, event.nodes[0], event.source, event.reason,
                        _with_change(options, event.reason, devices), event.detail)
        (rope.not_fused_with if rope is not None else not_fused).append(item)
    return GraphReport(index, fused, not_fused, graph_counters, break_reason, list(events))


def _break_reason(gm: torch.fx.GraphModule) -> str | None:
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = str(getattr(reason, "reason", reason)).strip()
    return text.splitlines()[0] if text else None  # dynamo's first line; then its advice


def explain(model, *args, options: dict[str, Any] | None = None, mode: str | None = None,
            **kwargs) -> ExplainReport:
    """Run ``model(*args, **kwargs)`` once, compiled with the ``rope_compile`` backend and
    ``options`` (as ``torch.compile``'s, checked at once), and report per graph what the
    passes fused and why not the rest (see :class:`ExplainReport`; ``print`` it).

    Like ``torch._dynamo.explain`` this resets dynamo before and after (models compiled before
    recompile on their next call), and it turns Inductor's FX graph cache off for the run, so
    the passes run on every graph. Graphs compiled later (a backward, a recompilation on new
    shapes) are not in the report. ``options`` and ``mode`` are this function's: a model's own
    keyword arguments of those names cannot be passed."""
    from .backend import RopeCompileBackend

    backend = RopeCompileBackend(mode=mode, options=options)
    graphs: list[GraphReport] = []

    def explaining_backend(gm, example_inputs, **compile_kwargs):
        before = Counter(counters["rope_compile"])
        with recording() as events:
            compiled = backend(gm, example_inputs, **compile_kwargs)
        bumped = Counter(counters["rope_compile"])
        bumped.subtract(before)
        devices = dict.fromkeys(t.device.type for t in example_inputs
                                if isinstance(t, torch.Tensor)
                                and t.device.type in KNOWN_DEVICE_TYPES)
        graphs.append(graph_report(len(graphs), events, backend.options,
                                   {k: v for k, v in bumped.items() if v},
                                   _break_reason(gm), tuple(devices)))
        return compiled

    explaining_backend.__name__ = "rope_compile"
    torch._dynamo.reset()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
            torch.compile(model, backend=explaining_backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return ExplainReport(graphs, dict(backend.options))
