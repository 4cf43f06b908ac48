"""Operands that share memory: the ops refuse a cos_sin_cache or positions that overlaps q or k,
and q/k that overlap through two storage objects over the same memory (two ``from_numpy`` of
one array, ``frombuffer``); they accept what only looks shared (disjoint parts of one memory).

Every problem is built on the CPU and, for the gpu-marked variants, moved to the device with
its aliasing intact (the whole backing buffer moved once, the views re-taken on it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TOLERANCES, rope_f64
from test_fast_launch import cpu_fast_path  # noqa: F401  (a fixture used below)
from torch.utils.dlpack import from_dlpack

import rope_compile

T, HQ, HK, D, ROT, P = 5, 2, 1, 16, 8, 12  # tokens, heads, head size, rotary dim, cache rows
WIDTH = (HQ + 2 * HK) * D  # one qkv row


def _rotate(generic, q, k, cache, positions):
    """q ``[T, HQ, D]`` and k ``[T, HK, D]`` in place, by the public function of one op."""
    if generic:
        rope_compile.rotary_embedding(positions, q.reshape(T, HQ * D), k.reshape(T, HK * D), D,
                                      cache, True)
    else:
        rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(
            q[..., :ROT], k[..., :ROT], cache, positions, ROT, True)


OPS = pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])


def _positions(device="cpu"):
    return torch.randint(0, P, (T,), generator=torch.Generator().manual_seed(3)).to(device)


def _flat(device, numel, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(numel, generator=g, dtype=torch.float64) * 2 - 1).to(dtype).to(device)


def _qk(buf, offset=0):
    """q, k: views of one qkv projection laid out in ``buf`` from element ``offset``."""
    qkv = buf[offset : offset + T * WIDTH].view(T, WIDTH)
    return (qkv[:, : HQ * D].view(T, HQ, D), qkv[:, HQ * D : (HQ + HK) * D].view(T, HK, D))


def _expect_rotated(q, k, cache, positions, run):
    """Run ``run()`` and check q and k against the float64 oracle (taken before)."""
    expected = [rope_f64(x, positions, cache, ROT, True) for x in (q, k)]
    run()
    for x, exp in zip((q, k), expected, strict=True):
        torch.testing.assert_close(x.cpu().double(), exp, **TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------
# cos_sin_cache and positions inside q or k


def _cache_in_q_or_k(device, which):
    """One buffer of P qkv rows; the cache is ROT columns of each row, over q's (or k's)."""
    buf = _flat(device, P * WIDTH)
    q, k = _qk(buf)
    start = 0 if which == "q" else HQ * D  # q's / k's first column
    return q, k, buf.view(P, WIDTH)[:, start : start + ROT]


def _cache_over_q_contiguous(device):
    """q, k and a contiguous cache starting at q's first element."""
    buf = _flat(device, T * WIDTH + P * ROT)
    return (*_qk(buf), buf[: P * ROT].view(P, ROT))


@OPS
@pytest.mark.parametrize("which", ["q", "k"])
def test_cache_overlapping_q_or_k(generic, which, device="cpu"):
    q, k, cache = _cache_in_q_or_k(device, which)
    before = (q.clone(), k.clone())
    name = which if not generic else {"q": "query", "k": "key"}[which]
    with pytest.raises(ValueError, match=f"cos_sin_cache overlaps {name} in memory"):
        _rotate(generic, q, k, cache, _positions(device))
    assert torch.equal(q, before[0]) and torch.equal(k, before[1]), "nothing written"


@OPS
def test_cache_in_the_same_buffer_but_apart_is_accepted(generic, device="cpu"):
    buf = _flat(device, T * WIDTH + P * ROT)
    q, k = _qk(buf)
    cache = buf[T * WIDTH :].view(P, ROT)
    positions = _positions(device)
    _expect_rotated(q, k, cache, positions, lambda: _rotate(generic, q, k, cache, positions))


