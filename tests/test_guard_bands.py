"""Guard bands: no index makes a kernel read or write outside its tensors, and negative indices
mean what eager's indexing makes them mean (``docs/index_ranges.md``).

Every float operand (the qkv projection q, k and v are views of, the cos/sin cache or tables or
angles, the norm weights, the KV buffers) is carved out of the middle of a larger NaN-filled
allocation: its borders (the guard bands) must be bit-identical after the call, and a read of
them would put NaN into a checked result. Indices are drawn in range, then some are moved
(:data:`MODES`): ``too_large`` (the table's size, and 10^9), ``too_negative`` (one below minus the
size, and -10^9) or ``negative`` (``index - size``: the same rows, read from the end).

For each kernel family (the cache op, the tables and angles ops, mRoPE, QK-norm + RoPE, the KV
store with cos/sin from a cache or from tables, 3-D and HF 4-D buffers, fp8 ones), with each
index rule (``wrap_negative_positions`` / ``wrap_negative_cache_loc``), the kernel must:

* leave a token whose position is out of range as it is (q, k, its buffer rows), and skip the
  store of a token whose cache_loc is out of range;
* give every other token eager's result (the CPU reference, which indexes as eager's
  ``cache[positions]`` / ``buffer[loc] = x``), the stored rows being the cast of its own k and v;
* touch nothing else: every other element of every allocation is bit-identical.

On the CPU the Triton kernels run through the interpreter (the launchers, no host check);
``gpu``-marked copies call the ops on CUDA / XPU with checking off. The CPU ops (the reference
path) raise ``IndexError`` for out-of-range indices and write nothing. Last, compiled models:
``k_cache[loc] = k`` with negative ``loc`` gives eager's cache after the KV-store rewrite,
``cos_sin_cache[positions]`` eager's rotation, and the spellings eager rejects raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import GPU_DEVICE
from conftest import assert_same_bits as _assert_same_bits

import rope_compile
from rope_compile.kernels import rope_cache as tk
from rope_compile.kernels import rope_kv_store, rope_tables
from rope_compile.reference import (
    mrope_cache_reference_,
    qk_norm_rope_kv_reference_,
    rope_angles_reference_,
    rope_reference_,
    rope_tables_reference_,
    to_kv_cache,
)

FP8 = getattr(torch, "float8_e4m3fn", None)
OPS = torch.ops.rope_compile
T, HQ, HK, D, ROT, P, S = 6, 2, 2, 64, 64, 11, 9
MODES = ("too_large", "too_negative", "negative")
DEVICES = [pytest.param("cpu", id="cpu-interpreter"),
           pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]
# The kernels against the CPU reference (both fp32 math): bf16 allows a step or two of its
# rounding (the interpreter rounds toward zero; the norm rounds twice).
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """conftest's bitwise check, fp8 included (compared as its uint8 bits)."""
    if a.element_size() == 1 and a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    _assert_same_bits(a.cpu(), b.cpu(), what)


def _device(device: str) -> str:
    return GPU_DEVICE if device == "gpu" else "cpu"


@pytest.fixture
def check_off(restore_check_positions):
    """GPU ops with the host-side range check off: the kernels' own masking is what is tested."""
    rope_compile.set_check_positions(False)


# --------------------------------------------------------------------------------------------
# carved operands and drawn indices


@dataclass
class Carved:
    """``x``: a contiguous operand in the middle of ``big``, a NaN-filled allocation with
    ``pad`` guard elements before and after it."""

    big: torch.Tensor
    x: torch.Tensor
    pad: int

    def bands(self) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pad + self.x.numel()
        return self.big[:self.pad].clone(), self.big[end:].clone()


def carve(values: torch.Tensor, device: str, dtype: torch.dtype | None = None) -> Carved:
    """``values`` (CPU) as the middle of a NaN-filled allocation on ``device``, with two rows of
    guard band (64 elements at least) on each side."""
    dtype = dtype or values.dtype
    numel = values.numel()
    row = numel // values.shape[0] if values.shape[0] else numel
    pad = max(64, 2 * row)
    big = torch.full((numel + 2 * pad,), float("nan")).to(dtype)
    big[pad:pad + numel] = values.reshape(-1).to(dtype)
    big = big.to(device)
    return Carved(big, big[pad:pad + numel].view(values.shape), pad)


