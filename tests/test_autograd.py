"""Gradients through the in-place ops: the backward is the inverse rotation, recorded by the
ops' Autograd kernels (rope_compile/autograd.py), in eager and under torch.compile.

Checks: gradcheck on small float64 problems; weight and input gradients of a Linear whose
output is rotated in place (q and k views of it) against a float64 pure-torch RoPE, eagerly
and compiled with aot_eager, inductor and rope_compile; clear errors where no correct
gradient exists; nothing recorded without grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import pair_indices
from torch.utils._python_dispatch import TorchDispatchMode

import rope_compile

FUSED = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace.default
GENERIC = torch.ops.rope_compile.rotary_embedding.default


@dataclass(frozen=True)
class GradCase:
    num_tokens: int = 5
    num_q_heads: int = 2
    num_kv_heads: int = 1
    head_size: int = 8
    rotary_dim: int = 8
    is_neox: bool = True
    pos_dtype: torch.dtype = torch.int64
    max_position: int = 16
    in_features: int = 6

    @property
    def id(self) -> str:
        return (f"T{self.num_tokens}-H{self.num_q_heads}-{self.num_kv_heads}-"
                f"D{self.head_size}r{self.rotary_dim}-{'neox' if self.is_neox else 'gptj'}-"
                f"{str(self.pos_dtype).removeprefix('torch.')}")


CASES = [
    GradCase(),
    GradCase(is_neox=False, rotary_dim=4, pos_dtype=torch.int32),  # partial, GPT-J
    GradCase(num_tokens=3, num_q_heads=1, num_kv_heads=1, head_size=6, rotary_dim=4),
    GradCase(num_tokens=7, num_q_heads=3, num_kv_heads=2, is_neox=False),
    GradCase(num_tokens=1, num_q_heads=1, num_kv_heads=1, rotary_dim=6, pos_dtype=torch.int32),
]
COMPILE_CASES = [CASES[1], CASES[3]]


def _ids(cases):
    return [c.id for c in cases]


def _data(case: GradCase, dtype=torch.float64, device="cpu", seed=0):
    """(x, weight, bias, out_weight, cos_sin_cache, positions), random (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    width = (case.num_q_heads + 2 * case.num_kv_heads) * case.head_size
    x = torch.randn(case.num_tokens, case.in_features, generator=g, dtype=torch.float64)
    weight = torch.randn(width, case.in_features, generator=g, dtype=torch.float64)
    bias = torch.randn(width, generator=g, dtype=torch.float64)
    out_weight = torch.randn(case.num_tokens, width, generator=g, dtype=torch.float64)
    cache = torch.rand(case.max_position, case.rotary_dim, generator=g,
                       dtype=torch.float64) * 2 - 1
    positions = torch.randint(0, case.max_position, (case.num_tokens,), generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias, out_weight, cache)
                 ) + (positions.to(device=device, dtype=case.pos_dtype),)


def rope_torch(x, positions, cache, rotary_dim, is_neox):
    """Differentiable float64 RoPE of ``x`` ``[T, H, D]`` (a new tensor; the tail kept)."""
    x64, rows = x.double(), cache.double()[positions.long()]  # rows: [T, rot]
    half = rotary_dim // 2
    cos, sin = rows[:, None, :half], rows[:, None, half:rotary_dim]
    first, second = pair_indices(rotary_dim, is_neox)
    a, b = x64[..., first], x64[..., second]
    pairs = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1)  # [T, H, half, 2]
    order = torch.tensor(first + second).argsort()  # pair element -> feature
    rotated = torch.cat((pairs[..., 0], pairs[..., 1]), dim=-1)[..., order]
    return torch.cat((rotated, x64[..., rotary_dim:]), dim=-1)


def _split(case: GradCase, qkv):
    """q ``[T, Hq, D]``, k ``[T, Hk, D]``: views of the projection output (``v`` follows)."""
    t, hq, hk, d = case.num_tokens, case.num_q_heads, case.num_kv_heads, case.head_size
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    return q, k


def _rotate_inplace(case: GradCase, generic: bool, qkv, cache, positions) -> None:
    q, k = _split(case, qkv)
    if generic:
        t, d = case.num_tokens, case.head_size
        rope_compile.rotary_embedding(positions, q.view(t, -1), k.view(t, -1), d, cache,
                                      case.is_neox)
    else:
        rot = case.rotary_dim
        rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(
            q[..., :rot], k[..., :rot], cache, positions, rot, case.is_neox)


def model_op(case: GradCase, generic: bool):
    """Linear, RoPE of its q and k in place (by the op), then a nonlinear loss."""

    def f(x, weight, bias, out_weight, cache, positions):
        qkv = torch.nn.functional.linear(x, weight, bias)
        _rotate_inplace(case, generic, qkv, cache, positions)
        return (qkv.sin() * out_weight).sum()

    return f


