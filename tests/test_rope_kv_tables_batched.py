"""The KV/norm kernel with a model's own cos/sin tables and with batched KV buffers (issue 13).

* The three tables ops (``fused_qk_rope_kv_store_tables_inplace``,
  ``fused_qk_norm_rope_tables_inplace``, ``fused_qk_norm_rope_kv_store_tables_inplace``): token t
  rotated by row ``t % R`` of cos/sin ``[R, rotary_dim/2]`` views (HF halves, freqs_cis pair
  picks with column stride 2, an expanded row of another dtype), R < T.
* 4-D buffers ``[Bc, S, Hk, D]`` in all six KV-store ops: token t writes batch ``t // R_loc``,
  row ``cache_loc[t % R_loc]``; HF's StaticCache key cache ``[B, Hk, L, D]`` passed as
  ``.permute(0, 2, 1, 3)`` with ``cache_loc = cache_position`` is exactly
  ``keys.index_copy_(2, cache_position, k)``.

Every buffer is a view of a NaN-poisoned storage: the written rows must hold torch's cast of the
op's own k (and of v), every other element bit-identical to before. q and k are checked
against a float64 oracle. ``gpu``-marked tests run the same on CUDA / XPU, and check that under
``torch.compile`` the ops lower to the Triton kernel launched from the generated code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from conftest import GPU_DEVICE, TOLERANCES, rope_f64
from test_rope_kv_ops import FP8, assert_same_bits, norm_f64

import rope_compile
from rope_compile.kernels import rope_kv_store
from rope_compile.reference import to_kv_cache
from rope_compile.validation import (
    validate_kv_store,
    validate_kv_store_tables,
    validate_norm_rope,
    validate_norm_rope_tables,
)

RC = torch.ops.rope_compile
KV_OP = RC.fused_qk_rope_kv_store_inplace.default
NORM_OP = RC.fused_qk_norm_rope_inplace.default
NORM_KV_OP = RC.fused_qk_norm_rope_kv_store_inplace.default
KV_TABLES_OP = RC.fused_qk_rope_kv_store_tables_inplace.default
NORM_TABLES_OP = RC.fused_qk_norm_rope_tables_inplace.default
NORM_KV_TABLES_OP = RC.fused_qk_norm_rope_kv_store_tables_inplace.default


@dataclass(frozen=True)
class Case:
    batch: int = 2  # B; T = B * seq tokens in (batch, seq) order
    seq: int = 3
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 64
    rotary_dim: int = 64
    is_neox: bool = True
    dtype: torch.dtype = torch.float32
    cache_dtype: torch.dtype | None = None  # None: dtype
    scales: tuple[float, float] | None = None
    norm: str | None = None  # None, "qwen", "gemma" or "olmo2" (round_once=True)
    whole: str = ""  # norms over the whole projection (weights [H*D]): "", "q", "k" or "qk"
    store: bool = True
    # cos/sin: "cache" (cos_sin_cache + positions), or tables: "half" (HF emb.cos()[..., :n]),
    # "pair" (freqs_cis[..., 0] / [..., 1]), "expanded" (one row expanded, float64 tables)
    source: str = "half"
    table_rows: int | None = None  # R; None: seq
    # "3d" [slots, Hk, D] (cache_loc [T]), "4d" [Bc, slots, Hk, D] (head-padded), "hf"
    # [Bc, Hk, L, D].permute(0, 2, 1, 3); 4-D ones take cache_loc [seq]
    buffer: str = "4d"
    cache_batch: int | None = None  # Bc; None: batch
    num_slots: int = 8

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}S{self.seq}", self.source, self.buffer if self.store else "",
                 "neox" if self.is_neox else "gptj", f"r{self.rotary_dim}", str(self.dtype)[6:]]
        if self.store:
            parts.append(f"cache-{str(self.cache_dtype or self.dtype)[6:]}")
        parts += [self.norm or "", f"whole{self.whole}" if self.whole else "",
                  "scaled" if self.scales else "",
                  f"R{self.table_rows}" if self.table_rows else "",
                  f"Bc{self.cache_batch}" if self.cache_batch else ""]
        return "-".join(p for p in parts if p)

    @property
    def tables(self) -> bool:
        return self.source != "cache"


@dataclass
class Problem:
    case: Case
    qkv: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_big: torch.Tensor  # the poisoned storages the buffers are views of
    v_big: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    cache_loc: torch.Tensor
    rope: tuple  # (cos, sin) or (cos_sin_cache, positions)
    per_token: torch.Tensor  # [T, rot] float64 cat(cos, sin) of each token (the oracle's)
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None

    @property
    def norm(self):
        if self.case.norm is None:
            return None
        return (self.q_weight, self.k_weight, 1e-6, 1.0 if self.case.norm == "gemma" else 0.0)

    @property
    def round_once(self):
        """The norm ops' last argument: True for OLMo2's rounding, else the default."""
        return True if self.case.norm == "olmo2" else None

    @property
    def kv(self):
        if not self.case.store:
            return None
        return (self.v, self.k_buffer, self.v_buffer, self.cache_loc,
                *(self.case.scales or (None, None)))


def build(case: Case, device="cpu", seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    t, hq, hk, d, rot = (case.batch * case.seq, case.num_q_heads, case.num_kv_heads,
                         case.head_size, case.rotary_dim)
    half = rot // 2
    widths = [hq * d, hk * d, hk * d]
    qkv = torch.randn(t, sum(widths), generator=g).to(case.dtype)
    rows = case.table_rows or case.seq
    if case.source == "cache":
        cache = torch.rand(40, rot, generator=g) * 2 - 1
        positions = torch.randint(0, 40, (t,), generator=g)
        rope = (cache, positions)
        per_token = cache.double()[positions]
    else:
        if case.source == "half":  # HF: emb = cat(freqs, freqs); cos/sin halves of [R, rot]
            emb = torch.rand(rows, rot, generator=g) * 6
            cos, sin = emb.cos()[..., :half], emb.sin()[..., :half]
        elif case.source == "pair":  # gpt-fast: freqs_cis [R, rot/2, 2] (not unit: any values)
            fc = torch.randn(rows, half, 2, generator=g)
            cos, sin = fc[..., 0], fc[..., 1]
        else:  # one row for every token, float64 tables for a lower-precision q
            cos = torch.randn(1, half, generator=g).double().expand(rows, half)
            sin = torch.randn(1, half, generator=g).double().expand(rows, half)
        rope = (cos, sin)
        token_rows = torch.arange(t) % rows
        per_token = torch.cat([cos.double()[token_rows], sin.double()[token_rows]], -1)
    cache_dtype = case.cache_dtype or case.dtype
    bc = case.cache_batch or case.batch
    if case.buffer == "3d":
        shape, loc = (case.num_slots, hk, d + 8), torch.randperm(case.num_slots, generator=g)[:t]
    elif case.buffer == "4d":
        shape = (bc, case.num_slots, hk, d + 8)
        loc = torch.randperm(case.num_slots, generator=g)[:case.seq]
    else:  # HF StaticCache: [Bc, Hk, L, D], cache_position = a run of slots
        shape = (bc, hk, case.num_slots, d)
        loc = torch.arange(case.seq) + (case.num_slots - case.seq) // 2
    big = [torch.full(shape, float("nan")).to(cache_dtype) for _ in range(2)]
    weights = [None, None]
    if case.norm:
        weights = [(torch.randn(h * d if name in case.whole else d, generator=g) * 0.5
                    + (0.0 if case.norm == "gemma" else 1.0)).to(case.dtype)
                   for name, h in (("q", hq), ("k", hk))]
    to = (lambda x: None if x is None else x.to(device))  # noqa: E731
    qkv = to(qkv)
    q, k, v = (x.view(t, w // d, d) for x, w in zip(qkv.split(widths, -1), widths,
                                                   strict=True))
    big = [to(b) for b in big]
    bufs = [b.permute(0, 2, 1, 3) if case.buffer == "hf" else b[..., :d] for b in big]
    return Problem(case, qkv, q, k, v, *big, *bufs, to(loc), tuple(to(x) for x in rope),
                   per_token, *(to(w) for w in weights))


def call_args(p: Problem):
    """(op, arguments) of the op for ``p``."""
    c = p.case
    kv = (p.v, p.k_buffer, p.v_buffer, p.cache_loc)
    rope = (*p.rope, c.rotary_dim, c.is_neox)
    scales = c.scales or (None, None)
    if c.norm is None:
        return (KV_TABLES_OP if c.tables else KV_OP), (p.q, p.k, *kv, *rope, *scales)
    if not c.store:
        return (NORM_TABLES_OP if c.tables else NORM_OP), (p.q, p.k, *p.norm, *rope,
                                                           p.round_once)
    return (NORM_KV_TABLES_OP if c.tables else NORM_KV_OP), (p.q, p.k, *kv, *p.norm, *rope,
                                                             *scales, p.round_once)


def apply_op(p: Problem) -> None:
    op, args = call_args(p)
    op(*args)


def apply_triton(p: Problem) -> None:
    """The Triton kernel (the interpreter on CPU tensors), after the op's checks."""
    c, kv, norm = p.case, p.kv, p.norm
    launch_norm = None if norm is None else (*norm, p.round_once)
    if c.tables:
        if norm is None:
            validate_kv_store_tables(p.q, p.k, *kv[:4], *p.rope, c.rotary_dim, *kv[4:])
        else:
            validate_norm_rope_tables(p.q, p.k, *norm, *p.rope, c.rotary_dim, kv,
                                      p.round_once)
        rope_kv_store.launch_tables(p.q, p.k, *p.rope, c.rotary_dim, c.is_neox,
                                    norm=launch_norm, kv=kv)
        return
    if norm is None:
        validate_kv_store(p.q, p.k, *kv[:4], *p.rope, c.rotary_dim, *kv[4:])
    else:
        validate_norm_rope(p.q, p.k, *norm, *p.rope, c.rotary_dim, kv, p.round_once)
    rope_kv_store.launch(p.q, p.k, *p.rope, c.rotary_dim, c.is_neox, norm=launch_norm, kv=kv)


