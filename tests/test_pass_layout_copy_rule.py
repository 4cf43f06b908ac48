"""The rule "no fusion that saves nothing" (``passes/layout_copy_rule.py``): a proven Q/K pair
whose rotated q and k are read only by layout copies is left to Inductor, which computes the
RoPE inside the copies; the rewrite would add a pass over q and k.

Compiled with ``backend="rope_compile"`` and the CPU test options (pass forced on, strict):

* left alone, with one ``skipped: <reason>`` count and one DEBUG line: q and k only
  ``.contiguous()``-copied after a transpose; k concatenated to a past (DynamicCache's
  ``cat``); a cast and a pad; HF's eager attention (``matmul(q, k.transpose(2, 3))`` after
  ``repeat_kv``: every operand reshape of the ``[B, H, S, D]`` views is a copy);
* the same graphs with ``skip_pairs_only_read_by_copies=False``: rewritten;
* rewritten as before where some reader is not a copy: q read by SDPA, or q also returned;
  k stored into a KV cache (``k_cache[loc] = k``, which ``FuseKVStorePass`` then absorbs);
* a reshape is a view or a copy by its input's strides, not by its fake value's storage;
* the option: validated, in the pass's ``uuid()``, and not handed to the extension passes.

Every compiled result equals eager's.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import (
    CPU_OPTIONS,
    FORCE_REWRITE,
    count_fused_calls,
    fresh_compile,
    positions_for,
    rope_counters,
)
from rope_compile.passes.fuse_qk_rope import FuseQKRopePass
from rope_compile.passes.layout_copy_rule import COPY_ONLY_REASON, layout_copies_reading
from torch._inductor.utils import run_and_get_code
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph

from rope_compile import RotaryEmbedding
from rope_compile.options import split_and_validate_backend_options

T, HQ, HK, D = 5, 4, 2, 128
PAST = 3  # tokens already in the DynamicCache-style past
SLOTS = 16
SKIPPED = ("skipped: rotated q and k are only read by layout copies (Inductor fuses the RoPE "
           "into them; the rewrite would add a pass over q and k)")
ROPE = RotaryEmbedding(D, D, 64, 10000.0, True, torch.float32)


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[T, H * D]`` -> ``[H, T, D]`` (a view)."""
    return x.view(T, heads, D).transpose(0, 1)


# --------------------------------------------------------------------------------------------
# graphs whose rotated q and k are read only by copies


def transposed_copies(positions, q, k):
    q, k = ROPE.forward_native(positions, q, k)
    return _heads_first(q, HQ).contiguous(), _heads_first(k, HK).contiguous()


def past_cat(positions, q, k, past_k):
    q, k = ROPE.forward_native(positions, q, k)
    return (_heads_first(q, HQ).contiguous(),
            torch.cat([past_k, _heads_first(k, HK)], dim=1))  # DynamicCache.update


