"""The cos/sin-tables op and the mRoPE-cache op (rope_compile/kernels/rope_tables.py).

* ``fused_qk_rope_with_cos_sin_tables_inplace``: token t rotated by row ``t % R`` of a model's
  own cos/sin tables ``[R, rot/2]`` (``[3, R, rot/2]`` with mRoPE sections), any strides; or of
  full tables ``[R, rot]`` (one value per feature; their halves deliberately unequal here),
  checked against HF's own formula ``x * cos + rotate_half(x) * sin`` (``rotate_every_two``
  for GPT-J) in float64.
* ``fused_qk_mrope_with_cos_sin_cache_inplace``: Qwen2-VL's multimodal RoPE from a
  ``cos_sin_cache`` and positions ``[3, T]`` (or ``[T]``).

Every case runs through the op (CPU: the float32 reference), the public function and the Triton
launcher (on CPU tensors through Triton's interpreter; on a GPU, compiled), and is checked
against a float64 oracle written here (cos/sin picked per token and column by explicit
indexing, then conftest's ``rope_f64``): the rotated region holds the oracle's values, every
other element of q/k/v's buffer (NaN-poisoned tails included) and the tables are bit-identical.
Then opcheck, bad-input errors, gradients and, on GPUs, the Inductor lowering.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    GPU_DEVICE,
    TOLERANCES,
    assert_grads_match,
    assert_same_bits,
    make_qkv,
    pair_indices,
    poison,
    rope_f64,
    rotate_every_two,
    rotate_half,
    to_device_keeping_layout,
)

import rope_compile
from rope_compile import ops

TABLES_OP = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default
MROPE_OP = torch.ops.rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace.default
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class TablesCase:
    num_tokens: int = 6
    num_q_heads: int = 3
    num_kv_heads: int = 2
    head_size: int = 128
    rotary_dim: int = 128
    is_neox: bool = True
    dtype: torch.dtype = torch.bfloat16
    table_dtype: torch.dtype = torch.float32
    # TABLES: the rows R of the tables (None: one per token). CACHE: the cache's rows.
    rows: int | None = None
    # TABLES: "plain" (contiguous), "half" (the [..., :rot/2] and [..., rot/2:] halves of one
    # [R, rot] table, HF style), "pair" (freqs_cis[..., 0] and [..., 1] of [R, rot/2, 2],
    # column stride 2), "expanded" (one row, stride 0), "transposed" (column-major).
    # CACHE: "plain" or "poisoned" (NaN in every row no position uses).
    table_form: str = "plain"
    mrope_section: tuple[int, int, int] | None = None
    # TABLES only: full tables [R, rot] (one cos/sin per feature) instead of pair tables.
    full: bool = False
    # CACHE only: positions "3xT", "T" (one row for every stream), "strided" ([3, 2T][:, ::2]).
    positions: str | None = None
    pos_dtype: torch.dtype = torch.int64
    # CACHE only: Qwen3-VL's interleaved streams (stream 1 at i % 3 == 1, i < 3 * s1; stream 2
    # at i % 3 == 2, i < 3 * s2), not sections.
    interleaved: bool = False

    @property
    def from_cache(self) -> bool:
        return self.positions is not None

    @property
    def id(self) -> str:
        parts = [f"T{self.num_tokens}", f"H{self.num_q_heads}-{self.num_kv_heads}",
                 f"D{self.head_size}r{self.rotary_dim}", "neox" if self.is_neox else "gptj",
                 str(self.dtype).removeprefix("torch."),
                 "tab-" + str(self.table_dtype).removeprefix("torch."), self.table_form]
        if self.full:
            parts.append("full")
        if self.rows is not None:
            parts.append(f"R{self.rows}")
        if self.mrope_section is not None:
            parts.append("mrope" + "-".join(map(str, self.mrope_section)))
        if self.interleaved:
            parts.append("interleaved")
        if self.from_cache:
            parts += [f"pos{self.positions}", str(self.pos_dtype).removeprefix("torch.")]
        return "-".join(parts)


@dataclass
class Problem:
    case: TablesCase
    q: torch.Tensor
    k: torch.Tensor
    qkv: torch.Tensor  # the buffer q, k (and v) are views of
    reads: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) or (cos_sin_cache, positions)
    # [T, rot/2] float64: the cos each token's pair i must use ([T, rot]: full tables, the cos
    # of each feature)
    cos_token: torch.Tensor
    sin_token: torch.Tensor

    def args(self, q=None, k=None) -> tuple:
        c = self.case
        q, k = (self.q, self.k) if q is None else (q, k)
        sections = None if c.mrope_section is None else list(c.mrope_section)
        tail = (False, True) if c.interleaved else ()  # wrap_negative_positions, interleaved
        return (q, k, *self.reads, c.rotary_dim, c.is_neox, sections, *tail)


def _stream_of_column(case: TablesCase) -> torch.Tensor:
    """The stream of each table column: pair i's (``[rot/2]``), or with full tables each
    feature's, its pair's (``[rot]``: (i, i + rot/2) neox, (2i, 2i + 1) GPT-J)."""
    half = case.rotary_dim // 2
    if case.mrope_section is None:
        per_pair = torch.zeros(half, dtype=torch.long)
    elif case.interleaved:  # sglang's apply_interleaved_rope, column by column
        _, s1, s2 = case.mrope_section
        per_pair = torch.tensor([1 if i % 3 == 1 and i < 3 * s1 else
                                 2 if i % 3 == 2 and i < 3 * s2 else 0 for i in range(half)])
    else:
        s0, s1, _ = case.mrope_section
        per_pair = torch.tensor([0 if i < s0 else 1 if i < s0 + s1 else 2 for i in range(half)])
    if not case.full:
        return per_pair
    return per_pair.repeat(2) if case.is_neox else per_pair.repeat_interleave(2)


def _uniform(shape, dtype, g) -> torch.Tensor:
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def _tables(case: TablesCase, g):
    """(cos, sin) in the case's form, and their values as float64 ``[S, R, rot/2]`` (full
    tables: ``[S, R, rot]``)."""
    half = case.rotary_dim if case.full else case.rotary_dim // 2  # the tables' width
    streams = 1 if case.mrope_section is None else 3
    rows = case.num_tokens if case.rows is None else case.rows
    lead = (streams,) if case.mrope_section is not None else ()
    dtype = case.table_dtype
    if case.table_form == "plain":
        cos, sin = _uniform((*lead, rows, half), dtype, g), _uniform((*lead, rows, half), dtype, g)
    elif case.table_form == "half":  # NaN in the other half: reading it shows
        cos_buf = poison(torch.empty((*lead, rows, 2 * half), dtype=dtype))
        sin_buf = poison(torch.empty((*lead, rows, 2 * half), dtype=dtype))
        cos, sin = cos_buf[..., :half], sin_buf[..., half:]
        cos.copy_(_uniform(cos.shape, dtype, g))
        sin.copy_(_uniform(sin.shape, dtype, g))
    elif case.table_form == "pair":
        freqs_cis = _uniform((*lead, rows, half, 2), dtype, g)
        cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]
    elif case.table_form == "expanded":
        cos = _uniform((*lead, 1, half), dtype, g).expand(*lead, rows, half)
        sin = _uniform((*lead, 1, half), dtype, g).expand(*lead, rows, half)
    elif case.table_form == "transposed":
        cos = _uniform((*lead, half, rows), dtype, g).transpose(-1, -2)
        sin = _uniform((*lead, half, rows), dtype, g).transpose(-1, -2)
    else:
        raise ValueError(case.table_form)
    values = [t.to(torch.float64).reshape(streams, rows, half) for t in (cos, sin)]
    return (cos, sin), values


def _cache_and_positions(case: TablesCase, g):
    rot, t = case.rotary_dim, case.num_tokens
    max_position = case.rows or 40
    pos = torch.randint(0, max_position, (3, t), generator=g)
    if t >= 2:  # both ends of the cache
        pos[:, 0], pos[:, -1] = 0, max_position - 1
    if case.positions == "T":
        pos = pos[:1].expand(3, t)
    values = _uniform((max_position, rot), case.table_dtype, g)
    if case.table_form == "poisoned":
        used = torch.zeros(max_position, dtype=torch.bool)
        used[pos.reshape(-1)] = True
        values[~used] = float("nan")
    if case.positions == "T":
        positions = pos[0].to(case.pos_dtype).clone()
    elif case.positions == "strided":
        wide = torch.full((3, 2 * t), -(10**6), dtype=case.pos_dtype)  # out of range: poison
        wide[:, ::2] = pos
        positions = wide[:, ::2]
    else:
        positions = pos.to(case.pos_dtype)
    return values, positions, pos


def build(case: TablesCase, device="cpu", seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    t, rot, half = case.num_tokens, case.rotary_dim, case.rotary_dim // 2
    q, k, _, qkv = make_qkv(t, case.num_q_heads, case.num_kv_heads, case.head_size, case.dtype,
                            generator=g)
    poison(q[..., rot:])
    poison(k[..., rot:])
    stream = _stream_of_column(case)[None, :]  # [1, half] ([1, rot]: full tables)
    column = torch.arange(stream.shape[1])[None, :]
    if case.from_cache:
        cache, positions, pos = _cache_and_positions(case, g)
        rows = pos[stream, torch.arange(t)[:, None]]  # [T, half]: positions[stream(i), t]
        cache64 = cache.to(torch.float64)
        cos_token, sin_token = cache64[rows, column], cache64[rows, half + column]
        reads = (cache, positions)
    else:
        reads, (cos64, sin64) = _tables(case, g)
        rows = torch.arange(t)[:, None] % max(reads[0].shape[-2], 1)
        cos_token, sin_token = cos64[stream, rows, column], sin64[stream, rows, column]
        if case.full and t:  # deliberately unequal halves: pair tables could not express them
            first, second = pair_indices(rot, case.is_neox)
            assert not torch.equal(cos_token[:, first], cos_token[:, second])
            assert not torch.equal(sin_token[:, first], sin_token[:, second])
    qkv = qkv.to(device)
    q = qkv.as_strided(q.shape, q.stride(), q.storage_offset())
    k = qkv.as_strided(k.shape, k.stride(), k.storage_offset())
    reads = tuple(to_device_keeping_layout(x, device) for x in reads)
    return Problem(case, q, k, qkv, reads, cos_token, sin_token)


def hf_full_tables_f64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                       is_neox: bool) -> torch.Tensor:
    """The float64 oracle of full tables: HF's ``x * cos + rotate_half(x) * sin``
    (``rotate_every_two`` for GPT-J), cos/sin ``[T, rot]`` broadcast over heads."""
    x64 = x.detach().cpu().to(torch.float64)
    rot = x64[..., :rotary_dim]
    turn = rotate_half if is_neox else rotate_every_two
    out = rot * cos[:, None, :] + turn(rot) * sin[:, None, :]
    return torch.cat((out, x64[..., rotary_dim:]), dim=-1)


def expected(p: Problem, x: torch.Tensor) -> torch.Tensor:
    """The float64 oracle: conftest's rope_f64 with a per-token table and arange positions
    (full tables: HF's formula, :func:`hf_full_tables_f64`)."""
    if p.case.full:
        return hf_full_tables_f64(x, p.cos_token, p.sin_token, p.case.rotary_dim,
                                  p.case.is_neox)
    table = torch.cat((p.cos_token, p.sin_token), dim=-1)
    return rope_f64(x, torch.arange(x.shape[0]), table, p.case.rotary_dim, p.case.is_neox)


def run_and_check(case: TablesCase, apply: Callable[[Problem], object], device="cpu") -> None:
    p = build(case, device)
    rot = case.rotary_dim
    exp_q, exp_k = expected(p, p.q), expected(p, p.k)
    before = p.qkv.clone()
    reads_before = [x.clone() for x in p.reads]
    if case.num_tokens:  # not vacuous: the oracle moves the rotated region
        assert not torch.equal(exp_q[..., :rot], p.q[..., :rot].double().cpu())

    assert apply(p) is None, "in-place ops return None"

    tol = TOLERANCES[case.dtype]
    rotated = torch.zeros(p.qkv.shape, dtype=torch.bool)
    for x, exp in ((p.q, exp_q), (p.k, exp_k)):
        rotated.as_strided(x.shape, x.stride(), x.storage_offset())[..., :rot] = True
        torch.testing.assert_close(x[..., :rot].cpu().double(), exp[..., :rot], **tol)
    assert_same_bits(p.qkv.cpu()[~rotated], before.cpu()[~rotated], "q/k tails and v")
    for x, snapshot in zip(p.reads, reads_before, strict=True):
        assert_same_bits(x, snapshot, "a read input")


# --------------------------------------------------------------------------------------------
# ways to call (each rotates p.q and p.k in place)


def apply_op(p: Problem):
    return (MROPE_OP if p.case.from_cache else TABLES_OP)(*p.args())


def apply_public(p: Problem):
    c = p.case
    if c.from_cache:
        return rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace(
            *p.args()[:7], mrope_interleaved=c.interleaved)
    if c.mrope_section is None:  # the optional argument left out
        return rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(*p.args()[:6])
    return rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(*p.args())


def apply_launcher(p: Problem):
    from rope_compile.kernels import rope_tables

    c = p.case
    launch = rope_tables.launch_qk_mrope_cache if c.from_cache else (
        rope_tables.launch_qk_rope_tables)
    return launch(p.q[..., :c.rotary_dim], p.k[..., :c.rotary_dim], *p.args()[2:])


def apply_gpu_kernel(p: Problem):
    """The op's CUDA/XPU kernel (validation + launcher) on whole heads."""
    kernel = ops._qk_mrope_cache_triton if p.case.from_cache else ops._qk_rope_tables_triton
    return kernel(*p.args())


APPLIES = {"op": apply_op, "public": apply_public}
TRITON_APPLIES = {"launcher": apply_launcher, "gpu-kernel": apply_gpu_kernel}
SECTIONS = (16, 24, 24)

TABLES_CASES = [
    TablesCase(num_tokens=7),  # odd T, one row per token
    TablesCase(is_neox=False, rotary_dim=64, dtype=torch.float16, table_dtype=torch.bfloat16,
               rows=3),  # partial rotary, GPT-J, rows broadcast over a batch of 2
    TablesCase(table_form="half", rows=2, dtype=torch.float32, num_kv_heads=1),
    TablesCase(table_form="pair", is_neox=False, dtype=torch.float32),  # gpt-fast freqs_cis
    TablesCase(table_form="expanded", rotary_dim=96, table_dtype=torch.float16),
    TablesCase(table_form="transposed", rows=6, dtype=torch.float16),
    TablesCase(num_q_heads=1, num_kv_heads=1, head_size=64, rotary_dim=32, rows=1),
    TablesCase(num_q_heads=1, num_kv_heads=3, rotary_dim=64, head_size=128),
    TablesCase(mrope_section=SECTIONS, num_tokens=5),
    TablesCase(mrope_section=(8, 12, 12), rotary_dim=64, is_neox=False, table_form="half",
               rows=3, dtype=torch.float16),
    TablesCase(mrope_section=SECTIONS, table_form="pair", rows=2),
    TablesCase(num_tokens=0),
    TablesCase(num_tokens=0, rows=0, mrope_section=SECTIONS),
]
# Full tables [R, rot] (one cos/sin per feature, halves unequal): every table form, partial
# rotary, R < T, sections.
FULL_CASES = [
    TablesCase(full=True, num_tokens=7),
    TablesCase(full=True, is_neox=False, num_tokens=5, dtype=torch.float32),
    TablesCase(full=True, is_neox=False, rotary_dim=64, dtype=torch.float16,
               table_dtype=torch.bfloat16, rows=3),  # partial rotary, rows broadcast
    TablesCase(full=True, table_form="half", rows=2, dtype=torch.float32, num_kv_heads=1),
    TablesCase(full=True, table_form="pair", is_neox=False, dtype=torch.float32),
    TablesCase(full=True, table_form="expanded", rotary_dim=96, table_dtype=torch.float16),
    TablesCase(full=True, table_form="transposed", rows=6, dtype=torch.float16, is_neox=False),
    TablesCase(full=True, num_q_heads=1, num_kv_heads=1, head_size=64, rotary_dim=32, rows=1),
    TablesCase(full=True, mrope_section=SECTIONS, num_tokens=5, dtype=torch.float32),
    TablesCase(full=True, mrope_section=(8, 12, 12), rotary_dim=64, is_neox=False,
               table_form="half", rows=3, dtype=torch.float16),
    TablesCase(full=True, mrope_section=(0, 32, 32), table_form="transposed", rows=2,
               dtype=torch.float32),
    TablesCase(full=True, num_tokens=0),
]
TABLES_CASES_ALL = TABLES_CASES + FULL_CASES
MROPE_CASES = [
    TablesCase(positions="3xT", mrope_section=SECTIONS, num_tokens=7),
    TablesCase(positions="T", mrope_section=SECTIONS, pos_dtype=torch.int32),
    TablesCase(positions="strided", mrope_section=(8, 12, 12), rotary_dim=64, is_neox=False,
               dtype=torch.float16, table_dtype=torch.float16, pos_dtype=torch.int32),
    TablesCase(positions="3xT", mrope_section=SECTIONS, table_form="poisoned", rows=4096,
               dtype=torch.float32),
    TablesCase(positions="3xT", mrope_section=(0, 64, 0), num_q_heads=1, num_kv_heads=1),
    TablesCase(positions="T", mrope_section=(32, 0, 32), is_neox=False, rotary_dim=128,
               head_size=256, dtype=torch.float32),
    TablesCase(positions="3xT", mrope_section=SECTIONS, num_tokens=0),
    # Qwen3-VL's interleaved streams: its own sections; 3 * s past rot/2 (sglang's slices
    # stop at the end); a section of 0; strided int32 positions; 0 tokens.
    TablesCase(positions="3xT", mrope_section=(24, 20, 20), interleaved=True, num_tokens=7),
    TablesCase(positions="3xT", mrope_section=SECTIONS, interleaved=True, is_neox=False,
               dtype=torch.float32),
    TablesCase(positions="strided", mrope_section=(8, 24, 0), interleaved=True, rotary_dim=64,
               dtype=torch.float16, table_dtype=torch.float16, pos_dtype=torch.int32),
    TablesCase(positions="T", mrope_section=(10, 11, 11), interleaved=True, rotary_dim=64,
               head_size=96, table_form="poisoned", rows=4096),
    TablesCase(positions="3xT", mrope_section=(24, 20, 20), interleaved=True, num_tokens=0),
]
ALL_CASES = TABLES_CASES_ALL + MROPE_CASES


def _params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


# --------------------------------------------------------------------------------------------
# results


@pytest.mark.parametrize("apply", list(APPLIES.values()), ids=list(APPLIES))
@pytest.mark.parametrize("case", _params(ALL_CASES))
def test_ops_cpu(case, apply):
    run_and_check(case, apply)


@pytest.mark.skipif(not TRITON_ON_CPU and GPU_DEVICE is None, reason="no Triton device")
@pytest.mark.parametrize("apply", list(TRITON_APPLIES.values()), ids=list(TRITON_APPLIES))
@pytest.mark.parametrize("case", _params(ALL_CASES))
def test_triton_kernel(case, apply):
    """The Triton kernel: under the interpreter on CPU tensors, compiled on a GPU."""
    run_and_check(case, apply, GPU_DEVICE or "cpu")


def test_text_only_positions_match_the_first_op():
    """positions [T] (every stream the same) and [3, T] with three equal rows rotate as the
    plain fused op does with those positions."""
    case = TablesCase(positions="T", mrope_section=SECTIONS, dtype=torch.float32)
    one, three, plain = build(case), build(case), build(case)
    MROPE_OP(*one.args())
    pos3 = three.reads[1].expand(3, -1).contiguous()
    MROPE_OP(three.q, three.k, three.reads[0], pos3, 128, True, list(SECTIONS))
    rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(plain.q, plain.k, *plain.reads, 128,
                                                          True)
    assert_same_bits(one.qkv, plain.qkv, "positions [T] against the first op")
    assert_same_bits(three.qkv, plain.qkv, "positions [3, T] against the first op")


def test_tables_match_the_cache_op():
    """Tables gathered from a cache by positions give the cache op's result (HF's tables)."""
    case = TablesCase(positions="T", mrope_section=SECTIONS, dtype=torch.float32)
    a, b = build(case), build(case)
    cache, pos = a.reads
    rows = cache[pos.long()]
    TABLES_OP(a.q, a.k, rows[:, :64], rows[:, 64:], 128, True)
    rope_compile.fused_qk_rope_with_cos_sin_cache_inplace(b.q, b.k, cache, pos, 128, True)
    assert_same_bits(a.qkv, b.qkv, "tables against the cache op")


def test_launch_description_matches_the_kernel_signature():
    from rope_compile.kernels import rope_tables

    kernel = rope_tables.fused_qk_rope_tables_kernel
    names = list(getattr(kernel, "arg_names", None) or getattr(kernel, "fn", kernel).arg_names)
    shape = rope_tables.launch_shape(7, 4, 2, 128, True, "cuda", 2, from_cache=True,
                                     mrope_section=SECTIONS)
    assert names == [*rope_tables.RUNTIME_ARGS, *shape.constexprs]
    assert shape.constexprs["NUM_STREAMS"] == 3
    assert (shape.constexprs["SECTION_1_START"], shape.constexprs["SECTION_2_START"]) == (16, 40)
    assert shape.constexprs["FULL_TABLES"] is False
    full = rope_tables.launch_shape(7, 4, 2, 128, True, "cuda", 2, from_cache=False,
                                    full_tables=True)
    assert list(full.constexprs) == list(shape.constexprs) and full.constexprs["FULL_TABLES"]
    with pytest.raises(ValueError, match="full_tables is a TABLES form"):
        rope_tables.launch_shape(7, 4, 2, 128, True, "cuda", 2, from_cache=True,
                                 full_tables=True)


# --------------------------------------------------------------------------------------------
# full tables [R, rot]: one cos/sin per feature


def _equal_halves(pair: torch.Tensor, rotary_dim: int, is_neox: bool) -> torch.Tensor:
    """The full table ``[..., rot]`` whose pair columns (a, b) both hold ``pair[..., i]``: HF's
    ``cat(freqs, freqs)`` (neox) or ``repeat_interleave(freqs, 2)`` (GPT-J)."""
    if is_neox:
        return torch.cat((pair, pair), dim=-1)
    return pair.repeat_interleave(2, dim=-1)


FULL_EQUALS_PAIR_CASES = [
    TablesCase(rows=3, dtype=torch.float32),
    TablesCase(is_neox=False, rotary_dim=64, dtype=torch.bfloat16, table_dtype=torch.float16),
    TablesCase(mrope_section=(8, 12, 12), rotary_dim=64, rows=2, dtype=torch.float16),
    TablesCase(mrope_section=SECTIONS, is_neox=False, dtype=torch.float32),
]


@pytest.mark.parametrize("apply", [apply_op, *(
    [apply_launcher] if TRITON_ON_CPU or GPU_DEVICE is not None else [])],
    ids=lambda f: f.__name__.removeprefix("apply_"))
@pytest.mark.parametrize("case", _params(FULL_EQUALS_PAIR_CASES))
def test_full_tables_with_equal_halves_are_the_pair_tables(case, apply):
    """Full tables whose pair columns are equal rotate bit for bit as their pair tables do."""
    device = (GPU_DEVICE or "cpu") if apply is apply_launcher else "cpu"
    pair, full = build(case, device), build(case, device)
    cos, sin = (_equal_halves(t, case.rotary_dim, case.is_neox) for t in pair.reads)
    full.reads = (cos, sin)
    assert cos.shape[-1] == case.rotary_dim
    apply(pair)
    apply(full)
    assert_same_bits(full.qkv, pair.qkv, "full tables with equal halves against pair tables")


def test_full_tables_halves_matter():
    """Not vacuous: with unequal halves, the pair tables of either half give another result."""
    case = TablesCase(full=True, dtype=torch.float32, rows=2)
    p = build(case)
    exp = expected(p, p.q)
    TABLES_OP(*p.args())
    torch.testing.assert_close(p.q.double(), exp, **TOLERANCES[torch.float32])
    for half in (slice(0, 64), slice(64, 128)):
        other = build(case)
        TABLES_OP(other.q, other.k, other.reads[0][:, half], other.reads[1][:, half], 128, True)
        assert (other.q.double() - exp).abs().max() > 1e-2


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_full_tables_hf_attention_layout(is_neox):
    """HF's own call: q/k ``[B, H, S, D]`` transposed views of the projection, cos/sin
    ``[B, S, D]`` graph-input tables (unsqueezed over heads in HF), rows shared by the batch."""
    g = torch.Generator().manual_seed(5)
    b, s, h, d = 2, 3, 4, 64
    q_proj, k_proj = torch.randn(b, s, h * d, generator=g), torch.randn(b, s, 2 * d, generator=g)
    cos, sin = torch.randn(1, s, d, generator=g), torch.randn(1, s, d, generator=g)
    turn = rotate_half if is_neox else rotate_every_two
    q4, k4 = q_proj.view(b, s, h, d).transpose(1, 2), k_proj.view(b, s, 2, d).transpose(1, 2)
    exp_q = q4.double() * cos.double()[:, None] + turn(q4.double()) * sin.double()[:, None]
    exp_k = k4.double() * cos.double()[:, None] + turn(k4.double()) * sin.double()[:, None]
    rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(
        q_proj.view(b * s, h, d), k_proj.view(b * s, 2, d), cos[0], sin[0], d, is_neox)
    torch.testing.assert_close(q4.double(), exp_q, **TOLERANCES[torch.float32])
    torch.testing.assert_close(k4.double(), exp_k, **TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------
# opcheck

OPCHECK_CASES = [TABLES_CASES[1], TABLES_CASES[3], TABLES_CASES[9], TABLES_CASES[11],
                 FULL_CASES[2], FULL_CASES[4], FULL_CASES[9], FULL_CASES[11],
                 MROPE_CASES[1], MROPE_CASES[2], MROPE_CASES[6]]


def _assert_opcheck(p: Problem):
    op = MROPE_OP if p.case.from_cache else TABLES_OP
    result = torch.library.opcheck(op, p.args())
    assert result == dict.fromkeys(result, "SUCCESS"), result
    assert set(result) >= {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"}


@pytest.mark.parametrize("case", _params(OPCHECK_CASES))
def test_opcheck_cpu(case):
    _assert_opcheck(build(case))


def test_schemas():
    tables, mrope = str(TABLES_OP._schema), str(MROPE_OP._schema)
    assert "Tensor(a0!) q" in tables and "Tensor(a1!) k" in tables
    assert "Tensor cos, Tensor sin" in tables and "int[]? mrope_section=None" in tables
    assert "Tensor cos_sin_cache, Tensor positions" in mrope and "int[] mrope_section" in mrope
    assert tables.endswith("-> ()") and mrope.endswith("-> ()")
    for name in (TABLES_OP._schema.name, MROPE_OP._schema.name):
        for key in ("CPU", "CUDA", "XPU", "Meta", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)


# --------------------------------------------------------------------------------------------
# under torch.compile (CPU: the op stays a call; GPUs: see the lowering test below)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_on_qkv_views(backend):
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    torch._dynamo.reset()

    def f(qkv, emb, cache, positions):
        q, k, _ = qkv.split([3 * 128, 2 * 128, 2 * 128], -1)
        q, k = q.view(-1, 3, 128), k.view(-1, 2, 128)
        rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(
            q, k, emb.cos()[..., :32], emb.sin()[..., 32:], 64, False)
        rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace(
            q, k, cache, positions, 128, True, [16, 24, 24])
        return qkv * 2

    p = build(TablesCase(positions="3xT", mrope_section=SECTIONS, dtype=torch.float32))
    emb = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))  # rows broadcast
    eager_qkv = p.qkv.clone()
    eager = f(eager_qkv, emb, *p.reads)
    compiled = torch.compile(f, backend=backend, fullgraph=True)(p.qkv, emb, *p.reads)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.qkv, eager_qkv, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# bad input


def _bad_tables(p: Problem, **changes):
    args = dict(zip(("q", "k", "cos", "sin", "rotary_dim", "is_neox", "mrope_section"),
                    p.args(), strict=True))
    args.update(changes)
    return lambda: TABLES_OP(*args.values())


def _bad_mrope(p: Problem, **changes):
    args = dict(zip(("q", "k", "cos_sin_cache", "positions", "rotary_dim", "is_neox",
                     "mrope_section"), p.args(), strict=True))
    args.update(changes)
    return lambda: MROPE_OP(*args.values())


def _tables_bad_inputs():
    base = TablesCase(num_tokens=6, rows=3, rotary_dim=64, dtype=torch.float32)
    mrope = TablesCase(num_tokens=6, rows=3, rotary_dim=64, mrope_section=(8, 12, 12),
                       dtype=torch.float32)
    b, m = build(base), build(mrope)
    cos, sin = b.reads
    qkv = torch.randn(6, 7 * 128)
    return [
        ("q-2d", _bad_tables(b, q=b.q[:, 0]), r"q must be a \[num_tokens"),
        ("q-int", _bad_tables(b, q=b.q.to(torch.int32), k=b.k.to(torch.int32)),
         "q must be a floating-point tensor"),
        ("k-dtype", _bad_tables(b, k=b.k.double()), "q and k must have the same dtype"),
        ("rot-odd", _bad_tables(b, rotary_dim=63), "rotary_dim must be a positive even"),
        ("rot-too-big", _bad_tables(b, rotary_dim=130, cos=torch.rand(3, 65),
                                    sin=torch.rand(3, 65)), "must not exceed q's head size"),
        ("tokens", _bad_tables(b, k=b.k[:3]), "same number of tokens"),
        ("q-last-stride", _bad_tables(b, q=torch.randn(6, 128, 3).transpose(1, 2)),
         "q must have last stride 1"),
        ("k-expanded", _bad_tables(b, k=torch.randn(6, 1, 128).expand(6, 2, 128)),
         "k must not be expanded"),
        ("qk-overlap", _bad_tables(b, k=b.q[:, :2]), "q and k overlap"),
        ("cos-int", _bad_tables(b, cos=cos.to(torch.int32)), "cos must be a floating-point"),
        ("cos-3d", _bad_tables(b, cos=cos[None], sin=sin[None]), r"cos must be \[rows, "
         r"rotary_dim/2\]"),
        ("cos-width", _bad_tables(b, cos=torch.rand(3, 48), sin=torch.rand(3, 48)),
         r"rotary_dim/2 = 32, rotary_dim = 64"),
        ("cos-width-names-both-forms", _bad_tables(b, cos=torch.rand(3, 128),
                                                   sin=torch.rand(3, 128)),
         r"cos must be \[rows, rotary_dim/2\] \(pair tables\) or \[rows, rotary_dim\] "
         r"\(full tables\)"),
        ("full-cos-pair-sin", _bad_tables(b, cos=torch.rand(3, 64)),
         "cos and sin must have the same shape"),
        ("full-sin-width", _bad_tables(b, cos=torch.rand(3, 64), sin=torch.rand(3, 63)),
         r"sin must be \[rows, rotary_dim/2\]"),
        ("full-rows", _bad_tables(b, cos=torch.rand(4, 64), sin=torch.rand(4, 64)),
         r"rows \(4\) must divide the number of tokens \(6\)"),
        ("full-sections-2d", _bad_tables(b, cos=torch.rand(3, 64), sin=torch.rand(3, 64),
                                         mrope_section=[8, 12, 12]),
         r"cos must be \[3, rows, rotary_dim/2\] \(pair tables\) or \[3, rows, "
         r"rotary_dim\]"),
        ("full-sections-width", _bad_tables(m, cos=torch.rand(3, 3, 96), sin=torch.rand(3, 3, 96)),
         r"\[3, rows, rotary_dim\] \(full tables\)"),
        ("sin-shape", _bad_tables(b, sin=torch.rand(6, 32)), "cos and sin must have the same "
         "shape"),
        ("rows", _bad_tables(b, cos=torch.rand(4, 32), sin=torch.rand(4, 32)),
         r"rows \(4\) must divide the number of tokens \(6\)"),
        ("rows-zero", _bad_tables(b, cos=torch.rand(0, 32), sin=torch.rand(0, 32)),
         r"rows \(0\) must divide"),
        ("cos-device", _bad_tables(b, cos=cos.to("meta")), "must be on one device"),
        ("cos-overlaps-q", _bad_tables(
            b, q=qkv[:, :384].view(6, 3, 128), k=qkv[:, 384:640].view(6, 2, 128),
            cos=qkv[:3, 100:132], sin=qkv[:3, 800:832]), "cos overlaps q"),
        ("sections-2d-tables", _bad_tables(b, mrope_section=[8, 12, 12]),
         r"cos must be \[3, rows, rotary_dim/2\]"),
        ("sections-sum", _bad_tables(m, mrope_section=[8, 12, 11]),
         r"must sum to rotary_dim / 2 = 32"),
        ("sections-negative", _bad_tables(m, mrope_section=[-1, 21, 12]), "non-negative"),
        ("sections-two", _bad_tables(m, mrope_section=[16, 16]), "three non-negative"),
        ("streams-not-3", _bad_tables(m, cos=m.reads[0][:2], sin=m.reads[1][:2]),
         r"\[3, rows, rotary_dim/2\]"),
    ]


def _mrope_bad_inputs():
    case = TablesCase(num_tokens=6, rows=40, rotary_dim=64, mrope_section=(8, 12, 12),
                      positions="3xT", dtype=torch.float32)
    p = build(case)
    cache, pos = p.reads
    return [
        ("cache-int", _bad_mrope(p, cos_sin_cache=cache.to(torch.int32)),
         "cos_sin_cache must be floating point"),
        ("cache-width", _bad_mrope(p, cos_sin_cache=cache[:, :32]),
         r"cos_sin_cache must be \[max_position, rotary_dim=64\]"),
        ("pos-float", _bad_mrope(p, positions=pos.float()), "positions must be int32 or int64"),
        ("pos-shape", _bad_mrope(p, positions=pos[:2]), r"positions must be \[3, num_tokens=6\]"),
        ("pos-tokens", _bad_mrope(p, positions=pos[0, :5]), r"positions must be \[3, "),
        ("sections-sum", _bad_mrope(p, mrope_section=[16, 16, 16]), "must sum to rotary_dim"),
        ("pos-overlaps-k", _bad_mrope(p, positions=p.qkv[:, 384:387].view(torch.int32).t()),
         "positions overlaps k"),
        ("cache-overlaps-k", _bad_mrope(p, cos_sin_cache=p.qkv[:, 384:448]),
         "cos_sin_cache overlaps k"),
        ("pos-device", _bad_mrope(p, positions=pos.to("meta")), "must be on one device"),
        ("k-dtype", _bad_mrope(p, k=p.k.half()), "q and k must have the same dtype"),
    ]


def _cases(builder):
    return [pytest.param(fn, match, id=name) for name, fn, match in builder()]


@pytest.mark.parametrize(("call", "match"), _cases(_tables_bad_inputs))
def test_tables_bad_input(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "fused_qk_rope_with_cos_sin_tables_inplace" in str(err.value)


@pytest.mark.parametrize(("call", "match"), _cases(_mrope_bad_inputs))
def test_mrope_bad_input(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "fused_qk_mrope_with_cos_sin_cache_inplace" in str(err.value)


def test_bad_input_found_by_fake_at_trace_time():
    p = build(TablesCase(num_tokens=6, rows=3, rotary_dim=64, dtype=torch.float32))
    torch._dynamo.reset()

    def f(q, k, cos, sin):
        TABLES_OP(q, k, cos, sin, 64, True, None)

    with pytest.raises(Exception, match=r"rows \(4\) must divide"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(
            p.q, p.k, torch.rand(4, 32), torch.rand(4, 32))


def test_positions_out_of_range_cpu():
    p = build(TablesCase(num_tokens=4, rows=40, rotary_dim=64, mrope_section=(8, 12, 12),
                         positions="3xT", dtype=torch.float32))
    p.reads[1][2, 1] = 40
    before = p.qkv.clone()
    with pytest.raises(IndexError, match=r"positions must lie in \[0, 40\)"):
        MROPE_OP(*p.args())
    assert_same_bits(p.qkv, before, "qkv after a refused call")


# --------------------------------------------------------------------------------------------
# gradients (backward: the op again, with sin negated; full tables: sin's pair columns swapped
# and negated, the transpose of the forward's [[c_a, -s_a], [s_b, c_b]])


def _grad_problem(from_cache: bool, sections, rows=2, rot=8, head=8, text_only=False, seed=0,
                  full=False, is_neox=True, interleaved=False):
    g = torch.Generator().manual_seed(seed)
    t = 4
    q = torch.randn(t, 2, head, generator=g, dtype=torch.float64)
    k = torch.randn(t, 1, head, generator=g, dtype=torch.float64)
    lead = () if sections is None else (3,)
    if from_cache:
        cache = torch.rand(10, rot, generator=g, dtype=torch.float64) * 2 - 1
        pos = torch.randint(0, 10, (t,) if text_only else (*lead, t), generator=g)
        reads = (cache, pos)
    else:
        width = rot if full else rot // 2
        reads = tuple(torch.rand((*lead, rows, width), generator=g, dtype=torch.float64)
                      * 2 - 1 for _ in range(2))
    op = MROPE_OP if from_cache else TABLES_OP

    def fn(q, k):
        q, k = q * 1.0, k * 1.0  # non-leaves (a leaf that requires grad is refused)
        tail = (False, True) if interleaved else ()  # wrap_negative_positions, interleaved
        op(q[..., :rot], k[..., :rot], *reads, rot, is_neox,
           None if sections is None else list(sections), *tail)
        return q, k

    return fn, (q.requires_grad_(True), k.requires_grad_(True)), reads


@pytest.mark.parametrize(("from_cache", "sections", "rot", "interleaved"),
                         [(False, None, 8, False), (False, (1, 1, 1), 6, False),
                          (True, (1, 2, 1), 8, False), (True, (2, 0, 2), 8, False),
                          (True, (2, 1, 1), 8, True)],
                         ids=["tables", "tables-mrope-partial", "mrope-cache", "mrope-zero",
                              "mrope-interleaved"])
def test_gradcheck(from_cache, sections, rot, interleaved):
    fn, inputs, _ = _grad_problem(from_cache, sections, rot=rot, interleaved=interleaved)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize(("is_neox", "sections", "rot", "rows"),
                         [(True, None, 8, 2), (False, None, 8, 4), (True, None, 6, 1),
                          (True, (1, 1, 1), 6, 2), (False, (2, 0, 1), 6, 2)],
                         ids=["neox", "gptj", "neox-partial-R1", "neox-mrope-partial",
                              "gptj-mrope-partial"])
def test_gradcheck_full_tables(is_neox, sections, rot, rows):
    """Full tables with unequal halves: the forward is not a rotation, its backward the
    transpose (gradcheck in float64), and the gradient is HF's formula's own."""
    fn, inputs, (cos, sin) = _grad_problem(False, sections, rows=rows, rot=rot, full=True,
                                           is_neox=is_neox)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    if sections is None:
        turn = rotate_half if is_neox else rotate_every_two

        def hf(q, k):
            rows_of = torch.arange(q.shape[0]) % rows
            c, s = cos[rows_of][:, None], sin[rows_of][:, None]
            return tuple(torch.cat((x[..., :rot] * c + turn(x[..., :rot]) * s, x[..., rot:]),
                                   -1) for x in (q, k))

        assert_grads_match(fn, hf, inputs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_full_tables_compiled_with_backward(backend):
    """Full tables that are graph inputs, under torch.compile, forward and backward."""
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    torch._dynamo.reset()
    fn, inputs, _ = _grad_problem(False, None, rows=2, rot=8, full=True, is_neox=False)
    eager = torch.autograd.grad(sum(y.sin().sum() for y in fn(*inputs)), inputs)
    compiled_fn = torch.compile(fn, backend=backend, fullgraph=True)
    compiled = torch.autograd.grad(sum(y.sin().sum() for y in compiled_fn(*inputs)), inputs)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("which", ["cos", "sin"])
def test_table_requiring_grad_is_refused(which):
    fn, inputs, reads = _grad_problem(False, None)
    reads[0 if which == "cos" else 1].requires_grad_(True)
    with pytest.raises(RuntimeError, match=f"{which} requires grad"):
        fn(*inputs)


def test_text_positions_gradient():
    """positions [T] in the backward: its inverse table is read back as [T] too."""
    fn, inputs, (_, positions) = _grad_problem(True, (1, 2, 1), text_only=True)
    assert positions.dim() == 1
    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# GPUs


@pytest.mark.gpu
@pytest.mark.parametrize("apply", list(APPLIES.values()), ids=list(APPLIES))
@pytest.mark.parametrize("case", _params(ALL_CASES))
def test_gpu_ops(gpu_device, case, apply):
    run_and_check(case, apply, gpu_device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params(OPCHECK_CASES))
def test_gpu_opcheck(gpu_device, case):
    _assert_opcheck(build(case, gpu_device))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4097])
@pytest.mark.parametrize("from_cache", [False, True], ids=["tables", "mrope-cache"])
def test_gpu_llama_shapes(gpu_device, num_tokens, from_cache):
    """32 q heads, 8 kv heads, head 128, bf16. Tables: HF halves, rows broadcast over a batch
    of 17 (4097 = 17 * 241). Cache: 8192 rows, int32 positions [3, T]."""
    if from_cache:
        case = TablesCase(num_tokens=num_tokens, num_q_heads=32, num_kv_heads=8, rows=8192,
                          mrope_section=SECTIONS, positions="3xT", pos_dtype=torch.int32)
    else:
        case = TablesCase(num_tokens=num_tokens, num_q_heads=32, num_kv_heads=8,
                          rows=1 if num_tokens == 1 else 241, table_form="half")
    run_and_check(case, apply_op, gpu_device)


@pytest.mark.gpu
def test_gpu_lowering_launches_the_kernel(gpu_device):
    """Under torch.compile (inductor) the ops lower to the Triton kernel, launched from the
    generated code (no call through the dispatcher), with strided views of the tables passed
    as they are."""
    from torch._inductor.utils import run_and_get_code

    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    torch._dynamo.reset()

    def f(qkv, emb, freqs_cis, cache, positions):
        q, k, _ = qkv.split([3 * 128, 2 * 128, 2 * 128], -1)
        q, k = q.view(-1, 3, 128), k.view(-1, 2, 128)
        cos, sin = emb.cos(), emb.sin()  # [R, 128], HF style
        rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(
            q, k, cos[..., :64], sin[..., :64], 128, True)
        rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(
            q, k, freqs_cis[..., 0], freqs_cis[..., 1], 128, False)
        rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace(
            q, k, cache, positions, 128, True, [16, 24, 24])
        return qkv * 2

    p = build(TablesCase(positions="3xT", mrope_section=SECTIONS, dtype=torch.float32),
              gpu_device)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(3, 128, generator=g).to(gpu_device)
    freqs_cis = torch.randn(6, 64, 2, generator=g).to(gpu_device)
    eager_qkv = p.qkv.clone()
    eager = f(eager_qkv, emb, freqs_cis, *p.reads)
    out, code = run_and_get_code(torch.compile(f, fullgraph=True), p.qkv, emb, freqs_cis,
                                 *p.reads)
    source = "\n".join(code)
    assert "fused_qk_rope_tables_kernel" in source
    assert "torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace" not in source
    assert "torch.ops.rope_compile.fused_qk_mrope_with_cos_sin_cache_inplace" not in source
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.qkv, eager_qkv, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("from_cache", [False, True], ids=["tables", "mrope-cache"])
def test_gpu_gradients_match_cpu(gpu_device, from_cache):
    fn, (q, k), reads = _grad_problem(from_cache, (1, 2, 1), rot=8)
    grads_cpu = torch.autograd.grad(sum(x.sin().sum() for x in fn(q, k)), (q, k))
    moved = [x.to(gpu_device) for x in reads]
    qg, kg = (x.detach().to(gpu_device).float().requires_grad_(True) for x in (q, k))
    op = MROPE_OP if from_cache else TABLES_OP
    q2, k2 = qg * 1.0, kg * 1.0
    op(q2, k2, *(m.float() if m.dtype.is_floating_point else m for m in moved), 8, True,
       [1, 2, 1])
    grads_gpu = torch.autograd.grad(q2.sin().sum() + k2.sin().sum(), (qg, kg))
    for got, exp in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(got.cpu().double(), exp, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 4097])
def test_gpu_full_tables_llama_shapes(gpu_device, num_tokens, is_neox):
    """Full tables (halves unequal), 32 q heads, 8 kv heads, head 128, bf16, the [R, 128] of
    an HF [R, 256] buffer's slice, rows broadcast over a batch of 17."""
    case = TablesCase(num_tokens=num_tokens, num_q_heads=32, num_kv_heads=8, is_neox=is_neox,
                      rows=1 if num_tokens == 1 else 241, table_form="half", full=True)
    run_and_check(case, apply_op, gpu_device)


@pytest.mark.gpu
def test_gpu_full_tables_lowering(gpu_device):
    """Under torch.compile (inductor) full tables that are graph inputs (their halves differ)
    lower to the Triton kernel, launched from the generated code, and give HF's formula."""
    from torch._inductor.utils import run_and_get_code

    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    torch._dynamo.reset()

    def f(qkv, cos, sin, wide):
        q, k, _ = qkv.split([3 * 128, 2 * 128, 2 * 128], -1)
        q, k = q.view(-1, 3, 128), k.view(-1, 2, 128)
        rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(q, k, cos, sin, 128, True)
        rope_compile.fused_qk_rope_with_cos_sin_tables_inplace(  # strided views, GPT-J
            q, k, wide[..., :128], wide[..., 128:], 128, False)
        return qkv * 2

    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(6, 7 * 128, generator=g).to(gpu_device)
    cos, sin = (torch.randn(3, 128, generator=g).to(gpu_device) for _ in range(2))
    wide = torch.randn(2, 256, generator=g).to(gpu_device)
    rows3, rows2 = torch.arange(6) % 3, torch.arange(6) % 2
    exp = qkv.double().cpu().clone()
    for x in (exp[:, :384].view(6, 3, 128), exp[:, 384:640].view(6, 2, 128)):
        x.copy_(hf_full_tables_f64(x, cos.double().cpu()[rows3], sin.double().cpu()[rows3],
                                   128, True))
        x.copy_(hf_full_tables_f64(x, wide.double().cpu()[rows2, :128],
                                   wide.double().cpu()[rows2, 128:], 128, False))
    out, code = run_and_get_code(torch.compile(f, fullgraph=True), qkv, cos, sin, wide)
    source = "\n".join(code)
    assert "fused_qk_rope_tables_kernel" in source
    assert "torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace" not in source
    torch.testing.assert_close(qkv.double().cpu(), exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double().cpu(), exp * 2, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("sections", [None, (1, 2, 1)], ids=["one-stream", "mrope"])
def test_gpu_full_tables_gradients_match_cpu(gpu_device, is_neox, sections):
    fn, (q, k), reads = _grad_problem(False, sections, rot=8, full=True, is_neox=is_neox)
    grads_cpu = torch.autograd.grad(sum(x.sin().sum() for x in fn(q, k)), (q, k))
    qg, kg = (x.detach().to(gpu_device).float().requires_grad_(True) for x in (q, k))
    q2, k2 = qg * 1.0, kg * 1.0
    TABLES_OP(q2, k2, *(r.to(gpu_device).float() for r in reads), 8, is_neox,
              None if sections is None else list(sections))
    grads_gpu = torch.autograd.grad(q2.sin().sum() + k2.sin().sum(), (qg, kg))
    for got, exp in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(got.cpu().double(), exp, rtol=1e-4, atol=1e-4)
