"""Every RoPE family of ``tests/test_model_families.py`` in train mode: one training step
(forward, ``loss.backward()``) compiled with plain Inductor and with the backend (the rewrite
forced on the CPU), from the same initial weights. The forward is rewritten once per RoPE layer,
and every parameter's gradient equals plain Inductor's within float32 rounding.

The families are ``GPU_CASES`` (HF rotate_every_two, Falcon GQA, torchtune and complex
``freqs_cis`` mirrors, litgpt, full tables with unequal halves, dynamic NTK Llama, Gemma3, the
Qwen2-VL / Qwen2.5-VL mRoPE text decoders), in float32. CI runs four of them (one per spelling
kind: GPT-J pairs, gathered pair tables, HF full tables after a graph break, mRoPE streams);
``ROPE_TRAIN_FAMILIES=all`` runs all 14 (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

import torch  # noqa: E402
from pass_helpers import CPU_OPTIONS, FORCE_REWRITE, fresh_compile, rope_counters  # noqa: E402
from test_model_families import GPU_CASES  # noqa: E402

FORCED = {**CPU_OPTIONS, **FORCE_REWRITE}
ALL = [name for name in GPU_CASES if not name.endswith("bf16")]
CI = ["gptj", "torchtune_input_pos", "llama_dynamic_ntk", "qwen2_vl"]
CASES = ALL if os.environ.get("ROPE_TRAIN_FAMILIES") == "all" else CI


def _train_step(case: str, backend: str, options=None):
    """(output, gradients by parameter name, rope counters) of one compiled training step."""
    make, _ = GPU_CASES[case]
    model, fn, args = make()
    model.train()

    def step(*inputs):
        out = fn(*inputs)
        out.float().pow(2).mean().backward()
        return out.detach()

    kwargs = {"backend": backend} | ({"options": options} if options else {})
    with fresh_compile(grad=True):
        out = torch.compile(step, **kwargs)(*args)
        counts = rope_counters()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return out, grads, counts


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_plain_inductor(case):
    _, layers = GPU_CASES[case]
    out, grads, _ = _train_step(case, "inductor")
    out2, grads2, counts = _train_step(case, "rope_compile", FORCED)
    assert counts.get("rewritten", 0) >= layers, counts  # the forward's pairs (and any recompute)
    assert not {k for k in counts if "error" in k}, counts
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    assert grads2.keys() == grads.keys() and grads, sorted(grads)
    for name, want in grads.items():
        torch.testing.assert_close(grads2[name], want, atol=1e-5, rtol=1e-5, msg=name)