def cast_and_pad(positions, q, k):
    q, k = ROPE.forward_native(positions, q, k)
    return q.to(torch.float64), F.pad(_heads_first(k, HK), (0, 0, 0, 3))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hf_eager_attention(x_q, x_k, position_ids, inv_freq):
    """HF Llama's rotary chain, ``apply_rotary_pos_emb`` on ``[B, H, S, D]`` views of the
    projections and ``eager_attention_forward``'s scores (``repeat_kv``, then ``matmul``)."""
    b, s = x_q.shape[:2]
    q = x_q.view(b, s, HQ, D).transpose(1, 2)
    k = x_k.view(b, s, HK, D).transpose(1, 2)
    freqs = (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k[:, :, None].expand(b, HK, HQ // HK, s, D).reshape(b, HQ, s, D)  # repeat_kv
    return torch.matmul(q, k.transpose(2, 3)) * D**-0.5


# --------------------------------------------------------------------------------------------
# graphs with a reader that is not a copy


def q_to_sdpa(positions, q, k, v):
    q, k = ROPE.forward_native(positions, q, k)
    k = _heads_first(k, HK).contiguous()
    return F.scaled_dot_product_attention(_heads_first(q, HQ), k, _heads_first(v, HK),
                                          enable_gqa=True)


def q_also_returned(positions, q, k):
    q, k = ROPE.forward_native(positions, q, k)
    return q, _heads_first(q, HQ).contiguous(), _heads_first(k, HK).contiguous()


def k_stored(positions, q, k, v, k_cache, v_cache, loc):
    q, k = ROPE.forward_native(positions, q, k)
    k_cache[loc] = k.view(T, HK, D)
    v_cache[loc] = v.view(T, HK, D)
    return _heads_first(q, HQ).contiguous(), k_cache[loc].sum(-1)


# --------------------------------------------------------------------------------------------
# inputs and compiling


def _qk(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (positions_for(T), torch.randn(T, HQ * D, generator=g),
            torch.randn(T, HK * D, generator=g))


def _args(fn) -> tuple:
    g = torch.Generator().manual_seed(7)
    if fn is past_cat:
        return (*_qk(), torch.randn(HK, PAST, D, generator=g))
    if fn is hf_eager_attention:
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
        return (torch.randn(2, T, HQ * D, generator=g), torch.randn(2, T, HK * D, generator=g),
                torch.arange(T).repeat(2, 1), inv_freq)
    if fn is q_to_sdpa:
        return (*_qk(), torch.randn(T, HK * D, generator=g))
    if fn is k_stored:
        caches = [torch.randn(SLOTS, HK, D, generator=g) for _ in range(2)]
        return (*_qk(), torch.randn(T, HK * D, generator=g), *caches,
                torch.tensor([11, 2, 7, 0, 5]))
    return _qk()


def _compile(fn, caplog, **options):
    """Compile ``fn`` with the backend, check its results (and mutated inputs) against eager.
    Returns (counters, fused calls in the generated code, the DEBUG skip lines)."""
    args = _args(fn)
    eager_args = tuple(a.clone() for a in args)
    expected = fn(*eager_args)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rope_compile"), fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(fn, backend="rope_compile", options={**CPU_OPTIONS, **options}),
            *args)
        counts = rope_counters()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args, eager_args, atol=1e-5, rtol=1e-5)  # the KV caches
    lines = [r.getMessage() for r in caplog.records if r.name == "rope_compile"
             and r.levelno == logging.DEBUG and r.getMessage().startswith("not rewriting RoPE")]
    return counts, count_fused_calls("\n".join(codes)), lines


COPY_ONLY = [transposed_copies, past_cat, cast_and_pad, hf_eager_attention]


def test_reason_is_the_rules():
    assert f"skipped: {COPY_ONLY_REASON}" == SKIPPED


@pytest.mark.parametrize("fn", COPY_ONLY, ids=lambda fn: fn.__name__)
def test_copy_only_pair_left_to_inductor(fn, caplog):
    counts, fused, lines = _compile(fn, caplog)
    assert counts == {"pairs_found": 1, SKIPPED: 1}, counts
    assert fused == 0
    assert len(lines) == 1 and COPY_ONLY_REASON in lines[0], lines


@pytest.mark.parametrize("fn", COPY_ONLY, ids=lambda fn: fn.__name__)
def test_copy_only_pair_rewritten_when_forced(fn, caplog):
    counts, fused, lines = _compile(fn, caplog, **FORCE_REWRITE)
    trig = {k: v for k, v in counts.items() if k.startswith("trig_in_kernel")}
    assert {k: v for k, v in counts.items() if k not in trig} == {
        "pairs_found": 1, "rewritten": 1}, counts
    # HF's rotary chain: cos/sin then computed in the kernel from the angles.
    assert trig == ({"trig_in_kernel rewritten": 1} if fn is hf_eager_attention else {})
    assert fused == 1
    assert not lines, lines


@pytest.mark.parametrize("fn", [q_to_sdpa, q_also_returned], ids=lambda fn: fn.__name__)
def test_pair_with_a_reader_that_is_not_a_copy_is_rewritten(fn, caplog):
    counts, fused, lines = _compile(fn, caplog)
    assert counts == {"pairs_found": 1, "rewritten": 1}, counts
    assert fused == 1 and not lines


def test_pair_whose_k_is_stored_in_a_kv_cache_is_rewritten(caplog):
    """q only copied, k stored with ``k_cache[loc] = k``: the call then absorbs the store."""
    counts, fused, lines = _compile(k_stored, caplog)
    assert counts == {"pairs_found": 1, "rewritten": 1, "kv_store rewritten": 1}, counts
    assert fused == 1 and not lines


def test_reshape_is_a_view_or_a_copy_by_its_strides():
    """A reshape whose input's strides allow a view is followed as one (even where a graph pass
    left it a fake value of its own storage), one that does not copies; any other reader
    makes the rotated tensor not copy-only."""
    aten = torch.ops.aten
    graph = Graph()

    def add(target, args, val):
        node = graph.call_function(target, args)
        node.meta["val"] = val
        return node

    with FakeTensorMode():
        x_val = torch.empty(T, HQ, D)
        x = graph.placeholder("x")
        x.meta["val"] = x_val
        heads_first = add(aten.transpose.int, (x, 0, 1), x_val.transpose(0, 1))
        copy = add(aten.reshape.default, (heads_first, [HQ, T * D]),
                   x_val.transpose(0, 1).reshape(HQ, T * D))
        flat = add(aten.reshape.default, (x, [T, HQ * D]), torch.empty(T, HQ * D))
        graph.output((copy, flat))
        assert layout_copies_reading(x) is None  # flat reaches the graph output
        graph.output_node().args = ((copy,),)
        assert layout_copies_reading(x) == [copy]
        add(aten.mul.Tensor, (flat, 2.0), torch.empty(T, HQ * D))
        assert layout_copies_reading(x) is None


# --------------------------------------------------------------------------------------------
# the option


def test_option_validated():
    for bad in (0, "no", None):
        with pytest.raises(ValueError, match=r"`skip_pairs_only_read_by_copies`: must be a bool"):
            FuseQKRopePass(skip_pairs_only_read_by_copies=bad)
        with pytest.raises(ValueError, match=r"`skip_pairs_only_read_by_copies`: must be a bool"):
            split_and_validate_backend_options({"skip_pairs_only_read_by_copies": bad})
    with pytest.raises(ValueError, match="did you mean 'skip_pairs_only_read_by_copies'"):
        split_and_validate_backend_options({"skip_pairs_read_only_by_copies": False})
    assert split_and_validate_backend_options(FORCE_REWRITE) == (FORCE_REWRITE, {})


def test_option_in_the_uuid():
    default = FuseQKRopePass()
    assert default.skip_pairs_only_read_by_copies is True
    assert FuseQKRopePass(skip_pairs_only_read_by_copies=True).uuid() == default.uuid()
    assert FuseQKRopePass(**FORCE_REWRITE).uuid() != default.uuid()
    assert "skip_pairs_only_read_by_copies=False" in repr(FuseQKRopePass(**FORCE_REWRITE))
