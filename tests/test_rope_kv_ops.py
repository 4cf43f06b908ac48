"""RoPE + KV-cache store and QK-norm + RoPE (+ store): the three ops of
``rope_compile/kernels/rope_kv_store.py`` on CPU (the reference kernel, and the Triton kernel
through the interpreter), opcheck, bad input, the sglang / vLLM drop-ins and the module's
``fused_set_kv_buffer_arg`` path; ``gpu``-marked variants on CUDA / XPU.

Each problem takes q, k and v as strided views of one qkv projection, KV buffers that are
views (padded heads) of larger NaN-poisoned buffers, and checks: q and k against a float64
oracle (norm rounded to the dtype at HF's points, then RoPE), the written cache rows exactly
equal to torch's conversion of the op's own k (and of v), and every other element of every
buffer bit-identical to before.

The norm is per head (weights ``[D]``) or, for q and/or k, over the whole projection (weights
``[H*D]``, HF OLMo2's ``q_norm`` / ``k_norm``: one RMSNorm over all of a token's heads), with
HF Qwen3's rounding (``round(w * round(x_normed))``), Gemma3's (``round(x_normed * (1 + w))``)
or OLMo2's (``round_once=True``: ``round(x_normed * w)``, one rounding after the weight).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from conftest import GPU_DEVICE, TOLERANCES, pair_indices, rope_f64
from conftest import assert_same_bits as _assert_same_bits

import rope_compile
from rope_compile.kernels import rope_kv_store
from rope_compile.reference import to_kv_cache
from rope_compile.validation import validate_kv_store, validate_norm_rope

FP8 = getattr(torch, "float8_e4m3fn", None)
KV_OP = torch.ops.rope_compile.fused_qk_rope_kv_store_inplace.default
NORM_OP = torch.ops.rope_compile.fused_qk_norm_rope_inplace.default
NORM_KV_OP = torch.ops.rope_compile.fused_qk_norm_rope_kv_store_inplace.default


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """conftest's bitwise check, fp8 included (compared as its uint8 bits)."""
    if a.dtype == b.dtype and a.element_size() == 1 and a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    _assert_same_bits(a, b, what)


@dataclass(frozen=True)
class KVCase:
    num_tokens: int = 5
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 128
    v_head_size: int | None = None  # None: head_size
    rotary_dim: int = 128
    is_neox: bool = True
    dtype: torch.dtype = torch.bfloat16
    cache_dtype: torch.dtype | None = None  # None: dtype
    scales: tuple[float, float] | None = None
    norm: str | None = None  # None, "qwen" (x * w), "gemma" (x * (1 + w)) or "olmo2" (x * w,
    #                          one rounding after the weight: round_once=True)
    whole: str = ""  # which norms span the whole projection (weight [H*D]): "", "q", "k", "qk"
    store: bool = True
    pos_dtype: torch.dtype = torch.int64
    loc_dtype: torch.dtype = torch.int64
    num_slots: int = 13

    @property
    def id(self) -> str:
        parts = [f"T{self.num_tokens}", f"H{self.num_q_heads}-{self.num_kv_heads}",
                 f"D{self.head_size}r{self.rotary_dim}", "neox" if self.is_neox else "gptj",
                 str(self.dtype)[6:]]
        if self.v_head_size:
            parts.append(f"Dv{self.v_head_size}")
        if self.store:
            parts.append(f"cache-{str(self.cache_dtype or self.dtype)[6:]}")
        if self.scales:
            parts.append("scaled")
        if self.norm:
            parts.append(self.norm + (f"-whole{self.whole}" if self.whole else ""))
        parts.append(f"pos{str(self.pos_dtype)[-2:]}-loc{str(self.loc_dtype)[-2:]}")
        return "-".join(parts)


@dataclass
class KVProblem:
    case: KVCase
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qkv: torch.Tensor
    k_big: torch.Tensor  # the poisoned storage k_buffer is a view of
    v_big: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    cache_loc: torch.Tensor
    cos_sin_cache: torch.Tensor
    positions: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None

    @property
    def norm(self):
        if self.case.norm is None:
            return None
        return (self.q_weight, self.k_weight, 1e-6, 1.0 if self.case.norm == "gemma" else 0.0)

    @property
    def round_once(self):
        """The ops' ``round_once`` (the last argument): True for OLMo2's rounding, else the
        default (as the weight offset says)."""
        return True if self.case.norm == "olmo2" else None

    @property
    def launch_norm(self):
        """``norm`` as the launcher takes it, ``round_once`` included."""
        return None if self.norm is None else (*self.norm, self.round_once)

    @property
    def kv(self):
        if not self.case.store:
            return None
        k_scale, v_scale = self.case.scales or (None, None)
        return (self.v, self.k_buffer, self.v_buffer, self.cache_loc, k_scale, v_scale)


def build(case: KVCase, device="cpu", seed=0) -> KVProblem:
    g = torch.Generator().manual_seed(seed)
    t, hq, hk, d, rot = (case.num_tokens, case.num_q_heads, case.num_kv_heads, case.head_size,
                         case.rotary_dim)
    dv = case.v_head_size or d
    widths = [hq * d, hk * d, hk * dv]
    qkv = torch.randn(t, sum(widths), generator=g).to(case.dtype).to(device)
    q, k, v = qkv.split(widths, -1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, dv)
    cache_dtype = case.cache_dtype or case.dtype
    # Buffers: [S, Hk, D] views of NaN-filled [S, Hk, D + 8] storages (head stride D + 8).
    k_big = torch.full((case.num_slots, hk, d + 8), float("nan")).to(cache_dtype).to(device)
    v_big = torch.full((case.num_slots, hk, dv + 8), float("nan")).to(cache_dtype).to(device)
    loc = torch.randperm(case.num_slots, generator=g)[:t].to(case.loc_dtype).to(device)
    max_position = 40
    cache = (torch.rand(max_position, rot, generator=g) * 2 - 1).to(device)
    positions = torch.randint(0, max_position, (t,), generator=g).to(case.pos_dtype).to(device)
    weights = [None, None]
    if case.norm:
        weights = [(torch.randn(h * d if name in case.whole else d, generator=g) * 0.5
                    + (0.0 if case.norm == "gemma" else 1.0)).to(case.dtype).to(device)
                   for name, h in (("q", hq), ("k", hk))]
    return KVProblem(case, q, k, v, qkv, k_big, v_big, k_big[..., :d], v_big[..., :dv], loc,
                     cache, positions, *weights)