def model_torch(case: GradCase):
    """The same model with the float64 pure-torch RoPE."""

    def f(x, weight, bias, out_weight, cache, positions):
        qkv = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
        q, k = _split(case, qkv)
        t = case.num_tokens
        rot = [rope_torch(y, positions, cache, case.rotary_dim, case.is_neox).reshape(t, -1)
               for y in (q, k)]
        qkv = torch.cat((*rot, qkv[:, sum(r.shape[1] for r in rot):]), dim=1)
        return (qkv.sin() * out_weight.double()).sum()

    return f


def _grads(f, data):
    x, weight, bias, out_weight, cache, positions = data
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    loss = f(*leaves, out_weight, cache, positions)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _assert_grads_match(f, case, data, rtol=1e-10, atol=1e-10):
    loss, grads = _grads(f, data)
    ref_loss, ref_grads = _grads(model_torch(case), tuple(t.cpu() for t in data))
    torch.testing.assert_close(loss.cpu().double(), ref_loss.double(), rtol=rtol, atol=atol)
    for name, got, exp in zip(("x", "weight", "bias"), grads, ref_grads, strict=True):
        # Compared in float64 (a float32 run's gradients against the float64 reference's).
        torch.testing.assert_close(got.cpu().double(), exp.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# gradcheck


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_gradcheck_linear_views(case, generic):
    """q and k views of one Linear output; gradients of x, weight and bias."""
    x, weight, bias, out_weight, cache, positions = _data(case)
    f = model_op(case, generic)

    def fn(x, weight, bias):
        return f(x, weight, bias, out_weight, cache, positions)

    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_gradcheck_separate_tensors(case, generic):
    """q and k separate (non-view) tensors, the rotated outputs themselves as outputs;
    gradgradcheck too (the backward is the op again, hence differentiable)."""
    _, _, _, _, cache, positions = _data(case)
    g = torch.Generator().manual_seed(1)
    t, d, rot = case.num_tokens, case.head_size, case.rotary_dim
    q = torch.randn(t, case.num_q_heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(t, case.num_kv_heads, d, generator=g, dtype=torch.float64)

    def fn(q, k):
        q, k = q * 1.0, k * 1.0  # non-leaves (a leaf that requires grad is refused)
        if generic:
            GENERIC(positions, q, k, d, cache, case.is_neox)
        else:
            FUSED(q[..., :rot], k[..., :rot], cache, positions, rot, case.is_neox)
        return q, k

    inputs = (q.requires_grad_(True), k.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# against the pure-torch RoPE, eager and compiled


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_eager_grads_match_torch(case, generic):
    _assert_grads_match(model_op(case, generic), case, _data(case))


BACKENDS = {
    "aot_eager": {"backend": "aot_eager"},
    "inductor": {"backend": "inductor"},
    "rope_compile": {"backend": "rope_compile", "options": {"devices": ("cpu",)}},
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
@pytest.mark.parametrize("case", COMPILE_CASES, ids=_ids(COMPILE_CASES))
def test_compiled_grads_match_torch(case, generic, backend):
    torch._dynamo.reset()
    f = torch.compile(model_op(case, generic), fullgraph=True, **BACKENDS[backend])
    _assert_grads_match(f, case, _data(case))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, *BACKENDS])
@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_gpu_grads_match_torch(gpu_device, generic, backend):
    """The Triton kernel's forward and backward (float32) against the float64 pure-torch RoPE."""
    case = GradCase(num_tokens=33, num_q_heads=4, num_kv_heads=2, head_size=64,
                    rotary_dim=32, is_neox=False, max_position=128, in_features=16)
    f = model_op(case, generic)
    if backend is not None:
        torch._dynamo.reset()
        kwargs = dict(BACKENDS[backend])
        kwargs.pop("options", None)  # rope_compile: its default devices (the GPU)
        f = torch.compile(f, fullgraph=True, **kwargs)
    _assert_grads_match(f, case, _data(case, torch.float32, gpu_device), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------------
# what autograd records, and what it refuses


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_backward_runs_the_op(generic):
    """The backward is the op on the gradients (once per rotated tensor), not the derivative of
    the CPU reference's inner ops."""
    case = CASES[0]
    x, weight, bias, out_weight, cache, positions = _data(case)
    qkv = torch.nn.functional.linear(x, weight.requires_grad_(True), bias)
    _rotate_inplace(case, generic, qkv, cache, positions)
    assert type(qkv.grad_fn).__name__ == "CopySlices"
    loss = (qkv.sin() * out_weight).sum()
    with _OpLog() as log:
        loss.backward()
    name = "rope_compile." + ("rotary_embedding" if generic else
                              "fused_qk_rope_with_cos_sin_cache_inplace")
    assert log.calls.count(name) == 2, log.calls
    assert "aten.stack" not in log.calls, log.calls


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_no_graph_without_grad(generic):
    case = CASES[0]
    x, weight, bias, _, cache, positions = _data(case)
    qkv = torch.nn.functional.linear(x, weight, bias)
    version = qkv._version
    _rotate_inplace(case, generic, qkv, cache, positions)
    assert qkv.grad_fn is None and not qkv.requires_grad
    assert qkv._version > version
    # A cache that requires grad is fine with grad mode off (inference with a Parameter).
    with torch.no_grad():
        weight.requires_grad_(True)
        qkv = torch.nn.functional.linear(x, weight, bias)
        _rotate_inplace(case, generic, qkv, cache.clone().requires_grad_(True), positions)
        assert qkv.grad_fn is None


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
@pytest.mark.parametrize("q_requires_grad", [True, False])
def test_cache_requiring_grad_is_refused(generic, q_requires_grad):
    case = CASES[0]
    x, weight, bias, _, cache, positions = _data(case)
    qkv = torch.nn.functional.linear(x, weight.requires_grad_(q_requires_grad), bias)
    before = qkv.detach().clone()
    with pytest.raises(RuntimeError, match="cos_sin_cache requires grad"):
        _rotate_inplace(case, generic, qkv, cache.requires_grad_(True), positions)
    assert torch.equal(qkv.detach(), before), "refused before any data is written"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_cache_requiring_grad_is_refused(backend):
    torch._dynamo.reset()
    case = CASES[0]
    x, weight, bias, out_weight, cache, positions = _data(case)
    f = torch.compile(model_op(case, False), backend=backend, fullgraph=True)
    with pytest.raises(Exception, match="cos_sin_cache requires grad"):
        f(x, weight.requires_grad_(True), bias, out_weight, cache.requires_grad_(True),
          positions)


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_leaf_requiring_grad_is_refused(generic):
    case = CASES[0]
    _, _, _, _, cache, positions = _data(case)
    q = torch.randn(case.num_tokens, case.num_q_heads, case.head_size, dtype=torch.float64,
                    requires_grad=True)
    k = torch.randn(case.num_tokens, case.num_kv_heads, case.head_size, dtype=torch.float64)
    before = q.detach().clone()
    with pytest.raises(RuntimeError, match="leaf"):
        if generic:
            GENERIC(positions, q, k, case.head_size, cache, case.is_neox)
        else:
            FUSED(q, k, cache, positions, case.rotary_dim, case.is_neox)
    assert torch.equal(q.detach(), before)


def test_overwriting_a_saved_tensor_is_caught():
    """The op bumps the version counters: a tensor another node saved, rotated afterwards,
    makes backward raise instead of using the rotated values."""
    case = CASES[0]
    x, weight, bias, _, cache, positions = _data(case)
    qkv = torch.nn.functional.linear(x, weight.requires_grad_(True), bias)
    saved = qkv.exp()  # saves its output... and the input of pow:
    squared = qkv.pow(2)  # saves qkv
    _rotate_inplace(case, False, qkv, cache, positions)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (squared.sum() + saved.sum()).backward()


def test_gradient_of_the_tail_passes_through():
    """Features beyond rotary_dim: the gradient of the output, unchanged."""
    case = GradCase(head_size=8, rotary_dim=4)
    _, _, _, _, cache, positions = _data(case)
    q = torch.randn(case.num_tokens, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(case.num_tokens, 1, 8, dtype=torch.float64, requires_grad=True)
    qq, kk = q * 1.0, k * 1.0
    FUSED(qq, kk, cache, positions, 4, True)
    grad_q, grad_k = torch.randn_like(qq), torch.randn_like(kk)
    torch.autograd.backward((qq, kk), (grad_q, grad_k))
    assert torch.equal(q.grad[..., 4:], grad_q[..., 4:])
    assert torch.equal(k.grad[..., 4:], grad_k[..., 4:])
    assert not torch.allclose(q.grad[..., :4], grad_q[..., :4])


@pytest.mark.gpu
@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
def test_gpu_cache_requiring_grad_is_refused(gpu_device, generic):
    """Eager GPU calls take the fast path only when nothing requires grad, the cache included:
    the op refuses it in grad mode, and runs it under no_grad."""
    case = CASES[0]
    x, weight, bias, _, cache, positions = _data(case, torch.float32, gpu_device)
    qkv = torch.nn.functional.linear(x, weight, bias)
    for _ in range(2):  # the second call would relaunch a stored layout
        with torch.no_grad():
            _rotate_inplace(case, generic, qkv, cache.requires_grad_(True), positions)
    before = qkv.clone()
    with pytest.raises(RuntimeError, match="cos_sin_cache requires grad"):
        _rotate_inplace(case, generic, qkv, cache, positions)
    assert torch.equal(qkv, before)
