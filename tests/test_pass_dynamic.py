"""Dynamic token counts: the rewrite fires on a symbolic-T graph and serves every T, unrecompiled.

First call at T=7 (compiles a graph with a symbolic T), then T = 2, 64, 300 under
``error_on_recompile``. T=1 is not part of the no-recompile check: Dynamo specializes sizes 0
and 1 (``dynamic=True`` and ``mark_dynamic`` alike), so T=1 compiles its own graph whatever the
pass does; it is checked separately (rewritten too, and equal to eager).
"""

from __future__ import annotations

import re

import pytest
import torch
from pass_helpers import (
    CPU_OPTIONS,
    AttnStack,
    QKVRope,
    count_fused_calls,
    fresh_compile,
    positions_for,
    rope_counters,
    tokens,
)
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

MAX_POS = 512
FIRST_T = 7
OTHER_TS = (2, 64, 300)


def _inputs(num_tokens: int, mark: bool = False):
    positions, x = positions_for(num_tokens, MAX_POS, seed=num_tokens), tokens(num_tokens)
    if mark:
        torch._dynamo.mark_dynamic(positions, 0)
        torch._dynamo.mark_dynamic(x, 0)
    return positions, x


def _assert_eager(model, out, inputs):
    with torch.no_grad():
        expected = model(*inputs)
    if isinstance(expected, torch.Tensor):
        out, expected = (out,), (expected,)
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _check(model, *, dynamic: bool | None, mark: bool, pairs: int, t1: bool = True):
    compiled = torch.compile(model, backend="rope_compile", options=CPU_OPTIONS, dynamic=dynamic)
    inputs = _inputs(FIRST_T, mark)
    out, codes = run_and_get_code(compiled, *inputs)
    _assert_eager(model, out, inputs)
    (code,) = codes
    assert count_fused_calls(code) == pairs
    # The fused op's q view is sized by the symbolic token count, e.g. (s77, 4, 128).
    assert re.search(r"fused_qk_rope_with_cos_sin_cache_inplace\.default\("
                     r"reinterpret_tensor\(buf\d+, \(s\d+, ", code), code
    assert rope_counters() == {"pairs_found": pairs, "rewritten": pairs}
    assert counters["stats"]["unique_graphs"] == 1

    with torch._dynamo.config.patch(error_on_recompile=True):
        for num_tokens in OTHER_TS:
            inputs = _inputs(num_tokens)
            _assert_eager(model, compiled(*inputs), inputs)
    assert counters["stats"]["unique_graphs"] == 1
    assert rope_counters() == {"pairs_found": pairs, "rewritten": pairs}  # no second compile

    if not t1:
        return
    # T=1: a graph of its own (0/1 specialization), rewritten as well.
    inputs = _inputs(1)
    _assert_eager(model, compiled(*inputs), inputs)
    assert rope_counters() == {"pairs_found": 2 * pairs, "rewritten": 2 * pairs}


@pytest.mark.parametrize(
    ("is_neox", "rotary_dim"), [(True, 128), (False, 64)], ids=["neox-full", "gptj-rot64"])
def test_dynamic_true(is_neox, rotary_dim):
    model = QKVRope(is_neox=is_neox, rotary_dim=rotary_dim, max_position=MAX_POS)
    with fresh_compile():
        _check(model, dynamic=True, mark=False, pairs=1)


def test_mark_dynamic_token_dim():
    model = QKVRope(is_neox=True, rotary_dim=64, max_position=MAX_POS)
    with fresh_compile():
        _check(model, dynamic=None, mark=True, pairs=1)


def test_mark_dynamic_attention_stack():
    model = AttnStack(num_layers=2, gqa="repeat")
    with fresh_compile():
        _check(model, dynamic=None, mark=True, pairs=2, t1=False)


def test_first_call_t1_dynamic_true():
    """Starting at T=1: correct and rewritten; the next T compiles the dynamic graph."""
    model = QKVRope(max_position=MAX_POS)
    with fresh_compile():
        compiled = torch.compile(model, backend="rope_compile", options=CPU_OPTIONS,
                                 dynamic=True)
        for num_tokens in (1, FIRST_T, 300):
            inputs = _inputs(num_tokens)
            _assert_eager(model, compiled(*inputs), inputs)
        assert rope_counters() == {"pairs_found": 2, "rewritten": 2}
        assert counters["stats"]["unique_graphs"] == 2