NO_INTERPRETER = pytest.mark.skipif(GPU_DEVICE is not None,
                                    reason="Triton interpreter off (a GPU is present)")
APPLIES = [pytest.param(apply_op, id="op"),
           pytest.param(apply_triton, id="triton", marks=NO_INTERPRETER)]


def expected_qk(p: Problem):
    c, out = p.case, []
    arange = torch.arange(p.q.shape[0])
    for x, w in ((p.q, p.q_weight), (p.k, p.k_weight)):
        if c.norm:
            x = norm_f64(x, w, 1e-6, c.norm == "gemma", c.norm == "olmo2")
        out.append(rope_f64(x, arange, p.per_token, c.rotary_dim, c.is_neox))
    return out


def expected_buffer(before: torch.Tensor, case: Case, cache_loc, values) -> torch.Tensor:
    """``before`` (a clone of the buffer view's storage, as that view) with token t's
    ``values[t]`` in batch t // R_loc, row cache_loc[t % R_loc] (written out token by token)."""
    out = before.clone()
    view = out.unsqueeze(0) if out.dim() == 3 else out
    loc = cache_loc.tolist()
    for t in range(values.shape[0]):
        view[t // len(loc), loc[t % len(loc)]] = values[t]
    return out


def _view_of(big: torch.Tensor, case: Case, d: int) -> torch.Tensor:
    return big.permute(0, 2, 1, 3) if case.buffer == "hf" else big[..., :d]


def run_and_check(case: Case, apply, device="cpu", seed=0) -> Problem:
    p = build(case, device, seed)
    exp_q, exp_k = expected_qk(p)
    qkv_before, k_before, v_before = p.qkv.clone(), p.k_big.clone(), p.v_big.clone()
    reads = [x.clone() for x in (*p.rope, p.cache_loc)]
    v = p.v.clone()
    assert apply(p) is None
    tol = dict(TOLERANCES[case.dtype])
    if case.norm:  # a normalised value one ulp off moves the rotation by about one ulp
        tol = {"rtol": 2 * tol["rtol"], "atol": 4 * tol["rtol"]}
    torch.testing.assert_close(p.q.cpu().double(), exp_q, **tol)
    torch.testing.assert_close(p.k.cpu().double(), exp_k, **tol)
    # Only q and k (their rotated part, or whole heads with the norm) change in qkv.
    keep = torch.ones(p.qkv.shape, dtype=torch.bool)
    heads = keep[:, :(case.num_q_heads + case.num_kv_heads) * case.head_size].view(
        p.qkv.shape[0], case.num_q_heads + case.num_kv_heads, case.head_size)
    heads[..., :case.head_size if case.norm else case.rotary_dim] = False
    assert_same_bits(p.qkv.cpu()[keep], qkv_before.cpu()[keep], "qkv outside q/k")
    for x, before in zip((*p.rope, p.cache_loc), reads, strict=True):
        assert_same_bits(x, before, "read-only input")
    d = case.head_size
    scales = case.scales or (None, None)
    for big, before, x, scale, name in ((p.k_big, k_before, p.k, scales[0], "k_buffer"),
                                        (p.v_big, v_before, v, scales[1], "v_buffer")):
        if not case.store:
            assert_same_bits(big, before, name)
            continue
        dtype = big.dtype
        values = to_kv_cache(x.cpu(), scale, dtype)  # torch's cast of the op's own k / v
        expected = expected_buffer(_view_of(before.cpu(), case, d), case, p.cache_loc.cpu(),
                                   values)
        # The whole storage: the written rows and every poisoned element around them.
        expected_big = before.cpu().clone()
        _view_of(expected_big, case, d).copy_(expected)
        assert_same_bits(big.cpu(), expected_big, f"{name} storage")
    return p


CASES = [
    Case(),
    Case(source="pair", buffer="hf", norm="qwen", is_neox=False, rotary_dim=32,
         dtype=torch.float16, scales=(0.5, 2.0)),
    Case(source="expanded", buffer="3d", norm="gemma", dtype=torch.bfloat16, table_rows=2),
    Case(source="half", store=False, norm="qwen", table_rows=1, batch=3, seq=2,
         dtype=torch.float16),
    Case(source="half", store=False, norm="gemma", is_neox=False, rotary_dim=48),
    Case(source="cache", buffer="4d", cache_batch=3, cache_dtype=FP8 or torch.float16,
         scales=(0.25, 0.5)),
    Case(source="cache", buffer="hf", norm="gemma", dtype=torch.float16,
         cache_dtype=torch.float32),
    Case(source="cache", buffer="3d", norm="qwen", scales=(2.0, 0.5)),
    # HF decode: one new token per sequence (cache_position [1]: token t is batch t), a table
    # row per token of the batch broadcast (R = 1)
    Case(source="half", buffer="hf", batch=4, seq=1, table_rows=1, norm="qwen",
         num_slots=5, cache_batch=5),
    Case(source="pair", buffer="4d", batch=3, seq=2, table_rows=1, cache_dtype=FP8 or
         torch.float32, scales=(1.5, 0.75)),
    Case(batch=0),  # no tokens
    # OLMo2: q and k normalised over the whole projection (weights [H*D]), HF tables and cache
    Case(source="half", buffer="hf", norm="qwen", whole="qk", num_q_heads=6, num_kv_heads=2,
         dtype=torch.float16, cache_dtype=torch.float32),
    Case(source="pair", store=False, norm="gemma", whole="q", batch=1, seq=5, table_rows=5,
         is_neox=False, rotary_dim=48),
    Case(source="cache", buffer="4d", norm="qwen", whole="k", num_q_heads=2, num_kv_heads=4,
         cache_batch=3, scales=(0.5, 2.0)),
    Case(source="half", buffer="hf", batch=4, seq=1, table_rows=1, norm="qwen", whole="qk",
         num_slots=5, cache_batch=5),  # HF decode
    Case(batch=0, norm="qwen", whole="qk"),
    # OLMo2's own rounding (round_once=True: once, after the weight) in bf16/fp16
    Case(source="half", buffer="hf", norm="olmo2", whole="qk", num_q_heads=6, num_kv_heads=2,
         dtype=torch.float16, cache_dtype=torch.float32),
    Case(source="half", store=False, norm="olmo2", whole="qk", batch=4, seq=1, table_rows=1,
         dtype=torch.bfloat16),
    Case(source="cache", buffer="4d", norm="olmo2", whole="k", num_q_heads=2, num_kv_heads=4,
         dtype=torch.bfloat16, cache_dtype=torch.float32, is_neox=False, rotary_dim=48),
    Case(source="pair", buffer="3d", norm="olmo2", dtype=torch.float16, scales=(0.5, 2.0)),
]
# bf16 caches only through the op (Triton's interpreter rounds fp32 -> bf16 toward zero).
CASES += [Case(source="half", buffer="hf", cache_dtype=torch.bfloat16, norm="gemma"),
          Case(source="cache", buffer="4d", dtype=torch.bfloat16, scales=(0.5, 0.5))]
PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _interpreter_bf16(case: Case) -> bool:
    """A bf16 conversion under the interpreter (one ulp toward zero): checked via the op."""
    conv = case.store and ((case.cache_dtype or case.dtype) == torch.bfloat16)
    return conv and (case.scales is not None or case.dtype != torch.bfloat16)


@pytest.mark.parametrize("apply", APPLIES)
@pytest.mark.parametrize("case", PARAMS)
def test_cpu(case, apply):
    if apply is apply_triton and _interpreter_bf16(case):
        pytest.skip("bf16 cast under Triton's interpreter rounds toward zero")
    run_and_check(case, apply)


def test_hf_static_cache_update_is_index_copy():
    """The 4-D store is HF ``StaticCache.update`` (``keys.index_copy_(2, cache_position, k)``
    with k ``[B, Hk, S, D]``) bit for bit, with HF's own tables and cache layout."""
    case = Case(source="half", buffer="hf", batch=2, seq=3, norm="qwen", num_slots=7)
    p = build(case)
    k_cache, v_cache = p.k_big.clone(), p.v_big.clone()
    v = p.v.clone()
    apply_op(p)
    b, s, hk, d = case.batch, case.seq, case.num_kv_heads, case.head_size
    k_cache.index_copy_(2, p.cache_loc, p.k.reshape(b, s, hk, d).transpose(1, 2))
    v_cache[:, :, p.cache_loc] = v.reshape(b, s, hk, d).transpose(1, 2)
    assert_same_bits(p.k_big, k_cache, "k cache")
    assert_same_bits(p.v_big, v_cache, "v cache")


def test_runtime_args_follow_the_layouts():
    """3-D buffers: batch stride 0 and R_loc = T; 4-D: their batch strides, R_loc = len(loc);
    tables: the views' own strides and R; cache: pos_ptr is positions, R unused."""
    p = build(Case(source="pair", buffer="hf", table_rows=1))
    args = rope_kv_store.plan_tensor_launch(p.q, p.k, rope_kv_store.FromTables(*p.rope), 64,
                                            True, kv=p.kv).args
    kb = p.k_buffer
    assert (args["k_buf_batch_stride"], args["k_buf_row_stride"],
            args["k_buf_head_stride"]) == kb.stride()[:3]
    assert args["loc_rows"] == 3 and args["num_rows"] == 1
    assert (args["cos_row_stride"], args["cos_col_stride"]) == p.rope[0].stride()
    p3 = build(Case(source="cache", buffer="3d"))
    args = rope_kv_store.plan_tensor_launch(p3.q, p3.k, rope_kv_store.FromCache(*p3.rope), 64,
                                            True, kv=p3.kv).args
    assert args["k_buf_batch_stride"] == 0 and args["loc_rows"] == p3.q.shape[0]
    assert args["pos_ptr"] is p3.rope[1] and args["sin_ptr"] is p3.rope[0]


# ---------------------------------------------------------------------------------------------
# schemas, opcheck, grad refusal


def test_schemas():
    assert str(KV_TABLES_OP._schema) == (
        "rope_compile::fused_qk_rope_kv_store_tables_inplace(Tensor(a0!) q, Tensor(a1!) k, "
        "Tensor v, Tensor(a2!) k_buffer, Tensor(a3!) v_buffer, Tensor cache_loc, Tensor cos, "
        "Tensor sin, int rotary_dim, bool is_neox, float? k_scale=None, float? v_scale=None, "
        "bool wrap_negative_cache_loc=True) -> ()")
    assert str(NORM_TABLES_OP._schema) == (
        "rope_compile::fused_qk_norm_rope_tables_inplace(Tensor(a0!) q, Tensor(a1!) k, "
        "Tensor q_weight, Tensor k_weight, float eps, float weight_offset, Tensor cos, "
        "Tensor sin, int rotary_dim, bool is_neox, bool? round_once=None) -> ()")
    assert str(NORM_KV_TABLES_OP._schema) == (
        "rope_compile::fused_qk_norm_rope_kv_store_tables_inplace(Tensor(a0!) q, "
        "Tensor(a1!) k, Tensor v, Tensor(a2!) k_buffer, Tensor(a3!) v_buffer, "
        "Tensor cache_loc, Tensor q_weight, Tensor k_weight, float eps, float weight_offset, "
        "Tensor cos, Tensor sin, int rotary_dim, bool is_neox, float? k_scale=None, "
        "float? v_scale=None, bool? round_once=None, bool wrap_negative_cache_loc=True) -> ()")
    for op in (KV_TABLES_OP, NORM_TABLES_OP, NORM_KV_TABLES_OP):
        for key in ("CPU", "CUDA", "XPU", "Meta", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op._schema.name, key), key
    assert KV_TABLES_OP._schema.name == rope_compile.KV_STORE_TABLES_OP_NAME


OPCHECK = [
    Case(source="half", buffer="hf", scales=(0.5, 2.0)),
    Case(source="pair", store=False, norm="qwen", table_rows=1),
    Case(source="expanded", buffer="4d", norm="gemma", is_neox=False, cache_batch=3),
    Case(source="cache", buffer="hf", norm="qwen"),
    Case(source="cache", buffer="4d"),
    Case(source="half", buffer="hf", norm="qwen", whole="qk"),
    Case(source="half", store=False, norm="gemma", whole="k"),
    Case(source="half", buffer="hf", norm="olmo2", whole="qk", dtype=torch.bfloat16),
    Case(source="cache", store=False, norm="olmo2", whole="q", dtype=torch.float16),
]
OPCHECK_PARAMS = [pytest.param(c, id=c.id) for c in OPCHECK]


@pytest.mark.parametrize("case", OPCHECK_PARAMS)
def test_opcheck_cpu(case):
    op, args = call_args(build(case))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", OPCHECK_PARAMS[:3])
def test_inputs_requiring_grad_are_refused(case):
    p = build(case)
    p.q = p.q.clone().requires_grad_(True)
    op, args = call_args(p)
    with pytest.raises(RuntimeError, match="no gradient"):
        op(*args)


# ---------------------------------------------------------------------------------------------
# bad input (eager and fake)


def _kv_tables_kwargs(p: Problem, **changes):
    args = dict(q=p.q, k=p.k, v=p.v, k_buffer=p.k_buffer, v_buffer=p.v_buffer,
                cache_loc=p.cache_loc, cos=p.rope[0], sin=p.rope[1],
                rotary_dim=p.case.rotary_dim, is_neox=True, k_scale=None, v_scale=None)
    args.update(changes)
    return args


BAD = {
    "cache_loc rows not dividing T": (lambda p: dict(cache_loc=p.cache_loc.repeat(2)[:4]),
                                      r"cache_loc's length \(4\) must divide"),
    "empty cache_loc": (lambda p: dict(cache_loc=p.cache_loc[:0]), "must divide"),
    "buffer batch too small": (lambda p: dict(k_buffer=p.k_buffer[:1], v_buffer=p.v_buffer[:1]),
                               r"batch size \(1\) is smaller than"),
    "decode batch too small": (lambda p: dict(cache_loc=p.cache_loc[:1]),
                               r"batch size \(2\) is smaller than num_tokens / len"),
    "batch mismatch": (lambda p: dict(v_buffer=p.v_buffer[:1]), "same batch size"),
    "3-D and 4-D": (lambda p: dict(v_buffer=p.v_buffer[0]), "must both be 3-D"),
    "3-D buffer, short cache_loc": (lambda p: dict(k_buffer=p.k_buffer[0],
                                                   v_buffer=p.v_buffer[0]),
                                    r"cache_loc must be \[num_tokens=6\]"),
    "5-D buffer": (lambda p: dict(k_buffer=p.k_buffer[None]), "k_buffer must be"),
    "table rows not dividing T": (lambda p: dict(cos=torch.ones(4, 32), sin=torch.ones(4, 32)),
                                  r"cos/sin rows \(4\) must divide"),
    "table width": (lambda p: dict(cos=p.rope[0][:, :8], sin=p.rope[1][:, :8]),
                    r"cos must be \[rows, rotary_dim/2 = 32\]"),
    "full-width tables": (lambda p: dict(cos=torch.ones(3, 64), sin=torch.ones(3, 64)),
                          "cos must be"),
    "cos/sin shapes": (lambda p: dict(sin=p.rope[1][:1]), "same shape"),
    "int table": (lambda p: dict(cos=p.rope[0].int()), "cos must be a floating-point"),
    "cos overlaps k_buffer": (lambda p: dict(cos=p.k_buffer[0, :3, 0, :32]), "overlap"),
}


@pytest.mark.parametrize("make", [pytest.param(m, id=n) for n, m in BAD.items()])
def test_bad_input(make):
    p = build(Case(source="half", buffer="hf"))
    changes, match = make
    with pytest.raises(ValueError, match=match):
        rope_compile.fused_qk_rope_kv_store_tables_inplace(**_kv_tables_kwargs(p, **changes(p)))


def test_bad_batched_input_cache_form_and_fake():
    """The cache-form ops check the batched layout the same way, and so do the fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = build(Case(source="cache", buffer="4d", norm="qwen"))
    op, args = call_args(p)
    args = list(args)
    args[5] = p.cache_loc.repeat(2)[:4]  # cache_loc
    with pytest.raises(ValueError, match="must divide the number of tokens"):
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args]
        with pytest.raises(ValueError, match="must divide the number of tokens"):
            op(*fake)


def test_cache_loc_out_of_range_4d():
    p = build(Case(source="half", buffer="hf"))
    before = p.k_big.clone()
    bad = p.cache_loc.clone()
    bad[1] = p.case.num_slots
    with pytest.raises(IndexError, match="cache_loc must lie in"):
        rope_compile.fused_qk_rope_kv_store_tables_inplace(**_kv_tables_kwargs(p, cache_loc=bad))
    assert_same_bits(p.k_big, before, "k cache after a refused call")


# ---------------------------------------------------------------------------------------------
# under torch.compile (CPU: the op stays a call; GPUs: the lowering, below)


def _hf_layer(num_q_heads=4, num_kv_heads=2, head_size=64):
    """An HF-style attention prologue: q/k/v views of one projection, OLMo2's q/k norm, the
    model's cos/sin halves, then StaticCache's update of [B, Hk, L, D] caches (two calls: the
    tables op and the cache-form op, so both lowerings are used)."""
    hq, hk, d = num_q_heads, num_kv_heads, head_size

    def f(qkv, k_cache, v_cache, emb, cache_position, w, cos_sin_cache, positions):
        q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
        q, k, v = q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d)
        cos, sin = emb.cos(), emb.sin()
        rope_compile.fused_qk_norm_rope_kv_store_tables_inplace(
            q, k, v, k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3), cache_position,
            w, w, 1e-6, 0.0, cos[..., :d // 2], sin[..., :d // 2], d, True,
            round_once=True)  # OLMo2's rounding (in float32 the same values as Qwen3's)
        rope_compile.fused_qk_rope_kv_store_inplace(
            q, k, v, k_cache[1].transpose(0, 1), v_cache[1].transpose(0, 1), positions,
            cos_sin_cache,
            positions, d, False)
        rope_compile.fused_qk_norm_rope_inplace(q, k, w, w, 1e-6, 1.0, cos_sin_cache,
                                                positions, d, True)
        return qkv * 2

    return f


def _hf_inputs(device, cache_dtype=torch.float32, batch=2, seq=3, slots=8):
    g = torch.Generator().manual_seed(5)
    t = batch * seq
    qkv = torch.randn(t, 8 * 64, generator=g)
    k_cache = torch.full((batch, 2, slots, 64), float("nan")).to(cache_dtype)
    v_cache = torch.full((batch, slots, 2, 64), float("nan")).to(cache_dtype).transpose(1, 2)
    emb = torch.rand(seq, 64, generator=g) * 6
    cache_position = torch.arange(seq) + 2
    w = torch.randn(64, generator=g) + 1
    cache = torch.rand(16, 64, generator=g) * 2 - 1
    positions = torch.randperm(slots, generator=g)[:t] % 16  # also the 3-D store's cache_loc
    return [x.to(device) for x in (qkv, k_cache, v_cache, emb, cache_position, w, cache,
                                   positions)]


def _check_compiled(device, backend, cache_dtype=torch.float32):
    """Compiled vs eager: outputs and mutated inputs equal up to Inductor's own cos/sin (which
    may round the tables one ulp apart from eager's), NaN-poisoned cache elements untouched."""
    torch._dynamo.reset()
    f = _hf_layer()
    eager_in = _hf_inputs(device, cache_dtype)
    compiled_in = _hf_inputs(device, cache_dtype)
    eager = f(*eager_in)
    from torch._inductor.utils import run_and_get_code

    out, code = run_and_get_code(torch.compile(f, backend=backend, fullgraph=True),
                                 *compiled_in)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_in[:3], eager_in[:3], strict=True):  # qkv, k_cache, v_cache
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5, equal_nan=True)
    return "\n".join(code)


