"""``layout.may_overlap``: never wrong when it says "disjoint", and it proves q/k/v split
from one projection disjoint whatever their layout and the buffer's storage offset."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rope_compile.layout import may_overlap


def _elements(t: torch.Tensor) -> set[int]:
    index = torch.zeros(t.shape, dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        shape = [1] * t.dim()
        shape[dim] = size
        index = index + (torch.arange(size) * stride).view(shape)
    return set((index + t.storage_offset()).flatten().tolist())


@st.composite
def _views(draw):
    storage = torch.empty(600)
    def view():
        dims = draw(st.integers(1, 3))
        shape = [draw(st.integers(1, 5)) for _ in range(dims)]
        stride = [draw(st.integers(0, 40)) for _ in range(dims)]
        return storage.as_strided(shape, stride, draw(st.integers(0, 200)))
    return view(), view()


@settings(max_examples=400, deadline=None)
@given(_views())
def test_disjoint_verdicts_are_true(views):
    a, b = views
    if not may_overlap(a, b):
        assert not _elements(a) & _elements(b)


@settings(max_examples=200, deadline=None)
@given(tokens=st.integers(1, 9), q_heads=st.integers(1, 6), kv_heads=st.integers(1, 3),
       head=st.sampled_from([2, 8, 64]), offset=st.integers(0, 130), rot=st.integers(1, 64))
def test_qkv_split_is_proven_disjoint(tokens, q_heads, kv_heads, head, offset, rot):
    width = (q_heads + 2 * kv_heads) * head
    buf = torch.empty(offset + tokens * width)[offset:].view(tokens, width)
    q = buf[:, : q_heads * head].view(tokens, q_heads, head)
    k = buf[:, q_heads * head : (q_heads + kv_heads) * head].view(tokens, kv_heads, head)
    rot = 2 * (rot % (head // 2) or 1) if head > 2 else 2
    assert not may_overlap(q[..., :rot], k[..., :rot])
    assert may_overlap(q, buf.view(tokens, -1, head)[:, q_heads - 1 :])  # shares a head