@OPS
def test_cache_in_the_v_part_is_accepted(generic, device="cpu"):
    """The cache's rows interleaved with q and k's, in the columns of v: disjoint."""
    buf = _flat(device, P * WIDTH)
    q, k = _qk(buf)
    cache = buf.view(P, WIDTH)[:, (HQ + HK) * D : (HQ + HK) * D + ROT]
    positions = _positions(device)
    _expect_rotated(q, k, cache, positions, lambda: _rotate(generic, q, k, cache, positions))


@OPS
def test_cache_of_another_dtype_over_q(generic, device="cpu"):
    """A bfloat16 cache reinterpreting q's float32 bytes: byte ranges, not element offsets."""
    buf = _flat(device, T * WIDTH + P * ROT)
    q, k = _qk(buf)
    # q's float32 elements [2, 2 + P * ROT / 2) seen as P * ROT bfloat16 values.
    cache = buf.view(torch.bfloat16)[4 : 4 + P * ROT].view(P, ROT)
    with pytest.raises(ValueError, match="cos_sin_cache overlaps"):
        _rotate(generic, q, k, cache, _positions(device))


@OPS
def test_contiguous_cache_over_q(generic, device="cpu"):
    q, k, cache = _cache_over_q_contiguous(device)
    with pytest.raises(ValueError, match="cos_sin_cache overlaps q|cos_sin_cache overlaps query"):
        _rotate(generic, q, k, cache, _positions(device))


@OPS
def test_cache_from_another_storage_over_q(generic):
    """Two from_numpy of one array: the cache's storage object is not q's, its memory is."""
    array = np.random.default_rng(0).uniform(-1, 1, T * WIDTH + P * ROT).astype(np.float32)
    q, k = _qk(torch.from_numpy(array))
    cache = torch.from_numpy(array)[HQ * D : HQ * D + P * ROT].view(P, ROT)
    with pytest.raises(ValueError, match="cos_sin_cache overlaps"):
        _rotate(generic, q, k, cache, _positions())


@OPS
@pytest.mark.parametrize("which", ["q", "k"])
def test_positions_overlapping_q_or_k(generic, which, device="cpu"):
    """Positions (int32, in range) written into q's (k's) float32 bytes, and read from there."""
    buf = _flat(device, T * WIDTH)
    q, k = _qk(buf)
    target = (q if which == "q" else k)[:, 0, :1]  # [T, 1]: one element per token
    positions = target.view(torch.int32).view(-1)
    positions.copy_(_positions(device).to(torch.int32))
    with pytest.raises(ValueError, match="positions overlaps"):
        _rotate(generic, q, k, _flat(device, P * ROT).view(P, ROT), positions)


@OPS
def test_positions_in_the_v_part_are_accepted(generic, device="cpu"):
    buf = _flat(device, T * WIDTH)
    q, k = _qk(buf)
    positions = buf.view(T, WIDTH)[:, -1:].view(torch.int32).view(-1)  # v's last column
    positions.copy_(_positions(device).to(torch.int32))
    cache = _flat(device, P * ROT, seed=1).view(P, ROT)
    _expect_rotated(q, k, cache, positions, lambda: _rotate(generic, q, k, cache, positions))


# --------------------------------------------------------------------------------------------
# q and k through two storage objects of one memory


def _two_numpy_views(overlap: bool, interleaved: bool = False):
    """q from one ``from_numpy`` of an array, k from another: overlapping (k starts inside q),
    disjoint halves, or the disjoint interleaved columns of a qkv projection."""
    array = np.random.default_rng(1).uniform(-1, 1, 2 * T * WIDTH).astype(np.float32)
    first, second = torch.from_numpy(array), torch.from_numpy(array)
    assert first.untyped_storage()._cdata != second.untyped_storage()._cdata
    if interleaved:
        return _qk(first)[0], _qk(second)[1]
    q = first[: T * HQ * D].view(T, HQ, D)
    start = HQ * D if overlap else T * WIDTH
    return q, second[start : start + T * HK * D].view(T, HK, D)