def test_compiled_cpu_inductor():
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    source = _check_compiled("cpu", "inductor")
    assert "torch.ops.rope_compile.fused_qk_norm_rope_kv_store_tables_inplace" in source
    assert "True, None, None, True)" in source  # (is_neox, k_scale, v_scale, round_once)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_cpu(backend):
    torch._dynamo.reset()
    f = _hf_layer()
    eager_in, compiled_in = _hf_inputs("cpu"), _hf_inputs("cpu")
    eager = f(*eager_in)
    out = torch.compile(f, backend=backend, fullgraph=True)(*compiled_in)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_in[:3], eager_in[:3], strict=True):
        assert_same_bits(a, b, "mutated input")


# ---------------------------------------------------------------------------------------------
# GPU (cuda / xpu): the compiled kernel, and the Inductor lowering

GPU_CASES = PARAMS + [pytest.param(c, id=c.id) for c in (
    Case(source="half", buffer="hf", batch=8, seq=128, num_q_heads=32, num_kv_heads=8,
         head_size=128, rotary_dim=128, dtype=torch.bfloat16, norm="qwen", num_slots=256,
         cache_batch=8),
    Case(source="pair", buffer="4d", batch=64, seq=1, table_rows=1, num_q_heads=32,
         num_kv_heads=8, head_size=128, rotary_dim=64, dtype=torch.bfloat16, is_neox=False,
         cache_dtype=FP8 or torch.bfloat16, scales=(0.5, 0.5), num_slots=16),
    # OLMo2-7B decode: 32 q / 32 kv heads, whole-projection norms, HF StaticCache
    Case(source="half", buffer="hf", batch=8, seq=1, table_rows=1, num_q_heads=32,
         num_kv_heads=32, head_size=128, rotary_dim=128, dtype=torch.bfloat16, norm="qwen",
         whole="qk", num_slots=64, cache_batch=8),
    Case(source="half", buffer="hf", batch=8, seq=1, table_rows=1, num_q_heads=32,
         num_kv_heads=32, head_size=128, rotary_dim=128, dtype=torch.bfloat16, norm="olmo2",
         whole="qk", num_slots=64, cache_batch=8),
)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu(gpu_device, case):
    run_and_check(case, apply_op, gpu_device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", OPCHECK_PARAMS)
def test_gpu_opcheck(gpu_device, case):
    op, args = call_args(build(case, gpu_device))
    torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_gpu_lowering_launches_the_kernel(gpu_device):
    """Under torch.compile (inductor) the KV/norm ops lower to the Triton kernel launched from
    the generated code (no call through the dispatcher), the HF cache written through its
    permuted view, values as eager's."""
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    source = _check_compiled(gpu_device, "inductor")
    assert "fused_qk_norm_rope_kv_kernel" in source
    assert "torch.ops.rope_compile" not in source


@pytest.mark.gpu
@pytest.mark.skipif(FP8 is None, reason="torch has no float8_e4m3fn")
def test_gpu_lowering_fp8_buffers_keep_the_op_call(gpu_device):
    """fp8 buffers are written through uint8 views, which the lowering does not take: the
    KV-store calls stay op calls (correct, through the dispatcher); the norm-only op lowers."""
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    source = _check_compiled(gpu_device, "inductor", cache_dtype=FP8)
    assert "torch.ops.rope_compile.fused_qk_norm_rope_kv_store_tables_inplace" in source
    assert "torch.ops.rope_compile.fused_qk_norm_rope_inplace" not in source


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert replace(CASES[0]).id == CASES[0].id
