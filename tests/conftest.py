"""Shared test setup: Triton interpreter switch, GPU marker, problem builders and the oracle.

Without a GPU the Triton kernel is exercised on CPU tensors through Triton's interpreter, which
is chosen when a ``@triton.jit`` function is defined, so ``TRITON_INTERPRET=1`` is set here,
before any test module imports ``rope_compile.kernels.rope_cache`` (or ``torch._inductor``, which
imports triton). ``torch.cuda.is_available()`` does not import triton.

Helpers are plain functions (``from conftest import ...`` in the test modules):

* :func:`make_qkv`: q, k, v as views of ONE qkv projection buffer, so q and k have different
  token strides (and live in one storage), as in an attention layer.
* :func:`rope_f64`: the float64 oracle, written independently of ``rope_compile.reference``
  (complex multiplication of explicitly indexed pairs).
* :func:`poison`: fill a region that must never be read (or written) with NaN.
* :class:`RopeCase` / :func:`build_problem` / :func:`run_and_check`: build one problem, snapshot
  every buffer, run an in-place implementation, then check that the rotated region holds the
  oracle's values and that every other element of every buffer (the tail ``[rotary_dim:]``, v,
  padding) is bit-identical to before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch


def _gpu_device_type() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return None


GPU_DEVICE = _gpu_device_type()

if GPU_DEVICE is None:
    # Must happen before rope_compile.kernels.rope_cache (or torch._inductor) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rope_compile  # noqa: E402  (does not import triton; the kernel module is imported lazily)

FUSED_OP = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace
GENERIC_OP = torch.ops.rope_compile.rotary_embedding


# --------------------------------------------------------------------------------------------
# pytest hooks and fixtures


def pytest_collection_modifyitems(config, items):
    if GPU_DEVICE is not None:
        return
    skip = pytest.mark.skip(reason="needs a CUDA or XPU device (none available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu_device() -> str:
    if GPU_DEVICE is None:
        pytest.skip("needs a CUDA or XPU device (none available)")
    return GPU_DEVICE


@pytest.fixture
def restore_check_positions():
    """Restore the global positions-check flag after a test that toggles it."""
    from rope_compile.validation import check_positions_on_device_enabled

    before = check_positions_on_device_enabled()
    yield
    rope_compile.set_check_positions(before)


# --------------------------------------------------------------------------------------------
# tensors


def _randn(shape, dtype, generator) -> torch.Tensor:
    # Random, never all zeros; made on the CPU so a seed gives the same data on every device.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)


def make_qkv(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    generator: torch.Generator | None = None,
):
    """``(q, k, v, qkv)``: q ``[T, Hq, D]``, k and v ``[T, Hkv, D]``, all views of one random
    ``qkv`` ``[T, (Hq + 2 Hkv) D]`` buffer (``qkv.split`` then ``view``)."""
    width = (num_q_heads + 2 * num_kv_heads) * head_size
    qkv = _randn((num_tokens, width), dtype, generator).to(device)
    q, k, v = qkv.split(
        [num_q_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], -1
    )
    # Explicit head counts: view(T, -1, D) is ambiguous for T == 0.
    q = q.view(num_tokens, num_q_heads, head_size)
    k = k.view(num_tokens, num_kv_heads, head_size)
    v = v.view(num_tokens, num_kv_heads, head_size)
    return q, k, v, qkv


def poison(x: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """Fill ``x`` (a view) in place with a sentinel, NaN by default, and return it."""
    return x.fill_(value)


def assert_grads_match(fn, reference, inputs) -> None:
    """The gradients of ``fn`` and of ``reference`` (float64 functions of ``inputs`` returning
    tensors) for the same random output weights agree to 1e-12."""
    weights = [torch.randn(x.shape, dtype=torch.float64) for x in inputs]

    def grads(f):
        outputs = f(*inputs)
        return torch.autograd.grad(sum((w * y).sum() for w, y in zip(weights, outputs,
                                                                    strict=True)), inputs)

    for a, b in zip(grads(fn), grads(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe: compares the raw bits)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return torch.equal(a.cpu(), b.cpu())


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    if not same_bits(a, b):
        diff = "shape/dtype differ"
        if a.shape == b.shape and a.dtype == b.dtype:
            as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
            changed = (a.cpu().view(as_int) != b.cpu().view(as_int)).nonzero()
            diff = f"{changed.shape[0]} elements changed, first at {changed[:4].tolist()}"
        raise AssertionError(f"{what} is not bit-identical: {diff}")


# --------------------------------------------------------------------------------------------
# float64 oracle


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF transformers' ``rotate_half`` (neox)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """HF transformers' ``rotate_every_two`` (GPT-J, Cohere, GLM)."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def to_device_keeping_layout(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` on ``device`` with its layout (and its base's storage) kept."""
    if x.device.type == torch.device(device).type:
        return x
    base = x if x._base is None else x._base
    return base.to(device).as_strided(x.shape, x.stride(), x.storage_offset())


def pair_indices(rotary_dim: int, is_neox: bool) -> tuple[list[int], list[int]]:
    """The (first, second) element index of each rotated pair."""
    half = rotary_dim // 2
    if is_neox:
        return list(range(half)), [i + half for i in range(half)]
    return [2 * i for i in range(half)], [2 * i + 1 for i in range(half)]


def rope_f64(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
) -> torch.Tensor:
    """Float64 RoPE of ``x`` ``[T, H, D]`` (CPU result, tail copied unchanged).

    Pair ``(a, b)`` is the complex number ``a + ib``; the rotation multiplies it by
    ``cos + i sin`` taken from row ``positions[t]`` of the cache (columns ``i`` and
    ``rotary_dim/2 + i``)."""
    x64 = x.detach().cpu().to(torch.float64)
    cache = cos_sin_cache.detach().cpu().to(torch.float64)
    half = rotary_dim // 2
    rows = cache[positions.detach().cpu().to(torch.int64)]  # [T, rot]
    phase = torch.complex(rows[:, :half], rows[:, half:rotary_dim])[:, None, :]  # [T, 1, half]
    first, second = pair_indices(rotary_dim, is_neox)
    z = torch.complex(x64[..., first], x64[..., second]) * phase
    out = x64.clone()
    out[..., first] = z.real
    out[..., second] = z.imag
    return out


# Tolerances of a kernel's result (fp32 math, one rounding to the dtype) against rope_f64 of the
# same inputs. bf16 allows one full ulp (2^-7): Triton's interpreter rounds fp32 -> bf16 toward
# zero, not to nearest.
TOLERANCES = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
    torch.bfloat16: {"rtol": 8.5e-3, "atol": 1e-5},
}


# --------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class RopeCase:
    num_tokens: int = 7
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 128
    rotary_dim: int = 128
    is_neox: bool = True
    dtype: torch.dtype = torch.bfloat16
    same_dtype_cache: bool = False  # cache in q's dtype instead of float32
    pos_dtype: torch.dtype = torch.int64
    # "qkv": q, k, v views of one projection buffer; "contiguous": separate contiguous q and k;
    # "padded": q and k interior slices of NaN-padded buffers (odd strides, storage offsets).
    layout: str = "qkv"
    nan_tail: bool = False  # poison q/k[..., rotary_dim:] with NaN
    # "random": uniform(-1, 1) cos/sin values (every pair matters); "rope": the real cache;
    # "poisoned": random, padded with NaN columns and NaN in every row positions do not use;
    # "transposed": random, column stride != 1.
    cache_kind: str = "random"
    strided_positions: bool = False
    max_position: int = 64

    @property
    def id(self) -> str:
        parts = [
            f"T{self.num_tokens}",
            f"H{self.num_q_heads}-{self.num_kv_heads}",
            f"D{self.head_size}r{self.rotary_dim}",
            "neox" if self.is_neox else "gptj",
            str(self.dtype).removeprefix("torch."),
            "cache-same" if self.same_dtype_cache else "cache-f32",
            str(self.pos_dtype).removeprefix("torch."),
            self.layout,
        ]
        if self.nan_tail:
            parts.append("nantail")
        if self.cache_kind != "random":
            parts.append(f"cache-{self.cache_kind}")
        if self.strided_positions:
            parts.append("strided-pos")
        return "-".join(parts)


@dataclass
class RopeProblem:
    case: RopeCase
    q: torch.Tensor  # [T, Hq, D] view
    k: torch.Tensor  # [T, Hk, D] view
    v: torch.Tensor | None
    cos_sin_cache: torch.Tensor
    positions: torch.Tensor
    # Every buffer the op could touch, each with the views of it that must be rotated.
    buffers: list[tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)

    @property
    def rotary_dim(self) -> int:
        return self.case.rotary_dim

    @property
    def is_neox(self) -> bool:
        return self.case.is_neox

    @property
    def head_size(self) -> int:
        return self.case.head_size

    def q_rot(self) -> torch.Tensor:
        return self.q[..., : self.rotary_dim]

    def k_rot(self) -> torch.Tensor:
        return self.k[..., : self.rotary_dim]

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[T, H * D]`` (a view) when its layout allows, else ``x`` itself."""
        try:
            return x.view(x.shape[0], x.shape[1] * x.shape[2])
        except RuntimeError:
            return x