@OPS
def test_q_k_overlapping_through_two_storages(generic):
    q, k = _two_numpy_views(overlap=True)
    with pytest.raises(ValueError, match="overlap in memory"):
        _rotate(generic, q, k, _flat("cpu", P * ROT).view(P, ROT), _positions())


@OPS
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "qkv-columns"])
def test_q_k_disjoint_through_two_storages(generic, interleaved):
    q, k = _two_numpy_views(overlap=False, interleaved=interleaved)
    cache, positions = _flat("cpu", P * ROT).view(P, ROT), _positions()
    _expect_rotated(q, k, cache, positions, lambda: _rotate(generic, q, k, cache, positions))


@OPS
def test_q_k_overlapping_through_frombuffer(generic):
    """frombuffer at two byte offsets: two storages with different base addresses."""
    data = bytearray(np.random.default_rng(2).uniform(-1, 1, 2 * T * WIDTH)
                     .astype(np.float32).tobytes())
    q = torch.frombuffer(data, dtype=torch.float32, count=T * HQ * D).view(T, HQ, D)
    k = torch.frombuffer(data, dtype=torch.float32, offset=4 * D,
                         count=T * HK * D).view(T, HK, D)
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="overlap in memory"):
        _rotate(generic, q, k, _flat("cpu", P * ROT).view(P, ROT), _positions())


# --------------------------------------------------------------------------------------------
# fake tensors and compiled graphs


