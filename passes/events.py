"""What the passes decided, as records: each RoPE pair fused, each extension of a fused call
(QK-norm, KV store, trig in the kernel), each skip and each miss, with the model's source line
of the graph node concerned. ``rope_compile.explain`` reads them; they cost nothing unless
something is :func:`recording`.

    with recording() as events:        # a list of PassEvent, appended to as the passes run
        compile_fx(gm, example_inputs, config_patches=...)

The passes call :func:`record` beside each counter they bump (``rewritten``, ``skipped: ...``,
``missed: ...``, ``<fusion> rewritten``, ``<fusion> skipped: ...``); the counters stay the
totals, the events say where. :func:`source_line` is also what the log lines add to a node's
name.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.fx import Node

from .layout_copy_rule import COPY_ONLY_REASON

__all__ = ["PassEvent", "format_options", "inherit_source", "option_change", "option_hint",
           "record", "recording", "source_line", "with_source"]

# The fusions, by the prefix of their counters ("rope": the pair pass, unprefixed counters).
FUSIONS = ("rope", "qk_norm", "kv_store", "trig_in_kernel")
KINDS = ("fused", "extended", "skipped", "missed")

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')


@dataclass(frozen=True)
class PassEvent:
    """One decision of one pass on one candidate.

    ``kind``: ``fused`` (a Q/K RoPE pair became one call), ``extended`` (a fusion widened a
    call), ``skipped`` (a proven candidate left alone by policy or proof), ``missed`` (a
    RoPE-like subgraph the matcher did not prove). ``nodes``: the graph nodes, as the log names
    them (the rotated q and k; the call; the candidate output); ``sources``: the source line of
    each (None where the node has no stack trace); ``calls``: the fused call nodes the event
    leaves in the graph (``fused``, ``extended``), which later extensions name; ``reason``: what
    was done or why not; ``detail``: the matcher's own words for a miss."""

    kind: str
    fusion: str
    nodes: tuple[str, ...]
    sources: tuple[str | None, ...]
    reason: str
    calls: tuple[str, ...] = ()
    detail: str = ""

    @property
    def source(self) -> str | None:
        """The first node's source line that is known."""
        return next((s for s in self.sources if s), None)


_listeners: list[list[PassEvent]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[PassEvent]]:
    """Collect the events of the passes that run inside the block (nested blocks each get
    every event of theirs)."""
    events: list[PassEvent] = []
    _listeners.append(events)
    try:
        yield events
    finally:
        _listeners.remove(events)


def record(kind: str, fusion: str, nodes: Iterable[Node], reason: str,
           calls: Iterable[Node] = (), detail: str = "") -> None:
    """Append an event to every :func:`recording` block open; nothing otherwise. ``calls`` may
    hold any new nodes: the fused calls among them are kept."""
    if not _listeners:
        return
    nodes = tuple(nodes)
    event = PassEvent(kind, fusion, tuple(n.name for n in nodes),
                      tuple(source_line(n) for n in nodes), reason,
                      tuple(n.name for n in calls if _is_fused_call(n)), detail)
    for events in _listeners:
        events.append(event)


def _is_fused_call(node: Node) -> bool:
    op = node.args[0] if node.op == "call_function" and node.args else None
    name = getattr(getattr(op, "_schema", None), "name", "")
    return getattr(node.target, "__name__", "") == "auto_functionalized_v2" and name.startswith(
        "rope_compile::")


def source_line(node: Node) -> str | None:
    """``file:line in function: code`` of the innermost frame of ``node.meta["stack_trace"]``
    outside rope-compile's drop-ins (``RotaryEmbedding.forward_native`` and the like are called
    from the model's line that matters), or None without a stack trace."""
    trace = node.meta.get("stack_trace") if isinstance(node, Node) else None
    if not trace:
        return None
    lines = trace.rstrip().splitlines()
    frames = [(i, m) for i, line in enumerate(lines) if (m := _FRAME.search(line))]
    if not frames:
        return None
    drop_ins = _drop_in_files()
    i, frame = next(((i, m) for i, m in reversed(frames)
                     if Path(m["file"]).resolve() not in drop_ins), frames[-1])
    code = lines[i + 1].strip() if i + 1 < len(lines) else ""
    where = f"{frame['file']}:{frame['line']} in {frame['fn']}"
    return f"{where}: {code}" if code and not _FRAME.search(code) else where


# The modules of the drop-ins a model calls (RotaryEmbedding, apply_rotary_emb, the KV store).
_DROP_IN_MODULES = ("rope_compile.module", "rope_compile.kv_store")


def _drop_in_files() -> set[Path]:
    files = (getattr(sys.modules.get(name), "__file__", None) for name in _DROP_IN_MODULES)
    return {Path(f).resolve() for f in files if f}


def inherit_source(nodes: Iterable[Node], origin: Node) -> None:
    """Give the fused calls among ``nodes`` (new ones) the stack trace of ``origin`` (the node
    they replace), so that later skips and events of theirs name the model's line."""
    trace = origin.meta.get("stack_trace")
    for node in nodes:
        if trace and _is_fused_call(node) and not node.meta.get("stack_trace"):
            node.meta["stack_trace"] = trace


def with_source(node: Node) -> str:
    """``node``'s name, with its source line where it has one: for log lines."""
    where = source_line(node)
    return f"{node.name} ({where})" if where else node.name


_HEAD_SIZE = re.compile(r"head_size (?P<size>\d+) not in (?P<sizes>\([\d, ]*\))")
_DEVICE = re.compile(r"device (?P<device>\w+) not in (?P<devices>\([^)]*\))")


def option_change(reason: str) -> dict | None:
    """The backend option (as a dict of ``options``) with which a candidate skipped for
    ``reason`` would be rewritten; None where no option changes the outcome."""
    if match := _HEAD_SIZE.search(reason):
        sizes = {int(s) for s in re.findall(r"\d+", match["sizes"])}
        return {"head_sizes": tuple(sorted({int(match["size"]), *sizes}))}
    if match := _DEVICE.search(reason):
        devices = tuple(re.findall(r"'(\w+)'", match["devices"]))
        return {"devices": (*devices, match["device"])}
    if reason == COPY_ONLY_REASON:
        return {"skip_pairs_only_read_by_copies": False}
    return None


def format_options(options: dict) -> str:
    """``options={"key": value, ...}``, as written in a ``torch.compile`` call."""
    return "options={" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in options.items()) + "}"


def _py(value) -> str:
    """``value`` as Python source, strings in double quotes."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        items = ", ".join(map(_py, value))
        if isinstance(value, list):
            return f"[{items}]"
        return f"({items},)" if len(value) == 1 else f"({items})"
    return repr(value)


def option_hint(reason: str) -> str | None:
    """:func:`option_change` written as ``options={...}`` for ``torch.compile``, or None."""
    change = option_change(reason)
    return format_options(change) if change else None