def check_bands(carved: list[Carved], before: list[tuple]) -> None:
    for c, (head, tail) in zip(carved, before, strict=True):
        now_head, now_tail = c.bands()
        assert_same_bits(now_head, head, "the guard band before the operand")
        assert_same_bits(now_tail, tail, "the guard band after the operand")


def draw_index(num: int, size: int, mode: str, g: torch.Generator, distinct: bool,
               dtype=torch.int64) -> torch.Tensor:
    """``num`` (>= 3) indices into ``size`` rows (distinct rows with ``distinct``), then
    ``mode``: ``too_large`` / ``too_negative``: tokens 1 and the last moved outside
    ``[-size, size)``; ``negative``: tokens 0, 2 (and 3) moved to ``index - size`` (the same
    rows; -size included); anything else: left in range."""
    if distinct:
        index = torch.randperm(size, generator=g)[:num]
    else:
        index = torch.randint(0, size, (num,), generator=g)
    if mode == "too_large":
        index[1], index[-1] = size, 10**9
    elif mode == "too_negative":
        index[1], index[-1] = -size - 1, -(10**9)
    elif mode == "negative":
        holder = (index == 0).nonzero().flatten()  # rows stay distinct: swap row 0 to token 0
        if holder.numel():
            index[holder[0]] = index[0]
        index[0] = 0  # -> -size, the first row
        index[[i for i in (0, 2, 3) if i < num]] -= size
    return index.to(dtype)


def in_range(index: torch.Tensor, size: int, wrap: bool) -> torch.Tensor:
    """Which entries are valid: ``[-size, size)`` with ``wrap``, else ``[0, size)``."""
    index = index.long().cpu()
    return (index >= (-size if wrap else 0)) & (index < size)


def qkv_views(qkv: torch.Tensor, hq: int = HQ, hk: int = HK, d: int = D):
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    return q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)


def _qkv(device, dtype, g) -> Carved:
    return carve(torch.randn(T, (HQ + 2 * HK) * D, generator=g), device, dtype)