@OPS
def test_fake_tensors_of_separate_storages_are_accepted(generic):
    """Fake tensors have no memory: distinct storages are distinct, as before."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(T, HQ, D), torch.empty(T, HK, D)
        cache, positions = torch.empty(P, ROT), torch.zeros(T, dtype=torch.int64)
        op = torch.ops.rope_compile
        if generic:
            op.rotary_embedding(positions, q.view(T, -1), k.view(T, -1), D, cache, True)
        else:
            op.fused_qk_rope_with_cos_sin_cache_inplace(q[..., :ROT], k[..., :ROT], cache,
                                                        positions, ROT, True)


@OPS
def test_compiled_cache_overlapping_q_fails_at_trace_time(generic):
    torch._dynamo.reset()

    def f(buf, positions):
        q, k = _qk(buf)
        _rotate(generic, q, k, buf[: P * ROT].view(P, ROT), positions)
        return buf.sum()

    with pytest.raises(Exception, match="cos_sin_cache overlaps"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(
            _flat("cpu", T * WIDTH + P * ROT), _positions())


# --------------------------------------------------------------------------------------------
# the public functions' fast path: a relaunch checks where the tensors lie


@OPS
def test_fast_path_relaunch_declines_aliased_operands(generic, cpu_fast_path):  # noqa: F811
    """With CPU tensors standing in for GPU ones (test_fast_launch's fixture): a stored layout
    is relaunched for operands apart, but not for a cache over q, nor for q and k of two
    storages over one memory; those calls go to the op, which refuses them."""
    from rope_compile import fast_launch

    kernel, first_calls, _ = cpu_fast_path

    def fast(q, k, cache, positions):
        if generic:
            return fast_launch.try_generic(positions, q.reshape(T, -1), k.reshape(T, -1), D,
                                           cache, True)
        return fast_launch.try_fused(q[..., :ROT], k[..., :ROT], cache, positions, ROT, True)

    positions = _positions()
    q, k, _ = _cache_over_q_contiguous("cpu")
    apart = _flat("cpu", P * ROT, seed=4).view(P, ROT)
    assert fast(q, k, apart, positions) and fast(q, k, apart, positions)
    assert len(first_calls) == 1 and len(kernel.launches) == 1, "stored, then relaunched"
    q, k, cache = _cache_over_q_contiguous("cpu")  # the same layout, the cache over q
    assert not fast(q, k, cache, positions)
    # int32 positions with a row stride: in another buffer, then in k's first column.
    positions_apart = _flat("cpu", T * WIDTH).view(T, WIDTH)[:, :1].view(torch.int32).view(-1)
    positions_over_k = k[:, 0, :1].view(torch.int32).view(-1)
    for p in (positions_apart, positions_over_k):
        p.copy_(positions.to(torch.int32))
    assert fast(q, k, apart, positions_apart)  # a new layout: stored
    assert not fast(q, k, apart, positions_over_k)
    # q and k in two storages at two base addresses: the key has no offset between them.
    data = bytearray(_flat("cpu", 2 * T * WIDTH).numpy().tobytes())

    def q_k(k_byte_offset):
        q = torch.frombuffer(data, dtype=torch.float32, count=T * HQ * D).view(T, HQ, D)
        k = torch.frombuffer(data, dtype=torch.float32, offset=k_byte_offset,
                             count=T * HK * D).view(T, HK, D)
        return q, k

    assert fast(*q_k(4 * T * WIDTH), apart, positions)
    assert fast(*q_k(4 * T * WIDTH), apart, positions)
    launches = len(kernel.launches)
    assert not fast(*q_k(4 * D), apart, positions)  # k inside q
    assert len(kernel.launches) == launches


# --------------------------------------------------------------------------------------------
# on the GPU: the op and the public functions' fast path


@pytest.mark.gpu
@OPS
@pytest.mark.parametrize("which", ["q", "k"])
def test_gpu_cache_overlapping_q_or_k(gpu_device, generic, which):
    test_cache_overlapping_q_or_k(generic, which, gpu_device)


@pytest.mark.gpu
@OPS
@pytest.mark.parametrize("which", ["q", "k"])
def test_gpu_positions_overlapping_q_or_k(gpu_device, generic, which):
    test_positions_overlapping_q_or_k(generic, which, gpu_device)


@pytest.mark.gpu
@OPS
def test_gpu_disjoint_parts_of_one_buffer(gpu_device, generic):
    test_cache_in_the_same_buffer_but_apart_is_accepted(generic, gpu_device)
    test_cache_in_the_v_part_is_accepted(generic, gpu_device)
    test_positions_in_the_v_part_are_accepted(generic, gpu_device)


@pytest.mark.gpu
@OPS
def test_gpu_cache_of_another_dtype_over_q(gpu_device, generic):
    test_cache_of_another_dtype_over_q(generic, gpu_device)


@pytest.mark.gpu
@OPS
def test_gpu_relaunch_does_not_skip_the_aliasing_checks(gpu_device, generic):
    """The fast path relaunches a layout it has checked once; a later call of the same layout
    whose cache lies over q must still be refused."""
    q, k, _ = _cache_over_q_contiguous(gpu_device)
    positions = _positions(gpu_device)
    apart = _flat(gpu_device, T * WIDTH + P * ROT, seed=4)[T * WIDTH :].view(P, ROT)
    _rotate(generic, q, k, apart, positions)
    _rotate(generic, q, k, apart, positions)  # stored and relaunched
    q, k, cache = _cache_over_q_contiguous(gpu_device)  # the same layout, the cache over q
    with pytest.raises(ValueError, match="cos_sin_cache overlaps"):
        _rotate(generic, q, k, cache, positions)


@pytest.mark.gpu
@OPS
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapping", "disjoint"])
def test_gpu_q_k_through_two_storages(gpu_device, generic, overlap):
    """Two storage objects over one CUDA buffer (DLPack gives the second)."""
    buf = _flat(gpu_device, 2 * T * WIDTH)
    other = from_dlpack(buf)
    assert other.untyped_storage()._cdata != buf.untyped_storage()._cdata
    q = buf[: T * HQ * D].view(T, HQ, D)
    start = HQ * D if overlap else T * WIDTH
    k = other[start : start + T * HK * D].view(T, HK, D)
    cache, positions = _flat(gpu_device, P * ROT).view(P, ROT), _positions(gpu_device)
    for _ in range(2):  # the second call of a layout may take the fast path's relaunch
        if overlap:
            with pytest.raises(ValueError, match="overlap in memory"):
                _rotate(generic, q, k, cache, positions)
        else:
            _expect_rotated(q, k, cache, positions,
                            lambda: _rotate(generic, q, k, cache, positions))
