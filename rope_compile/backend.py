"""The ``rope_compile`` torch.compile backend: Inductor with the fused-RoPE pass installed.

    torch.compile(model, backend="rope_compile")
    torch.compile(model, backend="rope_compile", mode="reduce-overhead")
    torch.compile(model, backend="rope_compile", options={"devices": ("cpu",)})

``options`` takes the pass options ``head_sizes``, ``devices``, ``strict`` and
``skip_pairs_only_read_by_copies`` (the pair pass's alone); every other key is
an Inductor config patch, as with the default backend. Both are checked before anything is
compiled (``rope_compile.options``): a bad one raises a ``ValueError`` that names it and, for a
near miss, the right name. ``mode`` is passed on to Inductor
(torch.compile accepts either ``mode`` or ``options``, not both). The pass is appended after any
``post_grad_custom_post_pass`` already configured, never replacing it. Registered by name through
the ``torch_dynamo_backends`` entry point (``pip install`` makes ``backend="rope_compile"`` work;
the module must not register itself too, or the entry-point load would be a duplicate).

When a bad option fails. ``torch.compile`` resolves ``backend="rope_compile"`` to
:func:`rope_compile_backend` at once but keeps ``options`` unread until the first graph is
compiled, at the first call of the compiled model; dynamo then wraps the ``ValueError`` in
``torch._dynamo.exc.BackendCompilerFailed`` (the ``ValueError`` is its ``inner_exception``).
To fail at once, bind the options with this module, which is callable::

    torch.compile(model, backend=rope_compile.backend(devices=("cpu",), strict=True))
    torch.compile(model, backend=rope_compile.backend(mode="reduce-overhead"))

``rope_compile.backend(**options)`` (:func:`make_backend`) checks every option and ``mode``
before it returns, raising the same ``ValueError``; options given to ``torch.compile`` as well
are added to the bound ones at the first compile.
"""

from __future__ import annotations

import hashlib
import sys
import types
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from rope_compile.decision_cache import decision_key, record_or_replay, snapshot
from rope_compile.options import (
    PASS_OPTIONS,
    SHARED_PASS_OPTIONS,
    did_you_mean,
    split_and_validate_backend_options,
)
from rope_compile.passes.fuse_kv_store import FuseKVStorePass
from rope_compile.passes.fuse_qk_norm import FuseQKNormPass
from rope_compile.passes.fuse_qk_rope import FuseQKRopePass
from rope_compile.passes.fuse_trig_in_kernel import ComputeTrigInKernelPass

__all__ = ["PASS_OPTIONS", "RopeCompileBackend", "make_backend", "rope_compile_backend",
           "split_options"]

STATIC_LAUNCH_USER_KERNELS = "static_launch_user_defined_triton_kernels"


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pass options, Inductor config patches) from torch.compile's ``options`` dict, validated:
    a bad pass option, or a key that is neither a pass option nor an Inductor config key, raises
    a ``ValueError`` naming it (see ``rope_compile.options``)."""
    return split_and_validate_backend_options(options)


class ChainedGraphPass(CustomGraphPass):
    """Several post-grad passes run in order, as one ``CustomGraphPass`` (torch < 2.13 takes a
    single pass in ``post_grad_custom_post_pass``). Its uuid combines theirs, or is None (no FX
    graph caching, as Inductor does for any uncacheable pass) if one of them has none."""

    def __init__(self, passes) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self):
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        if any(i is None for i in ids):
            return None
        return hashlib.sha256(repr(ids).encode()).hexdigest()


def _flatten(configured) -> list:
    if configured is None:
        return []
    if isinstance(configured, (list, tuple)):
        return [p for item in configured for p in _flatten(item)]
    if isinstance(configured, ChainedGraphPass):
        return _flatten(configured.passes)
    return [configured]


_UNSET = object()


_OUR_PASSES = (FuseQKRopePass, FuseQKNormPass, FuseKVStorePass, ComputeTrigInKernelPass)


def chained_post_grad_passes(rope_pass: FuseQKRopePass, configured=_UNSET,
                             extensions=()) -> CustomGraphPass:
    """The user's post-grad custom passes (``configured``, by default Inductor's config; minus
    any older copy of ours), then ours: the RoPE pair fusion, then the ``extensions`` of its
    calls (QK-norm, KV store)."""
    if configured is _UNSET:
        configured = torch._inductor.config.post_grad_custom_post_pass
    existing = [p for p in _flatten(configured) if not isinstance(p, _OUR_PASSES)]
    chain = [*existing, rope_pass, *extensions]
    return ChainedGraphPass(chain) if len(chain) > 1 else rope_pass


def rope_compile_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                         options: dict[str, Any] | None = None):
    """The backend ``backend="rope_compile"`` names: ``options`` are checked here, when dynamo
    compiles the first graph (see the module docstring, and :func:`make_backend`)."""
    pass_options, config_patches = split_options(options)  # first: a bad option fails at once
    return _compile_with_passes(gm, example_inputs, mode, pass_options, config_patches)


def _compile_with_passes(gm: torch.fx.GraphModule, example_inputs, mode: str | None,
                         pass_options: dict[str, Any], config_patches: dict[str, Any]):
    """Inductor with our passes, for options already checked by :func:`split_options`."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    import rope_compile.ops  # noqa: F401  (registers the op the pass emits)
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()

    rope_pass = FuseQKRopePass(**pass_options)
    patches = {**list_mode_options(mode or "default"), **config_patches}
    # A pass given in ``options`` is the user's too: chained before ours, never dropped.
    # Then the fusions that extend its calls: QK-norm before, the KV-cache store after.
    # Last, a RoPE call that still reads the model's cos/sin tables computes them in the kernel
    # from the angles where that is proven (no table kernel).
    shared = {k: v for k, v in pass_options.items() if k in SHARED_PASS_OPTIONS}
    extensions = (FuseQKNormPass(**shared), FuseKVStorePass(**shared),
                  ComputeTrigInKernelPass(**shared))
    patches["post_grad_custom_post_pass"] = chained_post_grad_passes(
        rope_pass, patches.get("post_grad_custom_post_pass", _UNSET), extensions)
    if hasattr(torch._inductor.config, STATIC_LAUNCH_USER_KERNELS):
        # Inductor launches its own kernels with its static launcher, but user-defined Triton
        # kernels (ours, once lowered) with Triton's Python launcher unless this is set; it
        # falls back per kernel where static launch is unsupported. A user's option wins.
        patches.setdefault(STATIC_LAUNCH_USER_KERNELS, True)
    # On a cache hit the pass does not run: its recorded decisions are reported instead.
    key = decision_key(gm, example_inputs, patches, rope_pass.uuid())
    before = snapshot()
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    record_or_replay(key, before, pass_ran=rope_pass.calls > 0)
    return compiled