def _expect_rotation(before_q, before_k, valid, rotate) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as expected: the tokens in ``valid`` by ``rotate(q_sub, k_sub, rows)`` (in place,
    on CPU copies, ``rows`` the tokens' indices), the others as before."""
    q, k = before_q.clone(), before_k.clone()
    rows = valid.nonzero().flatten()
    if rows.numel():
        qs, ks = q[rows], k[rows]
        rotate(qs, ks, rows)
        q[rows], k[rows] = qs, ks
    return q, k


def _check_qkv(qkv: Carved, before: torch.Tensor, q_exp, k_exp, valid, rot=ROT) -> None:
    """The rotated region of valid tokens close to the expectation, every other element of the
    qkv allocation (invalid tokens, tails, v) bit-identical."""
    now = qkv.x.cpu()
    q, k, _ = qkv_views(now)
    q0, k0, _ = qkv_views(before)
    tol = TOL[now.dtype]
    for x, x0, exp in ((q, q0, q_exp), (k, k0, k_exp)):
        torch.testing.assert_close(x[valid].float(), exp[valid].float(), **tol)
        assert_same_bits(x[~valid], x0[~valid], "the rows of a token out of range")
        assert not torch.isnan(x[valid]).any(), "a guard band was read"
    rotated = torch.zeros(now.shape, dtype=torch.bool)
    rq, rk, _ = qkv_views(rotated)
    rq[valid, :, :rot] = True
    rk[valid, :, :rot] = True
    assert_same_bits(now[~rotated], before[~rotated], "the rest of the qkv allocation")


# --------------------------------------------------------------------------------------------
# the cache op (kernels/rope_cache.py) and the generic op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrap", [False, True], ids=["strict", "wrap"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_cache_op(device, wrap, mode, pos_dtype, check_off):
    dev = _device(device)
    g = torch.Generator().manual_seed(1)
    qkv = _qkv(dev, torch.float32, g)
    cache = carve(torch.rand(P, ROT, generator=g) * 2 - 1, dev)
    positions = draw_index(T, P, mode, g, distinct=False, dtype=pos_dtype).to(dev)
    carved = [qkv, cache]
    bands = [c.bands() for c in carved]
    before = qkv.x.cpu().clone()
    q, k, _ = qkv_views(qkv.x)
    if dev == "cpu":
        tk.launch_fused_qk_rope(q[..., :ROT], k[..., :ROT], cache.x, positions, ROT, True,
                                wrap_positions=wrap)
    else:
        OPS.fused_qk_rope_with_cos_sin_cache_inplace(q[..., :ROT], k[..., :ROT], cache.x,
                                                     positions, ROT, True, wrap)
    valid = in_range(positions, P, wrap)
    pos_cpu, cache_cpu = positions.cpu(), cache.x.cpu()
    q0, k0, _ = qkv_views(before)
    q_exp, k_exp = _expect_rotation(q0, k0, valid, lambda qs, ks, rows: rope_reference_(
        qs, ks, cache_cpu, pos_cpu[rows], ROT, True))  # eager's cache[positions]
    _check_qkv(qkv, before, q_exp, k_exp, valid)
    check_bands(carved, bands)


@pytest.mark.gpu
@pytest.mark.parametrize("wrap", [False, True], ids=["strict", "wrap"])
@pytest.mark.parametrize("mode", MODES)
def test_generic_op_gpu(wrap, mode, gpu_device, check_off):
    """``rotary_embedding`` on ``[T, H * D]`` views, head size 80 (not a fused size)."""
    d, rot = 80, 64
    g = torch.Generator().manual_seed(2)
    qkv = carve(torch.randn(T, (HQ + 2 * HK) * d, generator=g), gpu_device)
    cache = carve(torch.rand(P, rot, generator=g) * 2 - 1, gpu_device)
    positions = draw_index(T, P, mode, g, distinct=False).to(gpu_device)
    bands = [c.bands() for c in (qkv, cache)]
    before = qkv.x.cpu().clone()
    query, key, _ = qkv.x.split([HQ * d, HK * d, HK * d], -1)
    rope_compile.rotary_embedding(positions, query, key, d, cache.x, True,
                                  wrap_negative_positions=wrap)
    valid = in_range(positions, P, wrap)
    q0, k0, _ = qkv_views(before, d=d)
    q_exp, k_exp = _expect_rotation(q0, k0, valid, lambda qs, ks, rows: rope_reference_(
        qs, ks, cache.x.cpu(), positions.cpu()[rows], rot, True))
    now_q, now_k, _ = qkv_views(qkv.x.cpu(), d=d)
    for x, x0, exp in ((now_q, q0, q_exp), (now_k, k0, k_exp)):
        torch.testing.assert_close(x[valid], exp[valid], **TOL[torch.float32])
        assert_same_bits(x[~valid], x0[~valid], "the rows of a token out of range")
    check_bands([qkv, cache], bands)


# --------------------------------------------------------------------------------------------
# mRoPE (rope_tables.py, the CACHE source)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrap", [False, True], ids=["strict", "wrap"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("streams", ["3xT", "T"])
def test_mrope(device, wrap, mode, streams, check_off):
    """One stream's position of a token out of range leaves the whole token as it is."""
    dev = _device(device)
    g = torch.Generator().manual_seed(3)
    sections = [8, 12, 12]
    qkv = _qkv(dev, torch.float32, g)
    cache = carve(torch.rand(P, ROT, generator=g) * 2 - 1, dev)
    if streams == "T":
        positions = draw_index(T, P, mode, g, distinct=False)
        valid = in_range(positions, P, wrap)
    else:
        positions = torch.randint(0, P, (3, T), generator=g)
        positions[1] = draw_index(T, P, mode, g, distinct=False)  # the height stream
        if mode == "negative":
            positions[2, 5] -= P  # a second stream, another token
        valid = in_range(positions, P, wrap).all(0)
    positions = positions.to(dev)
    carved = [qkv, cache]
    bands = [c.bands() for c in carved]
    before = qkv.x.cpu().clone()
    q, k, _ = qkv_views(qkv.x)
    if dev == "cpu":
        rope_tables.launch_qk_mrope_cache(q, k, cache.x, positions, ROT, True, sections, wrap)
    else:
        OPS.fused_qk_mrope_with_cos_sin_cache_inplace(q, k, cache.x, positions, ROT, True,
                                                      sections, wrap)
    pos_cpu, cache_cpu = positions.cpu(), cache.x.cpu()
    q0, k0, _ = qkv_views(before)
    q_exp, k_exp = _expect_rotation(q0, k0, valid, lambda qs, ks, rows: mrope_cache_reference_(
        qs, ks, cache_cpu, pos_cpu[..., rows], ROT, True, sections))
    _check_qkv(qkv, before, q_exp, k_exp, valid)
    check_bands(carved, bands)


# --------------------------------------------------------------------------------------------
# the tables and angles ops (rope_tables.py): token t reads row t % R, no index to go wrong


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["pair", "full", "angles", "mrope-pair"])
def test_tables_and_angles(device, source):
    dev = _device(device)
    g = torch.Generator().manual_seed(4)
    rows = 3  # T = 2 * rows: token t reads row t % 3
    qkv = _qkv(dev, torch.float32, g)
    width = ROT if source == "full" else ROT // 2
    lead = (3,) if source == "mrope-pair" else ()
    sections = [8, 12, 12] if source == "mrope-pair" else None
    cos = carve(torch.rand(*lead, rows, width, generator=g) * 2 - 1, dev)
    sin = carve(torch.rand(*lead, rows, width, generator=g) * 2 - 1, dev)
    carved = [qkv, cos, sin]
    bands = [c.bands() for c in carved]
    before = qkv.x.cpu().clone()
    q, k, _ = qkv_views(qkv.x)
    if source == "angles":
        args = (cos.x, 0.75, 0.75, torch.float32, ROT, True)
        ref = lambda qs, ks: rope_angles_reference_(qs, ks, cos.x.cpu(), *args[1:])  # noqa: E731
        if dev == "cpu":
            rope_tables.launch_qk_rope_angles(q, k, *args)
        else:
            OPS.fused_qk_rope_with_angles_inplace(q, k, *args)
    else:
        ref = lambda qs, ks: rope_tables_reference_(  # noqa: E731
            qs, ks, cos.x.cpu(), sin.x.cpu(), ROT, True, sections)
        if dev == "cpu":
            rope_tables.launch_qk_rope_tables(q, k, cos.x, sin.x, ROT, True, sections)
        else:
            OPS.fused_qk_rope_with_cos_sin_tables_inplace(q, k, cos.x, sin.x, ROT, True,
                                                          sections)
    q0, k0, _ = qkv_views(before)
    q_exp, k_exp = q0.clone(), k0.clone()
    ref(q_exp, k_exp)
    _check_qkv(qkv, before, q_exp, k_exp, torch.ones(T, dtype=torch.bool))
    check_bands(carved, bands)