def _padded(shape, dtype, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, heads, head_size = shape
    buf = poison(torch.empty(num_tokens + 2, heads + 1, head_size + 16, dtype=dtype))
    inner = buf[1 : num_tokens + 1, 1:, 8 : 8 + head_size]
    inner.copy_(_randn(inner.shape, dtype, generator))
    buf = buf.to(device)
    return buf, buf[1 : num_tokens + 1, 1:, 8 : 8 + head_size]


def _make_cache(case: RopeCase, positions: torch.Tensor, device, generator) -> torch.Tensor:
    rot, rows = case.rotary_dim, case.max_position
    dtype = case.dtype if case.same_dtype_cache else torch.float32
    if case.cache_kind == "rope":
        return rope_compile.compute_cos_sin_cache(rot, rows, 10000.0, dtype).to(device)
    values = (torch.rand((rows, rot), generator=generator) * 2 - 1).to(dtype)
    if case.cache_kind == "random":
        return values.to(device)
    if case.cache_kind == "poisoned":
        buf = poison(torch.empty(rows, rot + 6, dtype=dtype))
        used = torch.zeros(rows, dtype=torch.bool)
        used[positions.long()] = True
        buf[used, :rot] = values[used]
        return buf.to(device)[:, :rot]
    if case.cache_kind == "transposed":
        return values.t().contiguous().to(device).t()
    raise ValueError(case.cache_kind)


def build_problem(case: RopeCase, device="cpu", seed: int = 0) -> RopeProblem:
    g = torch.Generator().manual_seed(seed)
    t, hq, hk, d = case.num_tokens, case.num_q_heads, case.num_kv_heads, case.head_size
    if case.layout == "qkv":
        q, k, v, qkv = make_qkv(t, hq, hk, d, case.dtype, device, generator=g)
        buffers = [(qkv, [q, k])]
    elif case.layout == "contiguous":
        q = _randn((t, hq, d), case.dtype, g).to(device)
        k = _randn((t, hk, d), case.dtype, g).to(device)
        v = None
        buffers = [(q, [q]), (k, [k])]
    elif case.layout == "padded":
        qbuf, q = _padded((t, hq, d), case.dtype, device, g)
        kbuf, k = _padded((t, hk, d), case.dtype, device, g)
        v = None
        buffers = [(qbuf, [q]), (kbuf, [k])]
    else:
        raise ValueError(case.layout)
    if case.nan_tail:
        poison(q[..., case.rotary_dim :])
        poison(k[..., case.rotary_dim :])

    p = case.max_position
    pos = torch.randint(1, p, (t,), generator=g)
    if t >= 3:  # both ends of the cache
        pos[1] = 0
        pos[-1] = p - 1
    cache = _make_cache(case, pos, device, g)
    if case.strided_positions:
        wide = torch.full((2 * t,), -(10**6), dtype=torch.int64)  # poison: out of range
        wide[::2] = pos
        positions = wide.to(case.pos_dtype).to(device)[::2]
    else:
        positions = pos.to(case.pos_dtype).to(device)
    return RopeProblem(case, q, k, v, cache, positions, buffers)


def _region(buf: torch.Tensor, like: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The view of ``like`` (a fresh contiguous tensor shaped as ``buf``) at ``view``'s place."""
    offset = view.storage_offset() - buf.storage_offset()
    return like.as_strided(view.size(), view.stride(), like.storage_offset() + offset)


def run_and_check(
    case: RopeCase,
    apply: Callable[[RopeProblem], object],
    device="cpu",
    seed: int = 0,
    tolerances: dict | None = None,
) -> RopeProblem:
    """Build ``case``, run ``apply`` (in place) and check every element of every buffer."""
    prob = build_problem(case, device, seed)
    rot = case.rotary_dim
    expected = [
        [rope_f64(x, prob.positions, prob.cos_sin_cache, rot, case.is_neox) for x in views]
        for _, views in prob.buffers
    ]
    before = [buf.clone() for buf, _ in prob.buffers]
    inputs_before = [prob.cos_sin_cache.clone(), prob.positions.clone()]
    if case.num_tokens:
        # Not vacuous: the oracle moves the rotated region.
        q_exp = expected[0][0][..., :rot]
        assert not torch.equal(q_exp, prob.buffers[0][1][0][..., :rot].double().cpu())

    result = apply(prob)
    assert result is None, "in-place ops return None"

    tol = tolerances or TOLERANCES[case.dtype]
    for (buf, views), snapshot, exps in zip(prob.buffers, before, expected, strict=True):
        assert buf.shape == snapshot.shape
        rotated = torch.zeros(buf.shape, dtype=torch.bool)
        for view, exp in zip(views, exps, strict=True):
            _region(buf, rotated, view)[..., :rot] = True
            torch.testing.assert_close(
                view[..., :rot].cpu().to(torch.float64), exp[..., :rot], **tol
            )
        # Everything else (tail [rot:], v, padding) is bit-identical to before.
        keep = ~rotated
        assert_same_bits(buf.cpu()[keep], snapshot.cpu()[keep], "the unrotated part of the buffer")
    # Inputs other than q/k are not written either.
    assert_same_bits(prob.cos_sin_cache, inputs_before[0], "cos_sin_cache")
    assert_same_bits(prob.positions, inputs_before[1], "positions")
    return prob


# --------------------------------------------------------------------------------------------
# the coverage matrix

HEAD_ROT = [(128, 128), (128, 64), (256, 128), (128, 96)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAYOUTS = ["qkv", "contiguous", "padded"]


def core_cases() -> list[RopeCase]:
    """style x (head, rot) x dtype x cache dtype; positions dtype and layout rotate through."""
    cases = []
    for is_neox in (True, False):
        for head_size, rot in HEAD_ROT:
            for dtype in DTYPES:
                for same in (False, True) if dtype != torch.float32 else (False,):
                    n = len(cases)
                    cases.append(
                        RopeCase(
                            head_size=head_size,
                            rotary_dim=rot,
                            is_neox=is_neox,
                            dtype=dtype,
                            same_dtype_cache=same,
                            pos_dtype=(torch.int64, torch.int32)[n % 2],
                            layout=LAYOUTS[(n // 2) % 3],
                        )
                    )
    return cases


def shape_cases() -> list[RopeCase]:
    """Token counts (incl. 0 and odd) x head counts (single head, GQA, odd) x style."""
    cases = []
    for num_tokens in (0, 1, 7, 33):
        for hq, hk in ((1, 1), (4, 2), (8, 1), (3, 3), (6, 2)):
            for is_neox in (True, False):
                n = len(cases)
                cases.append(
                    RopeCase(
                        num_tokens=num_tokens,
                        num_q_heads=hq,
                        num_kv_heads=hk,
                        head_size=128,
                        rotary_dim=(64, 128)[n % 2],
                        is_neox=is_neox,
                        dtype=(torch.bfloat16, torch.float32)[(n // 2) % 2],
                        pos_dtype=(torch.int64, torch.int32)[(n // 3) % 2],
                        layout=("qkv", "contiguous")[(n // 5) % 2],
                    )
                )
    return cases


def poison_cases() -> list[RopeCase]:
    """NaN tails, poisoned / transposed / real caches, strided positions, other head sizes."""
    cases = []
    for is_neox in (True, False):
        for layout in LAYOUTS:
            cases.append(
                RopeCase(head_size=128, rotary_dim=96, is_neox=is_neox, layout=layout,
                         nan_tail=True, cache_kind="poisoned", dtype=torch.float16)
            )
        cases += [
            RopeCase(head_size=256, rotary_dim=128, is_neox=is_neox, nan_tail=True,
                     cache_kind="transposed", strided_positions=True, pos_dtype=torch.int32),
            RopeCase(head_size=128, rotary_dim=64, is_neox=is_neox, cache_kind="rope",
                     max_position=4096, dtype=torch.float32, strided_positions=True),
            RopeCase(head_size=512, rotary_dim=512, is_neox=is_neox, num_q_heads=2,
                     num_kv_heads=1, same_dtype_cache=True),
            RopeCase(head_size=64, rotary_dim=2, is_neox=is_neox, nan_tail=True,
                     dtype=torch.float32),
            RopeCase(head_size=80, rotary_dim=80, is_neox=is_neox, num_tokens=5),
            # More k heads than q heads: valid for the op, catches loops bounded by Hq.
            RopeCase(num_q_heads=1, num_kv_heads=3, rotary_dim=64, is_neox=is_neox,
                     layout="contiguous"),
        ]
    return cases


def all_cases() -> list[RopeCase]:
    return core_cases() + shape_cases() + poison_cases()


def case_params(cases: list[RopeCase]) -> list:
    return [pytest.param(c, id=c.id) for c in cases]


def with_(case: RopeCase, **changes) -> RopeCase:
    return replace(case, **changes)


# --------------------------------------------------------------------------------------------
# ways to call the ops (each takes a RopeProblem and rotates its q and k in place)


def apply_fused_op(p: RopeProblem):
    """torch.ops fused op on the ``[..., :rotary_dim]`` slices (how the module calls it)."""
    return FUSED_OP(p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions, p.rotary_dim, p.is_neox)


def apply_fused_op_full_head(p: RopeProblem):
    """torch.ops fused op on whole heads with ``rotary_dim <= head_size``."""
    return FUSED_OP(p.q, p.k, p.cos_sin_cache, p.positions, p.rotary_dim, p.is_neox)


def apply_fused_public(p: RopeProblem):
    return rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(
        p.q_rot(), p.k_rot(), p.cos_sin_cache, p.positions, p.rotary_dim, p.is_neox
    )


def apply_generic_public(p: RopeProblem):
    """Public generic op on ``[T, H * head_size]`` views (or ``[T, H, D]`` when not viewable)."""
    return rope_compile.rotary_embedding(
        p.positions, p.flat(p.q), p.flat(p.k), p.head_size, p.cos_sin_cache, p.is_neox
    )


def apply_generic_op(p: RopeProblem):
    """torch.ops generic op on ``[T, H, head_size]``."""
    return GENERIC_OP(p.positions, p.q, p.k, p.head_size, p.cos_sin_cache, p.is_neox)


OP_APPLIES = {
    "fused-op": apply_fused_op,
    "fused-op-full-head": apply_fused_op_full_head,
    "fused-public": apply_fused_public,
    "generic-public": apply_generic_public,
    "generic-op": apply_generic_op,
}


def build_wheel(out_dir, timeout: int = 600):
    """``pip wheel`` of this checkout into ``out_dir`` (the CompletedProcess). setuptools builds
    in the tree (``build/``, the egg-info): test processes running side by side (pytest -n)
    take turns, by a lock file."""
    import fcntl
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / "rope_compile_wheel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                 "-w", str(out_dir), str(repo)], capture_output=True, text=True, timeout=timeout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