def _validate_mode(mode: Any) -> str | None:
    from torch._inductor import list_mode_options

    if mode is None:
        return None
    modes = [m for m in list_mode_options() if m]
    if not isinstance(mode, str) or mode not in modes:
        raise ValueError(f"rope_compile `mode`: must be one of {modes} or None, got {mode!r}"
                         f"{did_you_mean(mode, modes) if isinstance(mode, str) else ''}")
    return mode


class RopeCompileBackend:
    """The ``rope_compile`` backend with its options bound and already checked; made by
    ``rope_compile.backend(**options)`` (:func:`make_backend`). Dynamo calls it as any backend,
    ``backend(gm, example_inputs)``; a ``mode`` or ``options`` that ``torch.compile`` was also
    given come in as keywords: ``options`` are added to the bound ones (and win), ``mode``
    replaces the bound one."""

    def __init__(self, mode: str | None = None, options: dict[str, Any] | None = None) -> None:
        self.mode = _validate_mode(mode)
        self.options = dict(options or {})
        self.pass_options, self.config_patches = split_options(self.options)
        self.__name__ = "rope_compile"  # dynamo names the backend in its messages by this

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                 options: dict[str, Any] | None = None):
        pass_options, config_patches = self.pass_options, self.config_patches
        if options:
            pass_options, config_patches = split_options({**self.options, **options})
        mode = _validate_mode(mode) if mode is not None else self.mode
        return _compile_with_passes(gm, example_inputs, mode, pass_options, config_patches)

    def __repr__(self) -> str:
        bound = [f"mode={self.mode!r}"] if self.mode else []
        bound += [f"{key}={value!r}" for key, value in self.options.items()]
        return f"rope_compile.backend({', '.join(bound)})"


def make_backend(*, mode: str | None = None, **options: Any) -> RopeCompileBackend:
    """``rope_compile.backend(**options)``: the backend with ``options`` (the keys of
    ``torch.compile``'s ``options`` for this backend: the pass options and Inductor config
    patches) and ``mode`` bound, every one checked now. A bad one raises a ``ValueError``
    naming it, before ``torch.compile`` is even called::

        torch.compile(model, backend=rope_compile.backend(head_sizes=(64, 128), strict=True))

    Inductor's dotted keys are given through a dict: ``rope_compile.backend(**{"triton.cudagraphs":
    False})``. Unlike ``torch.compile``, both ``mode`` and options may be given."""
    return RopeCompileBackend(mode=mode, options=options)


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`make_backend`: ``rope_compile.backend(strict=True)``
    builds a backend, while ``rope_compile.backend.rope_compile_backend`` and every other name
    here stay where they are (the entry point names this module). Given as the backend itself
    (``backend=rope_compile.backend``), dynamo's call ``(gm, example_inputs, **kwargs)`` is
    :func:`rope_compile_backend`'s."""

    def __call__(self, *args: Any, mode: str | None = None, **options: Any):
        if args and isinstance(args[0], torch.fx.GraphModule):
            return rope_compile_backend(*args, mode=mode, **options)
        if args:
            raise TypeError("rope_compile.backend takes its options as keywords, e.g. "
                            "rope_compile.backend(strict=True) or rope_compile.backend(**options)"
                            f"; got {len(args)} positional argument(s)")
        return make_backend(mode=mode, **options)


sys.modules[__name__].__class__ = _CallableModule
