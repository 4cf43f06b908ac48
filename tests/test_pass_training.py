"""Training steps through the backend: the forward graph's rotated q and k that are saved for
the backward (not seen by the user) stay the in-place result (``passes/readers.py``,
``reaches_the_user``), so the rewrite adds no copy kernel; gradients equal plain Inductor's.

Each test compiles one step (forward, ``loss.backward()``) with plain Inductor and with the
backend (the rewrite forced on the CPU), from the same initial weights.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from pass_helpers import AttnStack, _kernel_calls, fresh_compile, positions_for, rope_counters
from rope_compile.passes.miss_report import BACKWARD_REASON
from torch._inductor.utils import run_and_get_code

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORCED = {"devices": ("cpu",), "strict": True, "skip_pairs_only_read_by_copies": False}
BACKWARD_MISS = f"missed: {BACKWARD_REASON}"


def _step(make_model, make_inputs, backend, options=None, dynamic=None):
    torch.manual_seed(0)
    model = make_model().train()
    inputs = make_inputs()

    def step(*args):
        out = model(*args)
        out = getattr(out, "logits", out)
        out.float().pow(2).mean().backward()
        return out.detach()

    with fresh_compile(grad=True):
        kwargs = {"backend": backend, "dynamic": dynamic}
        if options:
            kwargs["options"] = options
        out, codes = run_and_get_code(torch.compile(step, **kwargs), *inputs)
        counts = rope_counters()
    grads = [p.grad.clone() for p in model.parameters()]
    return out, grads, codes, counts


def _compare(make_model, make_inputs, dynamic=None):
    out, grads, codes, _ = _step(make_model, make_inputs, "inductor", dynamic=dynamic)
    out2, grads2, codes2, counts = _step(make_model, make_inputs, "rope_compile", FORCED,
                                         dynamic=dynamic)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads2, grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return codes, codes2, counts


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=256, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def _ids():
    return (torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1)),)


def test_hf_llama_saved_activations_are_not_copied():
    codes, codes2, counts = _compare(_llama, _ids)
    # 2 layers, forward and backward (the backward's dq/dk: tests/test_pass_backward.py)
    assert counts.get("rewritten") == 4, counts
    forward, forward2 = codes[0], codes2[0]
    assert len(re.findall(r"torch\.ops\.rope_compile\.\w+", forward2)) == 2  # one per layer
    # The saved q/k are the in-place result: no kernel copies them into eager's layout, so the
    # forward has no more kernels than Inductor's (its RoPE kernels become the fused calls).
    assert len(_kernel_calls(forward2)) < len(_kernel_calls(forward))


def test_sglang_style_stack_gradients():
    def inputs():
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
        return positions_for(16, 512), x

    codes, codes2, counts = _compare(lambda: AttnStack(num_layers=2, gqa="sdpa"), inputs)
    # Forward and backward: the backward's dq/dk read the cos/sin the forward saved ([T, 1,
    # rot/2] graph inputs) in place, sin negated.
    assert counts.get("rewritten") == 4, counts
    assert BACKWARD_MISS not in counts, counts
    assert len(_kernel_calls(codes2[0])) <= len(_kernel_calls(codes[0]))


def test_hf_llama_dynamic_training_is_rewritten():
    """With dynamic shapes, the saved q/k need no copy (the symbolic layout was the only
    reason the pair was skipped)."""
    _, _, counts = _compare(_llama, _ids, dynamic=True)
    assert counts.get("rewritten") == 4, counts  # forward and backward
    assert not any(key.startswith("skipped") for key in counts), counts


def _llama_checkpointed():
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_hf_llama_activation_checkpointing_keeps_the_rewrite(dynamic):
    """Activation checkpointing (HF's non-reentrant ``gradient_checkpointing_enable``): the
    forward's pairs and the backward graph's recomputed forward pairs are rewritten, static and
    dynamic; gradients equal plain Inductor's. The recomputed q/k are read by the attention
    wrapped in ``run_and_save_rng_state`` / ``run_with_rng_state`` and by the attention
    backward: value readers (``passes/readers.py``). Dynamo compiles HF's checkpointed layers
    only with ``skip_fwd_side_effects_in_bwd_under_checkpoint`` (its hint; else they run
    eagerly, for plain Inductor too)."""
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        codes, codes2, counts = _compare(_llama_checkpointed, _ids, dynamic=dynamic)
    # 2 layers: the forward, its recompute in the backward graph, and the backward's dq/dk.
    # With dynamic shapes the dq/dk pair is skipped: its strides (128 * s) have no graph node.
    symbolic = [k for k in counts if k.startswith("skipped: symbolic size")]
    assert counts.get("rewritten") == (6 if dynamic is None else 4), counts
    assert len(symbolic) == (0 if dynamic is None else 1), counts
    assert not any(key.startswith("skipped") for key in counts if key not in symbolic), counts
    assert {k for k in counts if k.startswith("missed")} <= {BACKWARD_MISS}, counts
    backward = [c for c in codes2 if "rope_compile" in c and "backward" in c.lower()]
    assert backward, "the recomputed forward RoPE in the backward graph was not rewritten"