def norm_f64(x, weight, eps, gemma, olmo2=False) -> torch.Tensor:
    """HF's RMSNorm of x ``[T, H, D]`` in float64, rounded to x's dtype where HF rounds (the
    kernel header): Qwen3 ``round(w * round(xn))``, Gemma3 (``gemma``) ``round(xn * (1 + w))``,
    OLMo2 (``olmo2``) ``round(xn * w)``; per head for a weight ``[D]``, over all H heads of a
    token (row element ``h*D + c``) for a weight ``[H*D]``."""
    if weight.shape[0] != x.shape[-1]:
        flat = x.reshape(x.shape[0], 1, x.shape[1] * x.shape[2])
        return norm_f64(flat, weight, eps, gemma, olmo2).view(x.shape)
    h = x.detach().cpu().double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.detach().cpu().double()
    if gemma:
        return (normed * (1 + w)).to(x.dtype)
    if olmo2:
        return (normed * w).to(x.dtype)
    return (w * normed.to(x.dtype).double()).to(x.dtype)


def expected_qk(p: KVProblem):
    q, k = p.q, p.k
    if p.case.norm:
        forms = (p.case.norm == "gemma", p.case.norm == "olmo2")
        q, k = norm_f64(q, p.q_weight, 1e-6, *forms), norm_f64(k, p.k_weight, 1e-6, *forms)
    return [rope_f64(x, p.positions, p.cos_sin_cache, p.case.rotary_dim, p.case.is_neox)
            for x in (q, k)]


def _apply_op(p: KVProblem) -> None:
    kv, norm, c = p.kv, p.norm, p.case
    rope = (p.cos_sin_cache, p.positions, c.rotary_dim, c.is_neox)
    if norm is None:
        KV_OP(p.q, p.k, *kv[:4], *rope, *kv[4:])
    elif kv is None:
        NORM_OP(p.q, p.k, *norm, *rope, p.round_once)
    else:
        NORM_KV_OP(p.q, p.k, *kv[:4], *norm, *rope, *kv[4:], p.round_once)


def _apply_triton(p: KVProblem) -> None:
    """The Triton kernel (the interpreter on CPU tensors), after the op's checks."""
    kv, norm, c = p.kv, p.norm, p.case
    if norm is None:
        validate_kv_store(p.q, p.k, *kv[:4], p.cos_sin_cache, p.positions, c.rotary_dim,
                          *kv[4:])
    else:
        validate_norm_rope(p.q, p.k, *norm, p.cos_sin_cache, p.positions, c.rotary_dim, kv,
                           p.round_once)
    rope_kv_store.launch(p.q, p.k, p.cos_sin_cache, p.positions, c.rotary_dim, c.is_neox,
                         norm=p.launch_norm, kv=kv)


# The Triton kernel runs on CPU tensors only under the interpreter (set by conftest when there
# is no GPU); on a GPU machine the gpu-marked tests run it compiled.
NO_INTERPRETER = pytest.mark.skipif(GPU_DEVICE is not None,
                                    reason="Triton interpreter off (a GPU is present)")
APPLY_PARAMS = [pytest.param(_apply_op, id="op"),
                pytest.param(_apply_triton, id="triton", marks=NO_INTERPRETER)]