# --------------------------------------------------------------------------------------------
# QK-norm + RoPE and the KV store (rope_kv_store.py)


@dataclass(frozen=True)
class KVCase:
    index: str = "positions"  # which index is drawn with the mode: "positions" or "cache_loc"
    norm: str | None = None  # None, "head" (weights [D]) or "whole" (q's weight [Hq*D])
    store: bool = True
    buffer: str = "3d"  # "3d": [S, Hk, D]; "hf": HF's [B, Hk, L, D] passed permuted (tables)
    cache_dtype: torch.dtype | None = None  # None: q's dtype
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        parts = [self.index, self.buffer if self.store else "no-store"]
        if self.norm:
            parts.append(f"norm-{self.norm}")
        if self.cache_dtype is not None:
            parts.append(str(self.cache_dtype).removeprefix("torch."))
        if self.dtype != torch.float32:
            parts.append(str(self.dtype).removeprefix("torch."))
        return "-".join(parts)


KV_CASES = [
    KVCase(index="positions", norm="head", store=False),
    KVCase(index="positions", norm="whole", store=False, dtype=torch.bfloat16),
    KVCase(index="positions"),
    KVCase(index="cache_loc"),
    KVCase(index="cache_loc", norm="head", dtype=torch.bfloat16),
    KVCase(index="positions", norm="whole"),
    KVCase(index="cache_loc", buffer="hf"),
]
if FP8 is not None:
    KV_CASES.append(KVCase(index="cache_loc", cache_dtype=FP8, dtype=torch.bfloat16))


