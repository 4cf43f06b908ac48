"""The ``rope_compile`` torch.compile backend: Inductor with the fused-RoPE pass installed.

    torch.compile(model, backend="rope_compile")
    torch.compile(model, backend="rope_compile", mode="reduce-overhead")
    torch.compile(model, backend="rope_compile", options={"devices": ("cpu",)})

``options`` takes the pass options ``head_sizes``, ``devices`` and ``strict``; every other key is
an Inductor config patch, as with the default backend. ``mode`` is passed on to Inductor
(torch.compile accepts either ``mode`` or ``options``, not both). The pass is appended after any
``post_grad_custom_post_pass`` already configured, never replacing it. Registered by name through
the ``torch_dynamo_backends`` entry point (``pip install`` makes ``backend="rope_compile"`` work;
the module must not register itself too, or the entry-point load would be a duplicate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import get_custom_graph_passes

from passes.fuse_qk_rope import FuseQKRopePass

PASS_OPTIONS = ("head_sizes", "devices", "strict")


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pass options, Inductor config patches) from torch.compile's ``options`` dict."""
    options = dict(options or {})
    pass_options = {key: options.pop(key) for key in PASS_OPTIONS if key in options}
    if isinstance(pass_options.get("devices"), str):
        pass_options["devices"] = (pass_options["devices"],)
    return pass_options, options


def chained_post_grad_passes(rope_pass: FuseQKRopePass) -> tuple:
    """The user's configured post-grad custom passes (minus any older copy of ours), then ours."""
    existing = get_custom_graph_passes(torch._inductor.config.post_grad_custom_post_pass)
    return (*(p for p in existing if not isinstance(p, FuseQKRopePass)), rope_pass)


def rope_compile_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                         options: dict[str, Any] | None = None):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    import rope_compile.ops  # noqa: F401  (registers the op the pass emits)

    pass_options, config_patches = split_options(options)
    rope_pass = FuseQKRopePass(**pass_options)
    patches = {**list_mode_options(mode or "default"), **config_patches}
    patches["post_grad_custom_post_pass"] = chained_post_grad_passes(rope_pass)
    return compile_fx(gm, example_inputs, config_patches=patches)

