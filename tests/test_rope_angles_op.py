"""The angles op (rope_compile/kernels/rope_tables.py, its ANGLES source).

``fused_qk_rope_with_angles_inplace(q, k, angles, cos_scale, sin_scale, table_dtype, rotary_dim,
is_neox, mrope_section=None)`` rotates q and k as the tables op does with the pair tables that a
model's elementwise chain computes from its angles (HF's ``freqs = inv_freq (x) positions``):
``cos = (cos(freqs) * cos_scale).to(table_dtype)``, ``sin`` likewise, computed in the kernel.

The oracle (float64) is built from that same chain run eagerly, as HF writes it
(``emb = cat(freqs, freqs)``, ``emb.cos() * attention_scaling``, ``.to(dtype)``), then HF's
``x * cos + rotate_half(x) * sin`` (``rotate_every_two`` with ``repeat_interleave`` tables for
GPT-J) in float64. The angles are realistic: positions up to 4095 times ``inv_freq`` of base
10000, mostly as HF makes them (a transposed view of an mm output), with R < T rows (a batch
sharing its positions), partial rotary, bf16/fp16/fp32 tables and mRoPE streams.

The CPU kernel computes its table with ``torch.cos``/``torch.sin``, exactly eager's chain: its
result is bit-identical to the tables op fed with the eager table. The Triton kernel uses
``tl.cos``/``tl.sin`` (what Inductor's own code for the chain uses); they may differ from
``torch.cos``/``torch.sin`` by an ulp of fp32, and Triton's interpreter rounds fp32 -> bf16
toward zero (GPUs round to nearest even), so its cos/sin are checked to lie within one ulp of the
table dtype of eager's, read back exactly through unit q vectors, and its results against the
oracle with that ulp's worth of slack.
"""

from __future__ import annotations

import math
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
    rotate_every_two,
    rotate_half,
    to_device_keeping_layout,
)

import rope_compile
from rope_compile import ops

ANGLES_OP = torch.ops.rope_compile.fused_qk_rope_with_angles_inplace.default
TABLES_OP = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_tables_inplace.default
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
SECTIONS = (16, 24, 24)
MAX_POSITION = 4096
YARN_SCALING = 0.1 * math.log(4.0) + 1.0  # HF's attention_scaling of YaRN with factor 4


# --------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class AnglesCase:
    num_tokens: int = 6
    num_q_heads: int = 3
    num_kv_heads: int = 2
    head_size: int = 128
    rotary_dim: int = 128
    is_neox: bool = True
    dtype: torch.dtype = torch.bfloat16
    table_dtype: torch.dtype = torch.bfloat16
    rows: int | None = None  # R, the angle rows (None: one per token)
    # "transposed": HF's (inv_freq[:, None] @ positions[None, :]).transpose (column-major);
    # "plain": contiguous; "sliced": the [..., :rot/2] of HF's emb = cat(freqs, freqs) (the other
    # half NaN); "expanded": one row, stride 0.
    form: str = "transposed"
    mrope_section: tuple[int, int, int] | None = None
    cos_scale: float = 1.0
    sin_scale: float = 1.0

    @property
    def id(self) -> str:
        parts = [f"T{self.num_tokens}", f"H{self.num_q_heads}-{self.num_kv_heads}",
                 f"D{self.head_size}r{self.rotary_dim}", "neox" if self.is_neox else "gptj",
                 str(self.dtype).removeprefix("torch."),
                 "tab-" + str(self.table_dtype).removeprefix("torch."), self.form]
        if self.rows is not None:
            parts.append(f"R{self.rows}")
        if self.mrope_section is not None:
            parts.append("mrope" + "-".join(map(str, self.mrope_section)))
        if (self.cos_scale, self.sin_scale) != (1.0, 1.0):
            parts.append(f"scale{self.cos_scale:.3g}-{self.sin_scale:.3g}")
        return "-".join(parts)