def _close_bf16_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within one bf16 ulp (Triton's interpreter rounds fp32 -> bf16 toward zero)."""
    a, b = a.float(), b.float()
    ulp = torch.finfo(torch.bfloat16).eps * b.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return bool(((a - b).abs() <= ulp).all())


def run_and_check(case: KVCase, apply, device="cpu", seed=0) -> KVProblem:
    p = build(case, device, seed)
    exp_q, exp_k = expected_qk(p)
    snap = {name: getattr(p, name).clone() for name in ("qkv", "k_big", "v_big",
                                                        "cos_sin_cache", "positions",
                                                        "cache_loc")}
    v_before = p.v.clone()
    assert apply(p) is None
    tol = TOLERANCES[case.dtype]
    if case.norm:  # a normalised value one ulp off moves the rotation by about one ulp
        tol = {"rtol": 2 * tol["rtol"], "atol": 4 * tol["rtol"]}
    torch.testing.assert_close(p.q.cpu().double(), exp_q, **tol)
    torch.testing.assert_close(p.k.cpu().double(), exp_k, **tol)
    # q and k are written only where they are rotated (and normalised); v is read only.
    qkv_keep = torch.ones(p.qkv.shape, dtype=torch.bool)
    width = case.num_q_heads * case.head_size + case.num_kv_heads * case.head_size
    if case.norm:
        qkv_keep[:, :width] = False
    else:
        qkv_keep[:, :width].view(case.num_tokens, case.num_q_heads + case.num_kv_heads,
                                 case.head_size)[
            ..., :case.rotary_dim] = False
    assert_same_bits(p.qkv.cpu()[qkv_keep], snap["qkv"].cpu()[qkv_keep], "qkv outside q/k")
    for name in ("cos_sin_cache", "positions", "cache_loc"):
        assert_same_bits(getattr(p, name), snap[name], name)

    loc = p.cache_loc.long().cpu()
    for big, buf, x, scale, name in (
            (p.k_big, p.k_buffer, p.k, (case.scales or (None,))[0], "k_buffer"),
            (p.v_big, p.v_buffer, v_before, (case.scales or (None, None))[1], "v_buffer")):
        if not case.store:
            assert_same_bits(big, snap[name.replace("buffer", "big")], name)
            continue
        written = torch.zeros(big.shape, dtype=torch.bool)
        written[loc, :, :buf.shape[2]] = True
        before = snap[name.replace("buffer", "big")].cpu()
        assert_same_bits(big.cpu()[~written], before[~written], f"{name} outside the rows")
        stored = buf.cpu()[loc]
        expected = to_kv_cache(x.cpu(), scale, buf.dtype)  # torch's cast of the op's own k / v
        if same_bits_or_interpreter_bf16(stored, expected, apply, device):
            continue
        assert_same_bits(stored, expected, f"{name} rows")
    return p


def same_bits_or_interpreter_bf16(stored, expected, apply, device) -> bool:
    """bf16 rows from a conversion under Triton's interpreter (round toward zero): one ulp."""
    if apply is _apply_triton and device == "cpu" and stored.dtype == torch.bfloat16:
        return _close_bf16_ulp(stored, expected) and bool(
            (stored.isnan() == expected.isnan()).all())
    return False


def kv_cases() -> list[KVCase]:
    cases = []
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    caches = [None, torch.float32, torch.bfloat16, FP8, torch.float16]
    n = 0
    for norm in (None, "qwen", "gemma"):
        for store in ((True,) if norm is None else (False, True)):
            for is_neox in (True, False):
                for head_size, rot in ((128, 128), (128, 64), (64, 48)):
                    dtype = dtypes[n % 3]
                    cache_dtype = caches[n % 5] if store else None
                    if cache_dtype is not None and cache_dtype is FP8 and FP8 is None:
                        cache_dtype = None
                    cases.append(KVCase(
                        num_tokens=(5, 7, 1, 4)[n % 4],
                        num_q_heads=(4, 1, 3)[n % 3], num_kv_heads=(2, 1, 1)[n % 3],
                        head_size=head_size, rotary_dim=rot, is_neox=is_neox, dtype=dtype,
                        cache_dtype=cache_dtype, norm=norm, store=store,
                        v_head_size=96 if n % 4 == 1 else None,
                        scales=((0.5, 2.0), (0.03, 0.07), None)[n % 3] if store else None,
                        pos_dtype=(torch.int64, torch.int32)[n % 2],
                        loc_dtype=(torch.int32, torch.int64)[(n // 2) % 2]))
                    n += 1
    cases.append(KVCase(num_tokens=0))
    cases.append(KVCase(num_tokens=0, norm="gemma"))
    return cases + whole_norm_cases() + olmo2_cases()


def whole_norm_cases() -> list[KVCase]:
    """Whole-projection norms (weights ``[H*D]``) of q, k or both: one or several head blocks
    per program (the kernel's two passes), a partial rotary tail, one head (the per-head norm),
    odd and zero token counts, each dtype, with and without the store."""
    return [
        KVCase(num_tokens=7, num_q_heads=4, num_kv_heads=2, norm="qwen", whole="qk",
               store=False, dtype=torch.float32),
        KVCase(num_tokens=5, num_q_heads=8, num_kv_heads=2, norm="qwen", whole="qk",
               rotary_dim=64, dtype=torch.bfloat16, cache_dtype=torch.float32),
        KVCase(num_tokens=3, num_q_heads=12, num_kv_heads=3, head_size=64, rotary_dim=48,
               is_neox=False, norm="gemma", whole="qk", dtype=torch.float16,
               cache_dtype=FP8 or torch.float16, scales=(0.5, 2.0), v_head_size=96),
        KVCase(num_tokens=1, num_q_heads=4, num_kv_heads=2, norm="qwen", whole="q",
               dtype=torch.float16, store=False),
        KVCase(num_tokens=4, num_q_heads=3, num_kv_heads=1, head_size=64, rotary_dim=64,
               norm="gemma", whole="qk", dtype=torch.float32, cache_dtype=torch.bfloat16,
               loc_dtype=torch.int32),
        KVCase(num_tokens=5, num_q_heads=1, num_kv_heads=4, head_size=64, rotary_dim=32,
               norm="qwen", whole="k", dtype=torch.bfloat16, pos_dtype=torch.int32),
        KVCase(num_tokens=0, norm="qwen", whole="qk"),
    ]


def olmo2_cases() -> list[KVCase]:
    """OLMo2's rounding (``round_once=True``, offset 0): whole-projection norms (OLMo2's own
    layout) and per head, each dtype, with and without the store, partial rotary, GPT-J pairs."""
    return [
        KVCase(num_tokens=5, num_q_heads=4, num_kv_heads=2, norm="olmo2", whole="qk",
               store=False, dtype=torch.bfloat16),
        KVCase(num_tokens=3, num_q_heads=8, num_kv_heads=2, norm="olmo2", whole="qk",
               rotary_dim=64, dtype=torch.float16, cache_dtype=torch.float32,
               scales=(0.5, 2.0)),
        KVCase(num_tokens=4, num_q_heads=3, num_kv_heads=1, head_size=64, rotary_dim=48,
               is_neox=False, norm="olmo2", whole="q", dtype=torch.bfloat16,
               cache_dtype=FP8 or torch.bfloat16, v_head_size=96),
        KVCase(num_tokens=7, num_q_heads=4, num_kv_heads=2, norm="olmo2", store=False,
               dtype=torch.float16),
        KVCase(num_tokens=2, num_q_heads=2, num_kv_heads=2, head_size=64, rotary_dim=64,
               norm="olmo2", whole="k", dtype=torch.float32, loc_dtype=torch.int32),
        KVCase(num_tokens=0, norm="olmo2", whole="qk"),
    ]


CASES = [pytest.param(c, id=c.id) for c in kv_cases()]


@pytest.mark.parametrize("apply", APPLY_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_kv_ops_cpu(case, apply):
    run_and_check(case, apply)


@pytest.mark.skipif(FP8 is None, reason="torch has no float8_e4m3fn")
@pytest.mark.parametrize("apply", APPLY_PARAMS)
def test_fp8_store_rounds_and_saturates_as_torch(apply):
    """Values across fp8's whole range (subnormals, ties, 448..480, overflow, inf, NaN)."""
    case = KVCase(num_tokens=3, num_q_heads=1, num_kv_heads=1, head_size=64, rotary_dim=64,
                  dtype=torch.float32, cache_dtype=FP8, scales=(1.0, 0.25))
    p = build(case)
    special = torch.tensor([0.0, -0.0, 2.0**-10, 3 * 2.0**-10, 2.0**-7, 464.0, 470.0, 479.0,
                            480.0, 1e6, float("inf"), -float("inf"), float("nan"), -500.0,
                            1.0625, 1.1875])
    values = torch.cat([special, torch.randn(3 * 64 - special.numel()) * 100])
    p.v.copy_(values.view(3, 1, 64))
    v = p.v.clone()
    apply(p)
    stored = p.v_buffer[p.cache_loc.long()]
    if torch.tensor([1e6]).to(FP8).item() == 448.0:  # torch's cast saturates (2.13 does)
        assert_same_bits(stored, (v / 0.25).to(FP8), "fp8 v rows (torch's own cast)")
    assert_same_bits(stored, to_kv_cache(v, 0.25, FP8), "fp8 v rows (reference)")


def test_runtime_args_match_kernel_signature():
    """The plan's runtime arguments then its constexprs are the kernel's parameters, in order
    (one launch description)."""
    p = _small({"norm": "gemma"})
    names = rope_kv_store.fused_qk_norm_rope_kv_kernel.arg_names
    for rope in (rope_kv_store.FromCache(p.cos_sin_cache, p.positions),
                 rope_kv_store.FromTables(p.cos_sin_cache[:1, :16], p.cos_sin_cache[:1, 16:])):
        plan = rope_kv_store.plan_tensor_launch(p.q, p.k, rope, 32, True, norm=p.norm, kv=p.kv)
        assert names == [*rope_kv_store.RUNTIME_ARGS, *plan.constexprs]
        assert list(plan.args) == list(rope_kv_store.RUNTIME_ARGS)
        tensors = [n for n, x in plan.args.items() if isinstance(x, torch.Tensor)]
        assert tensors == list(rope_kv_store.RUNTIME_ARGS[:rope_kv_store.NUM_TENSOR_ARGS])


def _small(case_changes=None, device="cpu"):
    return build(replace(KVCase(num_tokens=3, num_q_heads=2, num_kv_heads=1, head_size=64,
                                rotary_dim=32, dtype=torch.float32, num_slots=5),
                         **(case_changes or {})), device)


def _opcheck_args(p: KVProblem, op):
    c = p.case
    k_scale, v_scale = c.scales or (None, None)
    kv = (p.v, p.k_buffer, p.v_buffer, p.cache_loc)
    norm = p.norm
    rope = (p.cos_sin_cache, p.positions, c.rotary_dim, c.is_neox)
    if op is KV_OP:
        return (p.q, p.k, *kv, *rope, k_scale, v_scale)
    if op is NORM_OP:
        return (p.q, p.k, *norm, *rope, p.round_once)
    return (p.q, p.k, *kv, *norm, *rope, k_scale, v_scale, p.round_once)


OPCHECK = [
    pytest.param(KV_OP, {"scales": (0.5, 2.0)}, id="kv-store"),
    pytest.param(NORM_OP, {"norm": "qwen", "store": False}, id="norm-rope"),
    pytest.param(NORM_KV_OP, {"norm": "gemma", "is_neox": False}, id="norm-rope-kv"),
    pytest.param(NORM_OP, {"norm": "qwen", "store": False, "whole": "qk"},
                 id="norm-rope-whole"),
    pytest.param(NORM_KV_OP, {"norm": "gemma", "whole": "q", "num_q_heads": 4},
                 id="norm-rope-kv-whole-q"),
    pytest.param(NORM_OP, {"norm": "olmo2", "store": False, "whole": "qk",
                           "dtype": torch.bfloat16}, id="norm-rope-olmo2"),
    pytest.param(NORM_KV_OP, {"norm": "olmo2", "whole": "qk", "dtype": torch.float16},
                 id="norm-rope-kv-olmo2"),
]


@pytest.mark.parametrize(("op", "changes"), OPCHECK)
def test_opcheck_cpu(op, changes):
    p = _small(changes)
    torch.library.opcheck(op, _opcheck_args(p, op))


@pytest.mark.parametrize(("op", "changes"), OPCHECK)
def test_inputs_requiring_grad_are_refused(op, changes):
    p = _small(changes)
    p.qkv.requires_grad_(True)
    q, k, v = (x.clone() for x in (p.q, p.k, p.v))
    p.q, p.k, p.v = q, k, v
    with pytest.raises(RuntimeError, match="no gradient"):
        op(*_opcheck_args(p, op))
    with torch.no_grad():
        op(*_opcheck_args(p, op))


def _bad(p: KVProblem, **changes):
    """KV-store op arguments with some replaced."""
    args = dict(q=p.q, k=p.k, v=p.v, k_buffer=p.k_buffer, v_buffer=p.v_buffer,
                cache_loc=p.cache_loc, cos_sin_cache=p.cos_sin_cache, positions=p.positions,
                rotary_dim=p.case.rotary_dim, is_neox=True, k_scale=None, v_scale=None)
    args.update(changes)
    return args


BAD_KV = {
    "v heads": (lambda p: _bad(p, v=p.v[:, :0]), "v must be"),
    "k_buffer head size": (lambda p: _bad(p, k_buffer=p.k_big[..., :32]), "k_buffer must be"),
    "k_buffer int dtype": (lambda p: _bad(p, k_buffer=p.k_buffer.to(torch.int32)),
                           "k_buffer must have a dtype"),
    "v_buffer slots": (lambda p: _bad(p, v_buffer=p.v_buffer[:2]), "same number of slots"),
    "cache_loc float": (lambda p: _bad(p, cache_loc=p.cache_loc.float()), "cache_loc must be"),
    "cache_loc length": (lambda p: _bad(p, cache_loc=p.cache_loc[:1]), "cache_loc must be"),
    "k_scale zero": (lambda p: _bad(p, k_scale=0.0), "k_scale must be"),
    "v_scale inf": (lambda p: _bad(p, v_scale=float("inf")), "v_scale must be"),
    "expanded k_buffer": (lambda p: _bad(p, k_buffer=p.k_buffer[:1].expand(5, -1, -1)),
                          "k_buffer must not be expanded"),
    "buffers overlap": (lambda p: _bad(p, v_buffer=p.k_buffer), "overlap"),
    "k_buffer is qkv": (lambda p: _bad(p, k_buffer=p.qkv[:, :64].view(3, 1, 64),
                                       v_buffer=p.v_buffer[:3]), "overlap"),
    "v overlaps k": (lambda p: _bad(p, v=p.k), "overlaps k"),
    "q/k head sizes": (lambda p: _bad(p, q=p.q[..., :32]), "same head size"),
    "buffer last stride": (lambda p: _bad(p, k_buffer=torch.zeros(5, 1, 128)[..., ::2]),
                           "last stride 1"),
}


@pytest.mark.parametrize("make", [pytest.param(m, id=n) for n, m in BAD_KV.items()])
def test_kv_store_bad_input(make):
    p = _small()
    fn, match = make
    with pytest.raises(ValueError, match=match):
        rope_compile.fused_qk_rope_kv_store_inplace(**fn(p))


def test_kv_store_bad_input_fake():
    """The fake implementation raises the same errors (torch.compile reports them at trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = _small()
    with FakeTensorMode() as mode:
        args = {n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                for n, x in _bad(p, k_scale=-1.0).items()}
        with pytest.raises(ValueError, match="k_scale must be"):
            KV_OP(**args)


def test_cache_loc_out_of_range_cpu():
    p = _small()
    before = p.k_big.clone()
    bad = p.cache_loc.clone()
    bad[0] = p.case.num_slots
    with pytest.raises(IndexError, match="cache_loc must lie in"):
        rope_compile.fused_qk_rope_kv_store_inplace(**_bad(p, cache_loc=bad))
    assert_same_bits(p.k_big, before, "k_buffer after a refused call")
    with pytest.raises(IndexError, match="cache_loc must lie in"):
        rope_compile.fused_qk_rope_kv_store_inplace(**_bad(p, cache_loc=bad - 6))


NORM_BAD = [
    ({"weight_offset": 0.5}, "weight_offset must be"),
    ({"eps": -1.0}, "eps must be"),
    ({"q_weight": "short"}, "q_weight must be"),
    ({"k_weight": "int"}, "k_weight must be floating"),
    ({"q_weight": "overlap"}, "q_weight overlaps"),
    # q [3, 2, 64], k [3, 1, 64]: weights [64] (per head) or [H*64] (whole projection) only
    ({"q_weight": "q_heads_plus_one"}, r"q_weight must be \[head_size=64\] \(a norm per "
                                       r"head\) or \[num_heads \* head_size=128\]"),
    ({"k_weight": "q_whole"}, r"k_weight must be \[head_size=64\] .* or \[num_heads \* "
                              r"head_size=64\] \(one norm over all of a token's heads\), got "
                              r"shape \(128,\)"),
    ({"q_weight": "heads_by_d"}, r"q_weight must be .* got shape \(2, 64\)"),
    ({"q_weight": "scalar"}, r"q_weight must be .* got shape \(\)"),
    # twice with 1 + w is no HF form (Gemma3 rounds once)
    ({"weight_offset": 1.0, "round_once": False},
     r"round_once=False .* is defined only with weight_offset=0.0"),
]


def _norm_kwargs(p: KVProblem, changes: dict) -> dict:
    args = dict(q=p.q, k=p.k, q_weight=p.q_weight, k_weight=p.k_weight, eps=1e-6,
                weight_offset=0.0, cos_sin_cache=p.cos_sin_cache, positions=p.positions,
                rotary_dim=32, is_neox=True)
    special = {"short": p.q_weight[:8], "int": p.k_weight.int(), "overlap": p.q[0, 0],
               "q_heads_plus_one": torch.ones(3 * 64), "q_whole": torch.ones(2 * 64),
               "heads_by_d": torch.ones(2, 64), "scalar": torch.tensor(1.0)}
    args.update({n: special.get(v, v) if isinstance(v, str) else v for n, v in changes.items()})
    return args


@pytest.mark.parametrize(("changes", "match"), NORM_BAD)
def test_norm_bad_input(changes, match):
    p = _small({"norm": "qwen", "store": False})
    with pytest.raises(ValueError, match=match):
        rope_compile.fused_qk_norm_rope_inplace(**_norm_kwargs(p, changes))


@pytest.mark.parametrize(("changes", "match"), NORM_BAD[2:])
def test_norm_bad_input_fake(changes, match):
    """The fake implementation refuses the same weights (torch.compile reports them at trace
    time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = _small({"norm": "qwen", "store": False})
    args = _norm_kwargs(p, changes)
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                for n, x in args.items()}
        with pytest.raises(ValueError, match=match):
            NORM_OP(**fake)


def test_norm_matches_transformers():
    """The CPU op's norm step equals HF's Qwen3RMSNorm / Gemma3RMSNorm (rotation by angle 0)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    del transformers
    g = torch.Generator().manual_seed(1)
    for cls, offset in ((Qwen3RMSNorm, 0.0), (Gemma3RMSNorm, 1.0)):
        hf_q, hf_k = cls(64, eps=1e-6), cls(64, eps=1e-6)
        with torch.no_grad():
            hf_q.weight.copy_(torch.randn(64, generator=g))
            hf_k.weight.copy_(torch.randn(64, generator=g))
        hf_q, hf_k = hf_q.to(torch.bfloat16), hf_k.to(torch.bfloat16)
        q = torch.randn(3, 2, 64, generator=g).to(torch.bfloat16)
        k = torch.randn(3, 1, 64, generator=g).to(torch.bfloat16)
        identity = torch.cat([torch.ones(1, 16), torch.zeros(1, 16)], -1)  # cos 1, sin 0
        with torch.no_grad():
            exp_q, exp_k = hf_q(q), hf_k(k)
        rope_compile.fused_qk_norm_rope_inplace(q, k, hf_q.weight.detach(),
                                                hf_k.weight.detach(), 1e-6, offset, identity,
                                                torch.zeros(3, dtype=torch.long), 32, True)
        assert_same_bits(q, exp_q, f"{cls.__name__} q")
        assert_same_bits(k, exp_k, f"{cls.__name__} k")


def _identity_rope(num_tokens: int, rotary_dim: int):
    """A cos_sin_cache row of cos 1, sin 0 and positions all 0: RoPE leaves x as it is."""
    half = rotary_dim // 2
    return (torch.cat([torch.ones(1, half), torch.zeros(1, half)], -1),
            torch.zeros(num_tokens, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("apply", ["op", pytest.param("triton", marks=NO_INTERPRETER)])
def test_whole_norm_matches_transformers_olmo2(apply, dtype):
    """The whole-projection norm (weights ``[H*D]``) with ``round_once=True`` equals HF's
    ``Olmo2RMSNorm(H * D)`` (``(weight * x_normed).to(dtype)``, the weight promoted to float32,
    one rounding) on the ``[T, H*D]`` projection, viewed as ``[T, H, D]`` after it (OLMo2's
    order), bit for bit in each dtype (rotation by angle 0; the model's weights in its dtype).
    In float32 the default (Qwen3) rounding is the same; in bf16/fp16 it is not."""
    pytest.importorskip("transformers")
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    g = torch.Generator().manual_seed(2)
    t, hq, hk, d = 5, 4, 2, 64
    hf_q, hf_k = Olmo2RMSNorm(hq * d, eps=1e-6), Olmo2RMSNorm(hk * d, eps=1e-6)
    with torch.no_grad():
        hf_q.weight.copy_(torch.randn(hq * d, generator=g))
        hf_k.weight.copy_(torch.randn(hk * d, generator=g))
    hf_q, hf_k = hf_q.to(dtype), hf_k.to(dtype)
    qkv = (torch.randn(t, (hq + 2 * hk) * d, generator=g) * 3).to(dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], -1)
    with torch.no_grad():
        exp_q, exp_k = hf_q(q), hf_k(k)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    q0, k0 = q.clone(), k.clone()
    weights = (hf_q.weight.detach(), hf_k.weight.detach())
    cache, positions = _identity_rope(t, 32)
    if apply == "op":
        rope_compile.fused_qk_norm_rope_inplace(q, k, *weights, 1e-6, 0.0, cache, positions, 32,
                                                True, round_once=True)
        assert_same_bits(q.reshape(t, -1), exp_q, "Olmo2RMSNorm q")
        assert_same_bits(k.reshape(t, -1), exp_k, "Olmo2RMSNorm k")
        # The default rounding (Qwen3: x_normed rounded before the weight) is another value in
        # bf16/fp16, the same in float32.
        rope_compile.fused_qk_norm_rope_inplace(q0, k0, *weights, 1e-6, 0.0, cache, positions,
                                                32, True)
        assert torch.equal(q0.reshape(t, -1), exp_q) == (dtype == torch.float32)
    else:  # the kernel sums squares in another order (and the interpreter rounds fp32 -> bf16
        # toward zero): within an ulp or two
        rope_kv_store.launch(q, k, cache, positions, 32, True,
                             norm=(*weights, 1e-6, 0.0, True),
                             block_h=2)  # two head blocks of q: the two-pass sum
        tol = ({"rtol": 3e-7, "atol": 1e-6} if dtype == torch.float32
               else {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-5})
        torch.testing.assert_close(q.reshape(t, -1), exp_q, **tol)
        torch.testing.assert_close(k.reshape(t, -1), exp_k, **tol)


@pytest.mark.parametrize("apply", APPLY_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_whole_norm_strided_heads(apply, dtype):
    """Whole-projection norms of q and k whose heads are not adjacent in memory: q heads padded
    ([T, H, D] of a [T, H, D + 8] storage), k a transposed view ([H, T, D] storage) and the
    weights strided views; the padding is NaN and must stay untouched and unread."""
    g = torch.Generator().manual_seed(4)
    t, hq, hk, d, rot = 5, 4, 2, 64, 48
    q_big = torch.full((t, hq, d + 8), float("nan"))
    q_big[..., :d] = torch.randn(t, hq, d, generator=g)
    q_big = q_big.to(dtype)
    k_store = torch.randn(hk, t, d, generator=g).to(dtype)
    w_big = (torch.randn(2, hq * d, generator=g) * 0.5 + 1).to(dtype)
    q, k = q_big[..., :d], k_store.transpose(0, 1)
    q_weight, k_weight = w_big[0], w_big[1, ::2][:hk * d]
    cache = torch.rand(40, rot, generator=g) * 2 - 1
    positions = torch.randint(0, 40, (t,), generator=g)
    exp = [rope_f64(norm_f64(x, w, 1e-6, False), positions, cache, rot, False)
           for x, w in ((q, q_weight), (k, k_weight))]
    pad_before = q_big[..., d:].clone()
    p = KVProblem(KVCase(num_tokens=t, num_q_heads=hq, num_kv_heads=hk, head_size=d,
                         rotary_dim=rot, is_neox=False, dtype=dtype, norm="qwen", whole="qk",
                         store=False), q, k, None, None, None, None, None, None, None, cache,
                  positions, q_weight, k_weight)
    apply(p)
    tol = TOLERANCES[dtype]
    tol = {"rtol": 2 * tol["rtol"], "atol": 4 * tol["rtol"]}
    torch.testing.assert_close(q.double(), exp[0], **tol)
    torch.testing.assert_close(k.double(), exp[1], **tol)
    assert_same_bits(q_big[..., d:], pad_before, "q head padding")


@pytest.mark.parametrize("block_h", [1, 2, 4])
@NO_INTERPRETER
def test_whole_norm_head_blocks(block_h):
    """The kernel's two passes over several head blocks (the sum of squares of every block,
    then each block normalised): any BLOCK_H gives the op's values (fp32: within an ulp or
    two, the sum added in another order), the last block partly masked for 3 heads."""
    case = KVCase(num_tokens=5, num_q_heads=6, num_kv_heads=3, head_size=64, rotary_dim=48,
                  dtype=torch.float32, norm="gemma", whole="qk", cache_dtype=torch.float32)
    p, ref = build(case), build(case)
    _apply_op(ref)
    rope_kv_store.launch(p.q, p.k, p.cos_sin_cache, p.positions, 48, True, norm=p.norm,
                         kv=p.kv, block_h=block_h)
    torch.testing.assert_close(p.qkv, ref.qkv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.k_big, ref.k_big, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert_same_bits(p.v_big, ref.v_big, "v rows")


def test_whole_norm_plan_is_one_program_per_token():
    """A whole-projection norm (of q or of k) puts every head of the token in one program:
    head_splits 1 even when asked for more; per-head norms keep the heuristics' splits."""
    for whole, flags in (("qk", (True, True)), ("q", (True, False)), ("k", (False, True))):
        p = build(KVCase(num_tokens=3, num_q_heads=8, num_kv_heads=4, norm="qwen", whole=whole,
                         store=False))
        plan = rope_kv_store.plan_tensor_launch(
            p.q, p.k, rope_kv_store.FromCache(p.cos_sin_cache, p.positions), 128, True,
            norm=p.norm, head_splits=4, block_h=2)
        assert plan.grid == (3, 1)
        assert (plan.constexprs["Q_WHOLE"], plan.constexprs["K_WHOLE"]) == flags
        assert (plan.constexprs["Q_ITERS"], plan.constexprs["K_ITERS"]) == (4, 2)
    per_head = build(KVCase(num_tokens=3, num_q_heads=8, num_kv_heads=4, norm="qwen",
                            store=False))
    plan = rope_kv_store.plan_tensor_launch(
        per_head.q, per_head.k, rope_kv_store.FromCache(per_head.cos_sin_cache,
                                                        per_head.positions), 128, True,
        norm=per_head.norm)
    assert plan.grid[1] > 1 and not plan.constexprs["Q_WHOLE"] | plan.constexprs["K_WHOLE"]
    # Few tokens: a whole-projection norm takes all of a token's heads (up to the whole tile)
    # in one block; many tokens: the usual tile.
    for tokens, block in ((3, 32), (300, 16)):
        p = build(KVCase(num_tokens=tokens, num_q_heads=32, num_kv_heads=8, norm="qwen",
                         whole="q", num_slots=320))
        plan = rope_kv_store.plan_tensor_launch(
            p.q, p.k, rope_kv_store.FromCache(p.cos_sin_cache, p.positions), 128, True,
            norm=p.norm, kv=p.kv)
        assert plan.constexprs["BLOCK_H"] == block and plan.grid == (tokens, 1)


# ---------------------------------------------------------------------------------------------
# drop-ins and the module


def _kv_arg(p: KVProblem, scales=(None, None), flat=False):
    c = p.case
    kb, vb, v = p.k_buffer, p.v_buffer, p.v
    if flat:  # sglang's 2-D spellings
        v = p.v.reshape(c.num_tokens, -1)
    return rope_compile.FusedSetKVBufferArg(value=v, k_buffer=kb, v_buffer=vb,
                                            k_scale=scales[0], v_scale=scales[1],
                                            cache_loc=p.cache_loc)


@pytest.mark.parametrize("flat", [False, True], ids=["3d", "2d-value"])
def test_sglang_apply_rope_with_kv_store(flat):
    case = KVCase(num_tokens=4, num_q_heads=2, num_kv_heads=1, head_size=64, rotary_dim=64,
                  dtype=torch.float32, cache_dtype=torch.bfloat16, scales=(0.5, 2.0))
    p, ref = build(case), build(case)
    rope_compile.apply_rope_with_cos_sin_cache_inplace(
        p.positions, p.q.reshape(4, -1), p.k.reshape(4, -1), 64, p.cos_sin_cache, True,
        _kv_arg(p, (0.5, 2.0), flat))
    _apply_op(ref)
    for name in ("qkv", "k_big", "v_big"):
        assert_same_bits(getattr(p, name), getattr(ref, name), name)
    # Without the argument: RoPE only.
    p2, ref2 = build(case), build(case)
    rope_compile.apply_rope_with_cos_sin_cache_inplace(p2.positions, p2.q, p2.k, 64,
                                                       p2.cos_sin_cache, True)
    rope_compile.rotary_embedding(ref2.positions, ref2.q, ref2.k, 64, ref2.cos_sin_cache, True)
    assert_same_bits(p2.qkv, ref2.qkv, "qkv")
    assert_same_bits(p2.k_big, ref2.k_big, "k_buffer untouched")


@pytest.mark.parametrize("gemma", [False, True], ids=["qwen", "gemma"])
def test_vllm_fused_qk_norm_rope(gemma):
    case = KVCase(num_tokens=3, num_q_heads=4, num_kv_heads=2, head_size=64, rotary_dim=64,
                  norm="gemma" if gemma else "qwen", store=False, is_neox=False)
    p, ref = build(case), build(case)
    rope_compile.fused_qk_norm_rope(p.qkv, 4, 2, 2, 64, 1e-6, p.q_weight, p.k_weight,
                                    p.cos_sin_cache, False, p.positions,
                                    weight_offset=1.0 if gemma else 0.0)
    _apply_op(ref)
    assert_same_bits(p.qkv, ref.qkv, "qkv")
    with pytest.raises(ValueError, match="qkv must be"):
        rope_compile.fused_qk_norm_rope(p.qkv, 4, 2, 1, 64, 1e-6, p.q_weight, p.k_weight,
                                        p.cos_sin_cache, False, p.positions)


def _module_run(method, device, dtype, cache_dtype, scales, rotary_dim, head_size, seed=0):
    m = rope_compile.RotaryEmbedding(head_size, rotary_dim, 64, 10000.0, True, dtype).to(device)
    case = KVCase(num_tokens=5, num_q_heads=4, num_kv_heads=2, head_size=head_size,
                  rotary_dim=rotary_dim, dtype=dtype, cache_dtype=cache_dtype, scales=scales)
    p = build(case, device, seed)
    positions = p.positions % 64
    query, key = p.q.reshape(5, -1), p.k.reshape(5, -1)
    out_q, out_k = getattr(m, method)(positions, query, key, None, _kv_arg(p, scales or
                                                                           (None, None)))
    return p, out_q, out_k


@pytest.mark.parametrize("method", ["forward_xpu", "forward_cuda", "forward",
                                    pytest.param("triton", marks=NO_INTERPRETER)])
@pytest.mark.parametrize(("dtype", "cache_dtype", "scales"), [
    (torch.float32, torch.float32, None),
    (torch.float32, torch.bfloat16, (0.5, 2.0)),
    (torch.float32, FP8, (0.25, 0.5)),
], ids=["fp32", "bf16-cache-scaled", "fp8-cache-scaled"])
def test_module_fused_set_kv_buffer_arg(method, dtype, cache_dtype, scales, monkeypatch):
    """forward_xpu / forward_cuda take the fused path and agree with forward_native (the
    "triton" variant drives the module's fused call through the Triton kernel)."""
    if cache_dtype is None:
        pytest.skip("torch has no float8_e4m3fn")
    if method == "triton":
        from rope_compile import module

        def through_triton(q, k, v, kb, vb, loc, cache, pos, rot, neox, ks, vs):
            rope_kv_store.launch(q, k, cache, pos, rot, neox, kv=(v, kb, vb, loc, ks, vs))

        monkeypatch.setattr(module, "fused_qk_rope_kv_store_inplace", through_triton)
    fused, out_q, out_k = _module_run("forward_xpu" if method == "triton" else method, "cpu",
                                      dtype, cache_dtype, scales, 96, 128)
    if method != "forward":  # forward on a CPU tensor is forward_native
        assert out_q.data_ptr() == fused.q.data_ptr()  # in place
    native, nat_q, nat_k = _module_run("forward_native", "cpu", dtype, cache_dtype, scales, 96,
                                       128)
    torch.testing.assert_close(out_q, nat_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k, nat_k, rtol=1e-5, atol=1e-5)
    loc = fused.cache_loc.long()
    for name in ("k_big", "v_big"):
        a, b = getattr(fused, name), getattr(native, name)
        written = torch.zeros(a.shape, dtype=torch.bool)
        written[loc] = True
        assert_same_bits(a[~written], b[~written], f"{name} outside the rows")
        # fp32 math of the fused op vs native torch: a rounding apart at most, one cache ulp.
        torch.testing.assert_close(a[loc].float(), b[loc].float(), equal_nan=True,
                                   rtol=0.13 if cache_dtype is FP8 else 1e-2, atol=1e-3)
    # v: the same division and one cast in both (bit-equal; the interpreter's bf16 cast
    # rounds toward zero: one ulp).
    if method == "triton" and cache_dtype == torch.bfloat16:
        assert _close_bf16_ulp(fused.v_buffer[loc], native.v_buffer[loc])
    else:
        assert_same_bits(fused.v_big, native.v_big, "v_buffer")


def test_module_bad_kv_arg():
    m = rope_compile.RotaryEmbedding(128, 128, 64, 10000.0, True, torch.float32)
    p = build(KVCase(dtype=torch.float32))
    with pytest.raises(TypeError, match="FusedSetKVBufferArg"):
        m.forward_xpu(p.positions, p.q.reshape(5, -1), p.k.reshape(5, -1), None, object())


# ---------------------------------------------------------------------------------------------
# GPU (cuda / xpu): the compiled Triton kernel


GPU_CASES = [pytest.param(c, id=c.id) for c in kv_cases()] + [
    pytest.param(c, id=c.id) for c in (
        KVCase(num_tokens=4097, num_q_heads=32, num_kv_heads=8, head_size=128, rotary_dim=128,
               dtype=torch.bfloat16, cache_dtype=FP8 or torch.bfloat16, scales=(0.5, 0.5),
               num_slots=5000, pos_dtype=torch.int32, loc_dtype=torch.int32),
        KVCase(num_tokens=1, num_q_heads=32, num_kv_heads=8, head_size=128, rotary_dim=64,
               dtype=torch.bfloat16, norm="qwen", is_neox=False, num_slots=64),
        KVCase(num_tokens=33, num_q_heads=8, num_kv_heads=1, head_size=256, rotary_dim=256,
               dtype=torch.float16, norm="gemma", cache_dtype=torch.float16, num_slots=64),
        # OLMo2-7B's prologue: whole-projection norms of 32 q and 32 k heads, many head blocks
        # (the Qwen3 rounding and OLMo2's own)
        KVCase(num_tokens=37, num_q_heads=32, num_kv_heads=32, head_size=128, rotary_dim=128,
               dtype=torch.bfloat16, norm="qwen", whole="qk", num_slots=64),
        KVCase(num_tokens=37, num_q_heads=32, num_kv_heads=32, head_size=128, rotary_dim=128,
               dtype=torch.bfloat16, norm="olmo2", whole="qk", num_slots=64),
        KVCase(num_tokens=300, num_q_heads=16, num_kv_heads=4, head_size=128, rotary_dim=64,
               dtype=torch.float32, norm="gemma", whole="k", is_neox=False,
               cache_dtype=torch.bfloat16, num_slots=512),
    )]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_kv_ops_gpu(gpu_device, case):
    run_and_check(case, _apply_op, gpu_device)


@pytest.mark.gpu
@pytest.mark.parametrize(("op", "changes"), OPCHECK)
def test_opcheck_gpu(gpu_device, op, changes):
    p = _small(changes, gpu_device)
    torch.library.opcheck(op, _opcheck_args(p, op))


@pytest.mark.gpu
@pytest.mark.skipif(FP8 is None, reason="torch has no float8_e4m3fn")
def test_fp8_store_gpu(gpu_device):
    case = KVCase(num_tokens=3, num_q_heads=1, num_kv_heads=1, head_size=64, rotary_dim=64,
                  dtype=torch.float32, cache_dtype=FP8, scales=(1.0, 0.25))
    p = build(case, gpu_device)
    values = torch.cat([torch.tensor([2.0**-10, 3 * 2.0**-10, 464.0, 470.0, 480.0, 1e6,
                                      float("inf"), float("nan"), -500.0]),
                        torch.randn(3 * 64 - 9) * 100])
    p.v.copy_(values.view(3, 1, 64))
    v = p.v.cpu().clone()
    _apply_op(p)
    assert_same_bits(p.v_buffer[p.cache_loc.long()].cpu(), to_kv_cache(v, 0.25, FP8), "fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["forward_cuda", "forward"])
def test_module_fused_set_kv_buffer_arg_gpu(gpu_device, method):
    fused, out_q, out_k = _module_run(method, gpu_device, torch.float32, torch.bfloat16,
                                      (0.5, 2.0), 128, 128)
    native, nat_q, nat_k = _module_run("forward_native", gpu_device, torch.float32,
                                       torch.bfloat16, (0.5, 2.0), 128, 128)
    torch.testing.assert_close(out_q, nat_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k, nat_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.k_big.float(), native.k_big.float(), equal_nan=True,
                               rtol=1e-2, atol=1e-3)


def test_pair_indices_cover_rotary_dim():
    """The oracle's pairs (conftest) cover each rotated column once (sanity of the helper)."""
    first, second = pair_indices(48, False)
    assert sorted(first + second) == list(range(48))


def test_norm_plan_takes_half_the_warps_of_a_large_tile():
    """The measured launch choice (benchmarks/results/sweep_prologue_h200.md): at many tokens a
    bf16 tile of 16 heads x 128 runs with 8 warps when only rotated, with 4 when normalised
    first (two vectors per lane); the plan is otherwise the same."""
    q = torch.empty(4096, 32, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(4096, 8, 128, dtype=torch.bfloat16, device="meta")
    cache = torch.empty(8192, 128, dtype=torch.bfloat16, device="meta")
    positions = torch.empty(4096, dtype=torch.int64, device="meta")
    weight = torch.empty(128, dtype=torch.bfloat16, device="meta")
    rope = rope_kv_store.FromCache(cache, positions)
    plans = {norm is not None: rope_kv_store.plan_tensor_launch(q, k, rope, 128, True, norm=norm)
             for norm in (None, (weight, weight, 1e-6, 0.0))}
    assert {n: p.options["num_warps"] for n, p in plans.items()} == {False: 8, True: 4}
    assert {n: (p.constexprs["BLOCK_H"], p.grid[1]) for n, p in plans.items()} == {
        False: (16, 1), True: (16, 1)}