def _kv_args(case: KVCase, qkv: Carved, dev: str, mode: str, g: torch.Generator):
    """(carved tensors, positions, cache_loc, rope source, norm, kv, how the buffers map
    tokens to rows) for ``case``; HF's 4-D form uses tables (cos/sin [L, ROT/2]), the others
    the cos/sin cache."""
    carved = [qkv]
    q, k, v = qkv_views(qkv.x)
    cache_dtype = case.cache_dtype or case.dtype
    positions = draw_index(T, P, mode if case.index == "positions" else "in_range", g, False)
    norm = None
    if case.norm:
        q_w = carve(torch.rand(HQ * D if case.norm == "whole" else D, generator=g) + 0.5, dev,
                    case.dtype)
        k_w = carve(torch.rand(D, generator=g) + 0.5, dev, case.dtype)
        carved += [q_w, k_w]
        norm = (q_w.x, k_w.x, 1e-6, 0.0, None)
    if case.buffer == "hf":
        batch, seq = 2, T // 2  # tokens in (b, s) order, cache_loc = cache_position [seq]
        cos = carve(torch.rand(seq, ROT // 2, generator=g) * 2 - 1, dev)
        sin = carve(torch.rand(seq, ROT // 2, generator=g) * 2 - 1, dev)
        carved += [cos, sin]
        rope = ("tables", cos.x, sin.x)
        loc = _loc(seq, mode if case.index == "cache_loc" else "in_range", g)
        bufs = [carve(torch.randn(batch, HK, S, D, generator=g), dev, cache_dtype)
                for _ in range(2)]
        views = [b.x.permute(0, 2, 1, 3) for b in bufs]
    else:
        cache = carve(torch.rand(P, ROT, generator=g) * 2 - 1, dev)
        carved.append(cache)
        rope = ("cache", cache.x, positions.to(dev))
        loc = _loc(T, mode if case.index == "cache_loc" else "in_range", g)
        bufs = [carve(torch.randn(S, HK, D, generator=g), dev, cache_dtype) for _ in range(2)]
        views = [b.x for b in bufs]
    kv = None
    if case.store:
        carved += bufs
        kv = (v, views[0], views[1], loc.to(dev), None, None)
    return carved, rope, norm, kv


def _loc(num: int, mode: str, g: torch.Generator) -> torch.Tensor:
    return draw_index(num, S, mode, g, distinct=True)


def _run_kv(dev, q, k, rope, norm, kv, wrap_pos, wrap_loc) -> None:
    """The kernel: its launcher on the CPU (the interpreter), the op on a GPU."""
    if dev == "cpu":
        launch = rope_kv_store.launch if rope[0] == "cache" else rope_kv_store.launch_tables
        launch(q, k, rope[1], rope[2], ROT, True, norm=norm, kv=kv,
               wrap_positions=wrap_pos and rope[0] == "cache", wrap_loc=wrap_loc)
        return
    norm_args = () if norm is None else norm[:4]
    kv_args = () if kv is None else kv[:4]
    scales = () if kv is None else kv[4:]
    rounding = () if norm is None else (norm[4],)
    name = "fused_qk" + ("_norm" if norm else "") + "_rope" + ("_kv_store" if kv else "")
    if rope[0] == "cache":
        op = getattr(OPS, name + "_inplace")
        flags = (wrap_pos, wrap_loc) if kv else (wrap_pos,)
        op(q, k, *kv_args, *norm_args, rope[1], rope[2], ROT, True, *scales, *rounding, *flags)
    else:
        op = getattr(OPS, name + "_tables_inplace")
        op(q, k, *kv_args, *norm_args, rope[1], rope[2], ROT, True, *scales, *rounding,
           *((wrap_loc,) if kv else ()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrap", [False, True], ids=["strict", "wrap"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in KV_CASES])
def test_norm_rope_kv_store(device, wrap, mode, case, check_off):
    """A position out of range: the token untouched (q, k, its buffer rows); a cache_loc out
    of range: q and k normalised and rotated, nothing stored."""
    dev = _device(device)
    g = torch.Generator().manual_seed(5)
    qkv = _qkv(dev, case.dtype, g)
    carved, rope, norm, kv = _kv_args(case, qkv, dev, mode, g)
    bands = [c.bands() for c in carved]
    before = qkv.x.cpu().clone()
    buf_before = [x.cpu().clone() for x in kv[1:3]] if kv else []
    q, k, v = qkv_views(qkv.x)
    _run_kv(dev, q, k, rope, norm, kv, wrap_pos=wrap, wrap_loc=wrap)

    ones = torch.ones(T, dtype=torch.bool)
    pos_ok = in_range(rope[2], P, wrap) if rope[0] == "cache" else ones
    loc_ok = ones
    if kv is not None:
        rows = kv[3].shape[0]
        loc_ok = in_range(kv[3], S, wrap)[torch.arange(T) % rows]
    norm_cpu = None if norm is None else (norm[0].cpu(), norm[1].cpu(), *norm[2:])
    q0, k0, _ = qkv_views(before)

    def rotate(qs, ks, rows):
        if rope[0] == "cache":
            qk_norm_rope_kv_reference_(qs, ks, rope[1].cpu(), rope[2].cpu()[rows], ROT, True,
                                       norm=norm_cpu)
        else:  # tables: token t reads row t % L (rows are all the tokens here)
            from rope_compile.reference import _norm_qk_

            _norm_qk_(qs, ks, norm_cpu)
            rope_tables_reference_(qs, ks, rope[1].cpu(), rope[2].cpu(), ROT, True)

    q_exp, k_exp = _expect_rotation(q0, k0, pos_ok, rotate)
    _check_qkv(qkv, before, q_exp, k_exp, pos_ok, rot=D if norm else ROT)
    if kv is not None:
        _check_store(kv, buf_before, qkv, before, pos_ok & loc_ok)
    check_bands(carved, bands)


def _check_store(kv, buf_before, qkv: Carved, before, stored) -> None:
    """The rows of stored tokens hold the cast of the kernel's k (and of v), eager-indexed
    (``buffer[b, loc]`` with a negative loc from the end); every other row is untouched."""
    k_now = qkv_views(qkv.x.cpu())[1]
    v_src = qkv_views(before)[2]
    loc = kv[3].cpu().long()
    for buf, old, x in ((kv[1], buf_before[0], k_now), (kv[2], buf_before[1], v_src)):
        exp = old.clone()
        for t in stored.nonzero().flatten().tolist():
            if exp.dim() == 3:
                exp[loc[t]] = to_kv_cache(x[t], None, exp.dtype)
            else:
                exp[t // loc.shape[0], loc[t % loc.shape[0]]] = to_kv_cache(x[t], None,
                                                                         exp.dtype)
        assert_same_bits(buf.cpu(), exp, "the KV buffer")


# --------------------------------------------------------------------------------------------
# the CPU ops (the reference path): IndexError for an index out of range, nothing written;
# negative indices in range as eager's indexing


def _cpu_op_call(family: str, wrap: bool, mode: str):
    """(call, carved tensors, index, size) for one op of ``family`` on CPU tensors."""
    g = torch.Generator().manual_seed(6)
    qkv = _qkv("cpu", torch.float32, g)
    q, k, v = qkv_views(qkv.x)
    cache = carve(torch.rand(P, ROT, generator=g) * 2 - 1, "cpu")
    positions = draw_index(T, P, mode, g, distinct=False)
    loc = draw_index(T, S, mode, g, distinct=True)
    bufs = [carve(torch.randn(S, HK, D, generator=g), "cpu") for _ in range(2)]
    carved = [qkv, cache, *bufs]
    if family == "fused":
        return (lambda: rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(
            q, k, cache.x, positions, ROT, True, wrap_negative_positions=wrap)), carved, \
            positions, P
    if family == "generic":
        return (lambda: rope_compile.rotary_embedding(
            positions, q.flatten(1), k.flatten(1), D, cache.x, True,
            wrap_negative_positions=wrap)), carved, positions, P
    if family == "mrope":
        return (lambda: rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace(
            q, k, cache.x, positions.expand(3, T), ROT, True, [8, 12, 12],
            wrap_negative_positions=wrap)), carved, positions, P
    if family == "norm_rope":
        w = torch.rand(D, generator=g) + 0.5
        return (lambda: rope_compile.fused_qk_norm_rope_inplace(
            q, k, w, w, 1e-6, 0.0, cache.x, positions, ROT, True,
            wrap_negative_positions=wrap)), carved, positions, P
    if family == "kv_positions":
        return (lambda: rope_compile.fused_qk_rope_kv_store_inplace(
            q, k, v, bufs[0].x, bufs[1].x, loc.remainder(S), cache.x, positions, ROT, True,
            wrap_negative_positions=wrap)), carved, positions, P
    if family == "kv_loc":
        return (lambda: rope_compile.fused_qk_rope_kv_store_inplace(
            q, k, v, bufs[0].x, bufs[1].x, loc, cache.x, positions.remainder(P), ROT, True,
            wrap_negative_cache_loc=wrap)), carved, loc, S
    assert family == "kv_tables_loc"
    cos, sin = cache.x[:, :ROT // 2], cache.x[:, ROT // 2:]
    return (lambda: rope_compile.fused_qk_rope_kv_store_tables_inplace(
        q, k, v, bufs[0].x, bufs[1].x, loc, cos[:T], sin[:T], ROT, True,
        wrap_negative_cache_loc=wrap)), carved, loc, S


CPU_FAMILIES = ("fused", "generic", "mrope", "norm_rope", "kv_positions", "kv_loc",
                "kv_tables_loc")


@pytest.mark.parametrize("wrap", [False, True], ids=["strict", "wrap"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", CPU_FAMILIES)
def test_cpu_ops_raise_or_wrap(family, mode, wrap):
    """Out of range (and negative without wrap): IndexError naming the range, every allocation
    bit-identical. Negative in range with wrap: the call runs; the guard bands hold."""
    call, carved, index, size = _cpu_op_call(family, wrap, mode)
    snapshot = [c.big.clone() for c in carved]
    if in_range(index, size, wrap).all():
        call()
        check_bands(carved, [(s[:c.pad], s[c.pad + c.x.numel():])
                             for c, s in zip(carved, snapshot, strict=True)])
        return
    name = "positions" if size == P else "cache_loc"
    with pytest.raises(IndexError, match=rf"{name} must lie in \[{-size if wrap else 0}, "
                                         rf"{size}\)"):
        call()
    for c, s in zip(carved, snapshot, strict=True):
        assert_same_bits(c.big, s, "an allocation after a refused call")


def test_cpu_negative_positions_are_eager_rows():
    """With wrap, the CPU op's result for negative positions is the result for the same rows
    given as non-negative positions (eager's ``cache[positions]``)."""
    g = torch.Generator().manual_seed(7)
    a = _qkv("cpu", torch.float32, g)
    b = carve(a.x.clone(), "cpu")
    cache = torch.rand(P, ROT, generator=g) * 2 - 1
    negative = draw_index(T, P, "negative", g, distinct=False)
    for qkv, pos, wrap in ((a, negative, True), (b, negative.remainder(P), False)):
        q, k, _ = qkv_views(qkv.x)
        rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(q, k, cache, pos, ROT, True,
                                                              wrap_negative_positions=wrap)
    assert_same_bits(a.x, b.x, "q and k")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["too_large", "negative"])
def test_gpu_check_raises_as_the_cpu(mode, gpu_device, restore_check_positions):
    """set_check_positions(True): the GPU ops raise where the CPU ops do, before writing."""
    rope_compile.set_check_positions(True)
    g = torch.Generator().manual_seed(8)
    qkv = _qkv(gpu_device, torch.float32, g)
    q, k, v = qkv_views(qkv.x)
    cache = torch.rand(P, ROT, generator=g).to(gpu_device)
    loc = draw_index(T, S, mode, g, distinct=True).to(gpu_device)
    positions = torch.arange(T, device=gpu_device)
    bufs = [torch.zeros(S, HK, D, device=gpu_device) for _ in range(2)]
    before = qkv.big.clone()
    with pytest.raises(IndexError, match=r"cache_loc must lie in \[0, 9\)"):
        rope_compile.fused_qk_rope_kv_store_inplace(q, k, v, *bufs, loc, cache, positions,
                                                    ROT, True, wrap_negative_cache_loc=False)
    assert torch.equal(qkv.big, before) and not any(b.any() for b in bufs)


# --------------------------------------------------------------------------------------------
# compiled: the passes keep eager's rule


def _compiled_layer_inputs(loc, positions, g):
    from torch import nn

    hd, slots = 128, 16
    layer = nn.Linear(64, (4 + 2 * 2) * hd, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / 8)
    x = torch.randn(len(loc), 64, generator=g)
    caches = [torch.randn(slots, 2, hd, generator=g) for _ in range(2)]
    return layer, (torch.tensor(positions), x, *caches, torch.tensor(loc))


class _Layer(torch.nn.Module):
    """qkv -> RoPE from ``cos_sin_cache`` rows gathered by ``gather`` -> the KV store by
    ``store`` (``setitem`` or ``index_copy_``), returning q and the stored rows."""

    def __init__(self, proj, gather: str, store: str) -> None:
        super().__init__()
        self.proj, self.gather, self.store = proj, gather, store
        self.register_buffer("cache", rope_compile.compute_cos_sin_cache(128, 64))

    def forward(self, positions, x, k_cache, v_cache, loc):
        from rope_compile.module import apply_rotary_emb

        t = x.shape[0]
        q, k, v = self.proj(x).split([4 * 128, 2 * 128, 2 * 128], -1)
        if self.gather == "getitem":
            rows = self.cache[positions]
        else:
            rows = self.cache.index_select(0, positions)
        cos, sin = rows.chunk(2, -1)
        q = apply_rotary_emb(q.view(t, 4, 128), cos, sin, True)
        k = apply_rotary_emb(k.view(t, 2, 128), cos, sin, True)
        v = v.view(t, 2, 128)
        if self.store == "setitem":
            k_cache[loc] = k
            v_cache[loc] = v
        else:
            k_cache.index_copy_(0, loc, k)
            v_cache.index_copy_(0, loc, v)
        return q, k_cache[loc].sum(-1)


def _compile_and_run(model, inputs):
    from pass_helpers import CPU_OPTIONS, fresh_compile, rope_counters
    from torch._inductor.utils import run_and_get_code

    with fresh_compile():
        out, codes = run_and_get_code(
            torch.compile(model, backend="rope_compile", options=CPU_OPTIONS), *inputs)
        counts = rope_counters()
    return out, "\n".join(codes), counts


@pytest.mark.parametrize("gather", ["getitem", "index_select"])
def test_compiled_negative_cache_loc_setitem_is_eager(gather):
    """``k_cache[loc] = k`` with negative loc (and, gathered by ``cache[positions]``, negative
    positions): after the KV-store rewrite the caches and outputs are eager's."""
    g = torch.Generator().manual_seed(9)
    negative_positions = gather == "getitem"
    positions = [-3, 31, -64] if negative_positions else [5, 31, 9]
    proj, inputs = _compiled_layer_inputs([-5, 2, -16], positions, g)
    model = _Layer(proj, gather, "setitem")
    eager_inputs = tuple(x.clone() for x in inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = _compile_and_run(model, inputs)
    assert counts.get("kv_store rewritten") == 1, counts
    calls = [line for line in code.splitlines()
             if "fused_qk_rope_kv_store_inplace.default(" in line]
    assert len(calls) == 1 and "index_put" not in code
    # Flags only where they differ from the default (the call drops trailing defaults):
    # positions wrap for cache[positions], not for index_select.
    want = "None, None, True)" if negative_positions else "128, True)"
    assert calls[0].rstrip().endswith(want), calls
    for got, want in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_compiled_index_select_negative_positions_raises():
    """``index_select`` raises for a negative position in eager; so does the fused call."""
    g = torch.Generator().manual_seed(10)
    proj, inputs = _compiled_layer_inputs([1, 2, 3], [5, -1, 9], g)
    model = _Layer(proj, "index_select", "setitem")
    with pytest.raises(IndexError), torch.no_grad():
        model(*(x.clone() for x in inputs))
    with pytest.raises(Exception, match="positions must lie in"):
        _compile_and_run(model, inputs)


def test_compiled_index_copy_negative_cache_loc_raises():
    """``index_copy_`` raises for a negative index in eager (Inductor's own code for it would
    wrap); the fused call gets wrap_negative_cache_loc=False and raises too. In range, it
    gives eager's caches."""
    g = torch.Generator().manual_seed(11)
    proj, inputs = _compiled_layer_inputs([3, -2, 7], [5, 31, 9], g)
    model = _Layer(proj, "index_select", "index_copy_")
    with pytest.raises(IndexError), torch.no_grad():
        model(*(x.clone() for x in inputs))
    with pytest.raises(Exception, match="cache_loc must lie in"):
        _compile_and_run(model, inputs)
    inputs = (*inputs[:4], torch.tensor([3, 12, 7]))
    eager_inputs = tuple(x.clone() for x in inputs)
    with torch.no_grad():
        expected = model(*eager_inputs)
    out, code, counts = _compile_and_run(model, inputs)
    assert counts.get("kv_store rewritten") == 1, counts
    [call] = [line for line in code.splitlines()
              if "fused_qk_rope_kv_store_inplace.default(" in line]
    assert call.rstrip().endswith("None, None, False, False)"), call
    for got, want in zip((*out, *inputs[2:4]), (*expected, *eager_inputs[2:4]), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