def hf_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """HF's default ``inv_freq`` (fp32)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base ** exponent)


def make_angles(case: AnglesCase, g) -> torch.Tensor:
    """fp32 angles ``[R, rot/2]`` (``[3, R, rot/2]`` with sections) in the case's form."""
    half = case.rotary_dim // 2
    streams = 1 if case.mrope_section is None else 3
    rows = case.num_tokens if case.rows is None else case.rows
    positions = torch.randint(0, MAX_POSITION, (streams, rows), generator=g)
    if rows >= 2:  # both ends of the range
        positions[:, 0], positions[:, -1] = 0, MAX_POSITION - 1
    pos = positions.float()
    inv_freq = hf_inv_freq(case.rotary_dim)
    plain = pos[:, :, None] * inv_freq  # [S, R, half]
    if case.form == "transposed":  # HF: (inv_freq_expanded @ position_ids_expanded).transpose
        angles = (inv_freq[None, :, None].expand(streams, half, 1) @ pos[:, None, :]).transpose(
            1, 2)
        assert angles.stride()[1:] == (1, rows) or rows <= 1
    elif case.form == "plain":
        angles = plain
    elif case.form == "sliced":
        emb = poison(torch.empty(streams, rows, 2 * half))
        emb[..., :half] = plain
        angles = emb[..., :half]
    elif case.form == "expanded":
        angles = plain[:, rows // 2:rows // 2 + 1].expand(streams, rows, half)  # not row 0
    else:
        raise ValueError(case.form)
    return angles if case.mrope_section is not None else angles[0]


def eager_tables(angles, cos_scale, sin_scale, table_dtype, rotary_dim, is_neox):
    """The model's chain, eagerly: HF's ``emb = cat(freqs, freqs)`` (GPT-J style:
    ``repeat_interleave(freqs, 2)``), ``(emb.cos() * scaling).to(dtype)``; full ``[..., rot]``
    tables and the pair tables ``[..., rot/2]`` they repeat."""
    a = angles.detach().cpu()
    emb = torch.cat((a, a), dim=-1) if is_neox else a.repeat_interleave(2, dim=-1)
    cos = (emb.cos() * cos_scale).to(table_dtype)
    sin = (emb.sin() * sin_scale).to(table_dtype)
    first, _ = pair_indices(rotary_dim, is_neox)
    return (cos, sin), (cos[..., first], sin[..., first])


def per_token(table: torch.Tensor, case: AnglesCase, num_tokens: int) -> torch.Tensor:
    """``[T, rot]`` float64: token t's row ``t % R`` of a full table, each feature from its
    pair's mRoPE stream."""
    table = table.to(torch.float64)
    rows = torch.arange(num_tokens) % max(table.shape[-2], 1)
    if case.mrope_section is None:
        return table[rows]
    half = case.rotary_dim // 2
    s0, s1, _ = case.mrope_section
    stream_of_pair = torch.tensor([0 if i < s0 else 1 if i < s0 + s1 else 2 for i in range(half)])
    stream = stream_of_pair.repeat(2) if case.is_neox else stream_of_pair.repeat_interleave(2)
    return table[stream[None, :], rows[:, None], torch.arange(case.rotary_dim)[None, :]]


def hf_f64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
           is_neox: bool) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` in float64, cos/sin ``[T, rot]`` over heads."""
    x64 = x.detach().cpu().to(torch.float64)
    rot = x64[..., :rotary_dim]
    turn = rotate_half if is_neox else rotate_every_two
    out = rot * cos[:, None, :] + turn(rot) * sin[:, None, :]
    return torch.cat((out, x64[..., rotary_dim:]), dim=-1)


def table_ulp(case: AnglesCase) -> float:
    """One ulp of the table dtype at the largest |cos|/|sin| (|scale|): what the Triton kernel's
    cos/sin may differ by from eager's (tl.cos vs torch.cos may differ by an fp32 ulp, which
    moves the rounding to the table dtype by at most one of its ulps; the interpreter rounds
    to bf16 toward zero). An fp32 table keeps that fp32 ulp, times a scale: two ulps."""
    top = max(abs(case.cos_scale), abs(case.sin_scale))
    eps = torch.finfo(case.table_dtype).eps
    ulps = 2 if case.table_dtype == torch.float32 and top != 1.0 else 1
    return ulps * eps * 2.0 ** math.floor(math.log2(top))


@dataclass
class Problem:
    case: AnglesCase
    q: torch.Tensor
    k: torch.Tensor
    qkv: torch.Tensor
    angles: torch.Tensor
    cos_full: torch.Tensor  # the eager chain's tables [.., R, rot] (table dtype, CPU)
    sin_full: torch.Tensor
    cos_pair: torch.Tensor  # their pair columns [.., R, rot/2]: the tables op's input
    sin_pair: torch.Tensor

    def args(self, q=None, k=None) -> tuple:
        c = self.case
        q, k = (self.q, self.k) if q is None else (q, k)
        sections = None if c.mrope_section is None else list(c.mrope_section)
        return (q, k, self.angles, c.cos_scale, c.sin_scale, c.table_dtype, c.rotary_dim,
                c.is_neox, sections)

    def tables_args(self) -> tuple:
        """The tables op's arguments with the eager chain's pair tables."""
        c = self.case
        device = self.q.device
        sections = None if c.mrope_section is None else list(c.mrope_section)
        return (self.q, self.k, self.cos_pair.to(device), self.sin_pair.to(device),
                c.rotary_dim, c.is_neox, sections)


def build(case: AnglesCase, device="cpu", seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    t, rot = case.num_tokens, case.rotary_dim
    q, k, _, qkv = make_qkv(t, case.num_q_heads, case.num_kv_heads, case.head_size, case.dtype,
                            generator=g)
    poison(q[..., rot:])
    poison(k[..., rot:])
    angles = make_angles(case, g)
    (cos_full, sin_full), (cos_pair, sin_pair) = eager_tables(
        angles, case.cos_scale, case.sin_scale, case.table_dtype, rot, case.is_neox)
    qkv = qkv.to(device)
    q = qkv.as_strided(q.shape, q.stride(), q.storage_offset())
    k = qkv.as_strided(k.shape, k.stride(), k.storage_offset())
    return Problem(case, q, k, qkv, to_device_keeping_layout(angles, device), cos_full,
                   sin_full, cos_pair, sin_pair)


def expected(p: Problem, x: torch.Tensor) -> torch.Tensor:
    t = x.shape[0]
    c = p.case
    return hf_f64(x, per_token(p.cos_full, c, t), per_token(p.sin_full, c, t), c.rotary_dim,
                  c.is_neox)


def pair_slack(p: Problem, x: torch.Tensor, ulp: float) -> torch.Tensor:
    """``(|x_a| + |x_b|) * ulp`` at both features of each pair: what a cos/sin off by ``ulp``
    moves the rotated pair by."""
    x64 = x.detach().cpu().to(torch.float64)[..., :p.case.rotary_dim]
    first, second = pair_indices(p.case.rotary_dim, p.case.is_neox)
    both = x64[..., first].abs() + x64[..., second].abs()
    slack = torch.empty_like(x64)
    slack[..., first] = both * ulp
    slack[..., second] = both * ulp
    return slack


def assert_within(got, exp, dtype, slack=None) -> None:
    """``|got - exp| <= atol + rtol |exp| + slack`` elementwise (float64, CPU)."""
    tol = TOLERANCES[dtype]
    got, exp = got.detach().cpu().to(torch.float64), exp.to(torch.float64)
    bound = tol["atol"] + tol["rtol"] * exp.abs() + (0 if slack is None else slack)
    excess = (got - exp).abs() - bound
    assert not excess.isnan().any(), "NaN in the rotated region"
    assert (excess <= 0).all(), (
        f"{int((excess > 0).sum())} elements off, worst by {float(excess.max()):.3g} over the "
        f"bound")


def run_and_check(case: AnglesCase, apply: Callable[[Problem], object], device="cpu",
                  slack_ulp: float = 0.0) -> Problem:
    p = build(case, device)
    rot = case.rotary_dim
    exp_q, exp_k = expected(p, p.q), expected(p, p.k)
    slack_q, slack_k = pair_slack(p, p.q, slack_ulp), pair_slack(p, p.k, slack_ulp)
    before = p.qkv.clone()
    angles_before = p.angles.clone()
    if case.num_tokens:  # not vacuous: the oracle moves the rotated region
        assert not torch.equal(exp_q[..., :rot], p.q[..., :rot].double().cpu())

    assert apply(p) is None, "in-place ops return None"

    rotated = torch.zeros(p.qkv.shape, dtype=torch.bool)
    for x, exp, slack in ((p.q, exp_q, slack_q), (p.k, exp_k, slack_k)):
        rotated.as_strided(x.shape, x.stride(), x.storage_offset())[..., :rot] = True
        assert_within(x[..., :rot], exp[..., :rot], case.dtype, slack)
    assert_same_bits(p.qkv.cpu()[~rotated], before.cpu()[~rotated], "q/k tails and v")
    assert_same_bits(p.angles, angles_before, "angles")
    return p


# --------------------------------------------------------------------------------------------
# ways to call (each rotates p.q and p.k in place)


def apply_op(p: Problem):
    return ANGLES_OP(*p.args())


def apply_public(p: Problem):
    if p.case.mrope_section is None:  # the optional argument left out
        return rope_compile.fused_qk_rope_with_angles_inplace(*p.args()[:8])
    return rope_compile.fused_qk_rope_with_angles_inplace(*p.args())


def apply_launcher(p: Problem):
    from rope_compile.kernels import rope_tables

    rot = p.case.rotary_dim
    return rope_tables.launch_qk_rope_angles(p.q[..., :rot], p.k[..., :rot], *p.args()[2:])


def apply_gpu_kernel(p: Problem):
    """The op's CUDA/XPU kernel (validation + launcher) on whole heads."""
    return ops._qk_rope_angles_triton(*p.args())


APPLIES = {"op": apply_op, "public": apply_public}
TRITON_APPLIES = {"launcher": apply_launcher, "gpu-kernel": apply_gpu_kernel}

CASES = [
    AnglesCase(num_tokens=7),  # odd T, one row per token, HF's transposed mm
    AnglesCase(rows=3, is_neox=False, rotary_dim=64, dtype=torch.float16,
               table_dtype=torch.float16),  # partial rotary, GPT-J, a batch of 2 sharing rows
    AnglesCase(rows=2, form="sliced", dtype=torch.float32, table_dtype=torch.float32,
               num_kv_heads=1),
    AnglesCase(rows=2, form="plain", dtype=torch.float32, table_dtype=torch.bfloat16,
               cos_scale=YARN_SCALING, sin_scale=YARN_SCALING),  # fp32 q, bf16 tables, YaRN
    AnglesCase(form="expanded", rotary_dim=96, table_dtype=torch.float16),
    AnglesCase(rows=1, num_q_heads=1, num_kv_heads=1, head_size=64, rotary_dim=32),  # decode
    AnglesCase(num_q_heads=1, num_kv_heads=3, rotary_dim=64, is_neox=False,
               dtype=torch.float32, table_dtype=torch.float32, cos_scale=0.5, sin_scale=-2.0),
    AnglesCase(mrope_section=SECTIONS, num_tokens=5),
    AnglesCase(mrope_section=(8, 12, 12), rotary_dim=64, is_neox=False, form="sliced", rows=3,
               dtype=torch.float16, table_dtype=torch.float32),
    AnglesCase(mrope_section=(0, 64, 0), rows=2, form="plain", dtype=torch.float32,
               table_dtype=torch.bfloat16),
    AnglesCase(num_tokens=0),
    AnglesCase(num_tokens=0, rows=0, mrope_section=SECTIONS),
]


def _params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


# --------------------------------------------------------------------------------------------
# results


@pytest.mark.parametrize("apply", list(APPLIES.values()), ids=list(APPLIES))
@pytest.mark.parametrize("case", _params(CASES))
def test_ops_cpu(case, apply):
    run_and_check(case, apply)


@pytest.mark.parametrize("case", _params(CASES))
def test_cpu_op_is_the_tables_op_on_the_eager_table(case):
    """The CPU kernel computes the table as eager does: bit for bit the tables op's result."""
    a, b = build(case), build(case)
    ANGLES_OP(*a.args())
    TABLES_OP(*b.tables_args())
    assert_same_bits(a.qkv, b.qkv, "the angles op against the tables op on eager's table")


@pytest.mark.skipif(not TRITON_ON_CPU and GPU_DEVICE is None, reason="no Triton device")
@pytest.mark.parametrize("apply", list(TRITON_APPLIES.values()), ids=list(TRITON_APPLIES))
@pytest.mark.parametrize("case", _params(CASES))
def test_triton_kernel(case, apply):
    """The Triton kernel: under the interpreter on CPU tensors, compiled on a GPU; its cos/sin
    may be an ulp of the table dtype off eager's (see the module docstring)."""
    run_and_check(case, apply, GPU_DEVICE or "cpu", slack_ulp=table_ulp(case))


@pytest.mark.skipif(not TRITON_ON_CPU and GPU_DEVICE is None, reason="no Triton device")
@pytest.mark.parametrize("case", _params(CASES[:4] + CASES[7:9]))
def test_triton_kernel_is_the_tables_op_on_the_eager_table(case):
    """The Triton kernel against the tables op's Triton kernel fed with eager's table: within
    what one ulp of the table dtype in cos/sin (and the one rounding to q's dtype) allows."""
    device = GPU_DEVICE or "cpu"
    a, b = build(case, device), build(case, device)
    slack = pair_slack(a, a.q, table_ulp(case)), pair_slack(a, a.k, table_ulp(case))
    ops._qk_rope_angles_triton(*a.args())
    ops._qk_rope_tables_triton(*b.tables_args())
    rot = case.rotary_dim
    for x, y, s in ((a.q, b.q, slack[0]), (a.k, b.k, slack[1])):
        assert_within(x[..., :rot], y[..., :rot].cpu().double(), case.dtype, s)
    assert_same_bits(a.qkv[..., -1], b.qkv[..., -1], "v's last feature")


def _probe(case: AnglesCase, kernel: str):
    """q = k = unit pairs (x_a, x_b) = (1, 0), fp32: the op writes out_a = c and out_b = s
    exactly (1 * c - 0 * s, 0 * c + 1 * s). ``kernel``: "cpu" (the op on CPU tensors) or
    "triton" (the Triton kernel: interpreter or GPU). Returns the kernel's (c, s) and eager's,
    ``[T, rot/2]`` float64."""
    g = torch.Generator().manual_seed(1)
    angles = make_angles(case, g)
    t, rot = case.num_tokens, case.rotary_dim
    first, second = pair_indices(rot, case.is_neox)
    device = "cpu" if kernel == "cpu" else GPU_DEVICE or "cpu"
    q = torch.zeros(t, 1, rot)
    q[..., first] = 1.0
    q, k = q.to(device), q.clone().to(device)
    sections = None if case.mrope_section is None else list(case.mrope_section)
    args = (q, k, angles.to(device), case.cos_scale, case.sin_scale, case.table_dtype, rot,
            case.is_neox, sections)
    (ANGLES_OP if kernel == "cpu" else ops._qk_rope_angles_triton)(*args)
    (cos, sin), _ = eager_tables(angles, case.cos_scale, case.sin_scale, case.table_dtype, rot,
                                 case.is_neox)
    eager = [per_token(x, case, t)[:, first] for x in (cos, sin)]
    out = q.cpu().double()[:, 0]
    assert torch.equal(k.cpu().double()[:, 0], out)
    return (out[:, first], out[:, second]), eager


PROBE_CASES = [
    AnglesCase(num_tokens=64, rows=32, table_dtype=torch.bfloat16),
    AnglesCase(num_tokens=64, table_dtype=torch.float16, is_neox=False),
    AnglesCase(num_tokens=64, table_dtype=torch.float32, form="plain"),
    AnglesCase(num_tokens=32, table_dtype=torch.bfloat16, cos_scale=YARN_SCALING,
               sin_scale=YARN_SCALING),
    AnglesCase(num_tokens=32, table_dtype=torch.float32, cos_scale=YARN_SCALING,
               sin_scale=-YARN_SCALING),
    AnglesCase(num_tokens=32, rows=16, table_dtype=torch.bfloat16, mrope_section=SECTIONS),
]


@pytest.mark.skipif(not TRITON_ON_CPU and GPU_DEVICE is None, reason="no Triton device")
@pytest.mark.parametrize("case", _params(PROBE_CASES))
def test_triton_cos_sin_within_one_ulp_of_eager(case):
    """The kernel's cos/sin, read back exactly, are values of the table dtype within one of its
    ulps of eager's chain (tl.cos / torch.cos may differ by an fp32 ulp; fp32 tables with a
    scale: two, see table_ulp), and most are equal (not vacuous)."""
    (c, s), (eager_c, eager_s) = _probe(case, "triton")
    for got, exp in ((c, eager_c), (s, eager_s)):
        assert torch.equal(got.to(case.table_dtype).double(), got), "not a table-dtype value"
        assert (got - exp).abs().max() <= table_ulp(case)
        assert (got == exp).double().mean() > 0.4


@pytest.mark.parametrize("case", _params(PROBE_CASES))
def test_cpu_cos_sin_are_eager(case):
    (c, s), (eager_c, eager_s) = _probe(case, "cpu")
    assert torch.equal(c, eager_c) and torch.equal(s, eager_s)


def test_launch_description_matches_the_kernel_signature():
    from rope_compile.kernels import rope_tables

    tl = pytest.importorskip("triton.language")
    kernel = rope_tables.fused_qk_rope_tables_kernel
    names = list(getattr(kernel, "arg_names", None) or getattr(kernel, "fn", kernel).arg_names)
    shape = rope_tables.launch_shape(7, 4, 2, 128, True, "cuda", 2, from_cache=False,
                                     mrope_section=SECTIONS, angles_table_dtype=torch.bfloat16)
    assert names == [*rope_tables.RUNTIME_ARGS, *shape.constexprs]
    assert shape.constexprs["FROM_ANGLES"] is True
    assert shape.constexprs["TABLE_DTYPE"] == tl.bfloat16
    assert not shape.constexprs["FROM_CACHE"] and not shape.constexprs["FULL_TABLES"]
    tables = rope_tables.launch_shape(7, 4, 2, 128, True, "cuda", 2, from_cache=False)
    assert tables.constexprs["FROM_ANGLES"] is False
    assert list(tables.constexprs) == list(shape.constexprs)
    args = rope_tables.angles_runtime_args("q", "k", "a", q_stride=(9, 8, 1), k_stride=(7, 6, 1),
                                           angles_size=(5, 64), angles_stride=(1, 5),
                                           num_q_heads=4, num_k_heads=2, cos_scale=0.5,
                                           sin_scale=-0.5)
    assert list(args) == list(rope_tables.RUNTIME_ARGS)
    assert (args["cos_ptr"], args["sin_ptr"]) == ("a", "a")
    assert (args["cos_row_stride"], args["cos_col_stride"], args["sin_col_stride"]) == (1, 5, 5)
    assert (args["num_rows"], args["cos_scale"], args["sin_scale"]) == (5, 0.5, -0.5)
    for bad in ({"from_cache": True}, {"from_cache": False, "full_tables": True}):
        with pytest.raises(ValueError, match="ANGLES source"):
            rope_tables.launch_shape(7, 4, 2, 128, True, "cuda", 2, **bad,
                                     angles_table_dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# opcheck, schema

OPCHECK_CASES = [CASES[1], CASES[3], CASES[6], CASES[8], CASES[10], CASES[11]]


def _assert_opcheck(p: Problem):
    result = torch.library.opcheck(ANGLES_OP, p.args())
    assert result == dict.fromkeys(result, "SUCCESS"), result
    assert set(result) >= {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"}


@pytest.mark.parametrize("case", _params(OPCHECK_CASES))
def test_opcheck_cpu(case):
    _assert_opcheck(build(case))


def test_schema_and_names():
    schema = str(ANGLES_OP._schema)
    assert schema == (
        "rope_compile::fused_qk_rope_with_angles_inplace(Tensor(a0!) q, Tensor(a1!) k, "
        "Tensor angles, float cos_scale, float sin_scale, ScalarType table_dtype, "
        "int rotary_dim, bool is_neox, int[]? mrope_section=None) -> ()")
    for key in ("CPU", "CUDA", "XPU", "Meta", "Autograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(ANGLES_OP._schema.name, key), key
    assert ANGLES_OP._schema.name == rope_compile.ANGLES_OP_NAME
    assert "fused_qk_rope_with_angles_inplace" in rope_compile.__all__


# --------------------------------------------------------------------------------------------
# under torch.compile (CPU: the op stays a call; GPUs: see the lowering test below)


def _hf_freqs(inv_freq, position_ids):
    """HF's ``freqs``: ``(inv_freq_expanded @ position_ids_expanded).transpose(1, 2)`` [B, S, n]."""
    inv = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    return (inv @ position_ids[:, None, :].float()).transpose(1, 2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_on_qkv_views(backend):
    """HF's freqs computed in the graph (a transposed mm output) and read by the op."""
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    torch._dynamo.reset()

    def f(qkv, inv_freq, position_ids):
        q, k, _ = qkv.split([3 * 128, 2 * 128, 2 * 128], -1)
        q, k = q.view(-1, 3, 128), k.view(-1, 2, 128)
        freqs = _hf_freqs(inv_freq, position_ids)[0]  # [S, 64], rows shared by a batch of 2
        rope_compile.fused_qk_rope_with_angles_inplace(q, k, freqs, YARN_SCALING, YARN_SCALING,
                                                       torch.bfloat16, 128, True)
        rope_compile.fused_qk_rope_with_angles_inplace(q, k, freqs[:, :32], 1.0, 1.0,
                                                       torch.float32, 64, False)
        return qkv * 2

    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(6, 7 * 128, generator=g)
    position_ids = torch.randint(0, MAX_POSITION, (1, 3), generator=g)
    inv_freq = hf_inv_freq(128)
    eager_qkv = qkv.clone()
    eager = f(eager_qkv, inv_freq, position_ids)
    compiled = torch.compile(f, backend=backend, fullgraph=True)(qkv, inv_freq, position_ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv, eager_qkv, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# bad input


_ARG_NAMES = ("q", "k", "angles", "cos_scale", "sin_scale", "table_dtype", "rotary_dim",
              "is_neox", "mrope_section")


def _bad(p: Problem, **changes):
    args = dict(zip(_ARG_NAMES, p.args(), strict=True))
    args.update(changes)
    return lambda: ANGLES_OP(*args.values())


def _bad_inputs():
    base = AnglesCase(num_tokens=6, rows=3, rotary_dim=64, dtype=torch.float32)
    mrope = AnglesCase(num_tokens=6, rows=3, rotary_dim=64, mrope_section=(8, 12, 12),
                       dtype=torch.float32)
    b, m = build(base), build(mrope)
    a = b.angles
    qkv = torch.randn(6, 7 * 128)
    return [
        ("q-2d", _bad(b, q=b.q[:, 0]), r"q must be a \[num_tokens"),
        ("k-dtype", _bad(b, k=b.k.double()), "q and k must have the same dtype"),
        ("rot-odd", _bad(b, rotary_dim=63), "rotary_dim must be a positive even"),
        ("rot-too-big", _bad(b, rotary_dim=130, angles=torch.rand(3, 65)),
         "must not exceed q's head size"),
        ("qk-overlap", _bad(b, k=b.q[:, :2]), "q and k overlap"),
        ("angles-f64", _bad(b, angles=a.double()), "angles must be a float32 tensor"),
        ("angles-bf16", _bad(b, angles=a.bfloat16()), "angles must be a float32 tensor"),
        ("angles-int", _bad(b, angles=a.int()), "angles must be a float32 tensor"),
        ("angles-full-width", _bad(b, angles=torch.rand(3, 64)),
         r"angles must be \[rows, rotary_dim/2 = 32\], got shape \(3, 64\)"),
        ("angles-3d", _bad(b, angles=a[None]), r"angles must be \[rows, rotary_dim/2 = 32\]"),
        ("angles-1d", _bad(b, angles=a[0]), r"angles must be \[rows, rotary_dim/2 = 32\]"),
        ("sections-2d-angles", _bad(b, mrope_section=[8, 12, 12]),
         r"angles must be \[3, rows, rotary_dim/2 = 32\] \(mrope_section given\)"),
        ("streams-not-3", _bad(m, angles=m.angles[:2]), r"angles must be \[3, rows, "),
        ("sections-sum", _bad(m, mrope_section=[8, 12, 11]), r"must sum to rotary_dim / 2 = 32"),
        ("sections-two", _bad(m, mrope_section=[16, 16]), "three non-negative"),
        ("rows", _bad(b, angles=torch.rand(4, 32)),
         r"angle rows \(4\) must divide the number of tokens \(6\)"),
        ("rows-zero", _bad(b, angles=torch.rand(0, 32)), r"angle rows \(0\) must divide"),
        ("cos-scale-nan", _bad(b, cos_scale=float("nan")), "cos_scale must be a finite number"),
        ("sin-scale-inf", _bad(b, sin_scale=float("-inf")), "sin_scale must be a finite number"),
        ("table-f64", _bad(b, table_dtype=torch.float64), "table_dtype must be one of"),
        ("table-int", _bad(b, table_dtype=torch.int32), "table_dtype must be one of"),
        ("angles-device", _bad(b, angles=a.to("meta")), "must be on one device"),
        ("angles-overlaps-q", _bad(b, q=qkv[:, :384].view(6, 3, 128),
                                   k=qkv[:, 384:640].view(6, 2, 128), angles=qkv[:3, 100:132]),
         "angles overlaps q"),
        ("angles-overlaps-k", _bad(b, q=qkv[:, :384].view(6, 3, 128),
                                   k=qkv[:, 384:640].view(6, 2, 128), angles=qkv[:3, 400:432]),
         "angles overlaps k"),
    ]


@pytest.mark.parametrize(("call", "match"),
                         [pytest.param(fn, match, id=name) for name, fn, match in _bad_inputs()])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "fused_qk_rope_with_angles_inplace" in str(err.value)


def test_angles_beside_the_rotated_part_are_fine():
    """angles in q's unrotated tail (partial rotary) share no element the op writes."""
    qkv = torch.randn(6, 7 * 128)
    q, k = qkv[:, :384].view(6, 3, 128), qkv[:, 384:640].view(6, 2, 128)
    angles = qkv[:3, 96:128]  # q head 0, features 96..127: outside the rotated [:64]
    before = angles.clone()
    ANGLES_OP(q, k, angles, 1.0, 1.0, torch.float32, 64, True, None)
    assert_same_bits(angles, before, "angles in q's tail")


def test_bad_input_found_by_fake_at_trace_time():
    p = build(AnglesCase(num_tokens=6, rows=3, rotary_dim=64, dtype=torch.float32))
    torch._dynamo.reset()

    def f(q, k, angles):
        ANGLES_OP(q, k, angles, 1.0, 1.0, torch.bfloat16, 64, True, None)

    with pytest.raises(Exception, match=r"angle rows \(4\) must divide"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(p.q, p.k, torch.rand(4, 32))


# --------------------------------------------------------------------------------------------
# gradients: the op again with sin_scale negated (the rounding to the table dtype is odd, so the
# table's sin is exactly negated: the transpose of the rotation)


def _grad_problem(sections=None, table_dtype=torch.float32, is_neox=True, rows=2, rot=8,
                  head=8, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 4
    q = torch.randn(t, 2, head, generator=g, dtype=torch.float64)
    k = torch.randn(t, 1, head, generator=g, dtype=torch.float64)
    lead = () if sections is None else (3,)
    angles = torch.rand((*lead, rows, rot // 2), generator=g) * MAX_POSITION * hf_inv_freq(rot)

    def fn(q, k):
        q, k = q * 1.0, k * 1.0  # non-leaves (a leaf that requires grad is refused)
        ANGLES_OP(q[..., :rot], k[..., :rot], angles, scale, scale, table_dtype, rot, is_neox,
                  None if sections is None else list(sections))
        return q, k

    return fn, (q.requires_grad_(True), k.requires_grad_(True)), angles


GRAD_CASES = [(None, torch.float32, True, 8), (None, torch.bfloat16, False, 8),
              ((1, 1, 1), torch.float16, True, 6), ((2, 0, 1), torch.bfloat16, False, 6)]


@pytest.mark.parametrize(("sections", "table_dtype", "is_neox", "rot"), GRAD_CASES,
                         ids=["fp32-neox", "bf16-gptj", "fp16-mrope-partial",
                              "bf16-gptj-mrope-partial"])
def test_gradcheck(sections, table_dtype, is_neox, rot):
    """float64 q/k (the op is linear in them; its table, fp32 math rounded to table_dtype, is a
    constant of the gradient): gradcheck, gradgradcheck, and HF's formula's own gradient on the
    eager chain's table."""
    fn, inputs, angles = _grad_problem(sections, table_dtype, is_neox, rot=rot,
                                       scale=YARN_SCALING)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    case = AnglesCase(rotary_dim=rot, is_neox=is_neox, mrope_section=sections,
                      table_dtype=table_dtype, cos_scale=YARN_SCALING, sin_scale=YARN_SCALING)
    (cos, sin), _ = eager_tables(angles, YARN_SCALING, YARN_SCALING, table_dtype, rot, is_neox)

    def hf(q, k):
        c, s = per_token(cos, case, q.shape[0]), per_token(sin, case, q.shape[0])
        turn = rotate_half if is_neox else rotate_every_two
        return tuple(torch.cat((x[..., :rot] * c[:, None] + turn(x[..., :rot]) * s[:, None],
                                x[..., rot:]), -1) for x in (q, k))

    assert_grads_match(fn, hf, inputs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_with_backward(backend):
    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    torch._dynamo.reset()
    fn, inputs, _ = _grad_problem((1, 2, 1), torch.bfloat16, is_neox=False, scale=YARN_SCALING)
    eager = torch.autograd.grad(sum(y.sin().sum() for y in fn(*inputs)), inputs)
    compiled_fn = torch.compile(fn, backend=backend, fullgraph=True)
    compiled = torch.autograd.grad(sum(y.sin().sum() for y in compiled_fn(*inputs)), inputs)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_angles_requiring_grad_is_refused():
    fn, inputs, angles = _grad_problem()
    angles.requires_grad_(True)
    with pytest.raises(RuntimeError, match="angles requires grad"):
        fn(*inputs)


def test_leaf_requiring_grad_is_refused():
    q = torch.randn(4, 2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="q is a leaf tensor that requires grad"):
        ANGLES_OP(q, torch.randn(4, 1, 8), torch.rand(2, 4), 1.0, 1.0, torch.float32, 8, True,
                  None)


# --------------------------------------------------------------------------------------------
# GPUs (python -m pytest -q -m gpu tests/test_rope_angles_op.py)


@pytest.mark.gpu
@pytest.mark.parametrize("apply", list(APPLIES.values()), ids=list(APPLIES))
@pytest.mark.parametrize("case", _params(CASES))
def test_gpu_ops(gpu_device, case, apply):
    run_and_check(case, apply, gpu_device, slack_ulp=table_ulp(case))


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params(OPCHECK_CASES))
def test_gpu_opcheck(gpu_device, case):
    _assert_opcheck(build(case, gpu_device))


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1.0, YARN_SCALING], ids=["default", "yarn"])
@pytest.mark.parametrize("num_tokens", [1, 4097])
def test_gpu_llama_shapes(gpu_device, num_tokens, scale):
    """32 q heads, 8 kv heads, head 128, bf16 q/k and tables, HF's transposed freqs with rows
    shared by a batch of 17 (4097 = 17 * 241)."""
    case = AnglesCase(num_tokens=num_tokens, num_q_heads=32, num_kv_heads=8,
                      rows=1 if num_tokens == 1 else 241, cos_scale=scale, sin_scale=scale)
    run_and_check(case, apply_op, gpu_device, slack_ulp=table_ulp(case))


def _hf_attention_prologue(qkv, inv_freq, position_ids, scaling):
    """HF Llama's RoPE, as plain Inductor compiles it: the rotary module's table chain, then
    ``q * cos + rotate_half(q) * sin`` on q/k ``[B, H, S, D]``."""
    b, s = position_ids.shape
    q, k, _ = qkv.split([3 * 128, 2 * 128, 2 * 128], -1)
    q = q.view(b, s, 3, 128).transpose(1, 2)
    k = k.view(b, s, 2, 128).transpose(1, 2)
    freqs = _hf_freqs(inv_freq, position_ids)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(qkv.dtype)[:, None]
    sin = (emb.sin() * scaling).to(qkv.dtype)[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _angles_prologue(qkv, inv_freq, position_ids, scaling):
    b, s = position_ids.shape
    qkv = qkv.clone()
    q, k, _ = qkv.split([3 * 128, 2 * 128, 2 * 128], -1)
    q, k = q.reshape(b * s, 3, 128), k.reshape(b * s, 2, 128)
    freqs = _hf_freqs(inv_freq, position_ids)[0]  # [S, 64]: rows shared by the batch
    rope_compile.fused_qk_rope_with_angles_inplace(q, k, freqs, scaling, scaling, qkv.dtype,
                                                   128, True)
    return (q.view(b, s, 3, 128).transpose(1, 2), k.view(b, s, 2, 128).transpose(1, 2))


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    mag = x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(mag)))


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", [1.0, YARN_SCALING], ids=["default", "yarn"])
def test_gpu_lowering_launches_the_kernel(gpu_device, scaling):
    """Under torch.compile (inductor) the op lowers to the tables kernel, launched from the
    generated code (no call through torch.ops.rope_compile) with HF's freqs (a transposed mm
    output) passed as its view; the result is the eager op's bit for bit and, within one bf16
    table ulp times |x| plus an output ulp, plain Inductor's code for HF's chain (see the
    bound below)."""
    from torch._inductor.utils import run_and_get_code

    from rope_compile.inductor_lowering import register_inductor_lowering

    register_inductor_lowering()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    b, s = 2, 37
    qkv = torch.randn(b, s, 7 * 128, generator=g).to(torch.bfloat16).to(gpu_device)
    position_ids = (torch.arange(s) + 4000)[None].expand(b, s).contiguous().to(gpu_device)
    inv_freq = hf_inv_freq(128).to(gpu_device)

    eager_q, eager_k = _angles_prologue(qkv, inv_freq, position_ids, scaling)
    (q, k), code = run_and_get_code(torch.compile(_angles_prologue, fullgraph=True), qkv,
                                    inv_freq, position_ids, scaling)
    source = "\n".join(code)
    assert "fused_qk_rope_tables_kernel" in source
    assert "torch.ops.rope_compile" not in source
    torch.testing.assert_close(q, eager_q, rtol=0, atol=0)
    torch.testing.assert_close(k, eager_k, rtol=0, atol=0)

    torch._dynamo.reset()
    plain_q, plain_k = torch.compile(_hf_attention_prologue, fullgraph=True)(
        qkv, inv_freq, position_ids, scaling)
    # HF's angles come from an fp32 matmul (inv_freq @ positions), the kernel's from
    # pos * inv_freq: near 4000 rad they may differ by an fp32 ulp (2.4e-4), enough to flip the
    # bf16 rounding of a table entry (one ulp <= 2^-8 * scaling for |cos|, |sin| <= scaling).
    # So the bound: one table ulp times |x1| + |x2| <= 2 max|x|, plus an ulp of the output.
    # Measured on the H200: 0.0156 (default), 0.0312 (yarn), with max|x| ~ 4.5.
    table_error = 2.0 * qkv.float().abs().max().item() * 2.0 ** -8 * scaling
    for got, ref in ((q, plain_q), (k, plain_k)):
        got, ref = got.float().cpu(), ref.float().cpu()
        bound = _ulp_bf16(torch.maximum(got.abs(), ref.abs())) + table_error
        assert ((got - ref).abs() <= bound).all(), (got - ref).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("sections", [None, (1, 2, 1)], ids=["one-stream", "mrope"])
def test_gpu_gradients_match_cpu(gpu_device, sections):
    fn, (q, k), angles = _grad_problem(sections, torch.float32, scale=YARN_SCALING)
    grads_cpu = torch.autograd.grad(sum(x.sin().sum() for x in fn(q, k)), (q, k))
    qg, kg = (x.detach().to(gpu_device).float().requires_grad_(True) for x in (q, k))
    q2, k2 = qg * 1.0, kg * 1.0
    ANGLES_OP(q2, k2, angles.to(gpu_device), YARN_SCALING, YARN_SCALING, torch.float32, 8, True,
              None if sections is None else list(sections))
    grads_gpu = torch.autograd.grad(q2.sin().sum() + k2.sin().sum(), (qg, kg))
    for got, exp in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(got.cpu().double(), exp, rtol=1e-4, atol=1e-4)
