"""Layout fuzzer for the fused Q+K RoPE pass: random RoPE programs whose q/k come through varied
memory layouts, compiled with ``backend="rope_compile"`` and checked against eager.

Programs are plain Python functions written with torch ops, in two forms:

* ``sglang``: ``forward_native``-style RoPE of ``x [T, H, D]`` from a ``[max_pos, rot]``
  cos_sin_cache gathered at ``positions`` (neox: chunk + cat; GPT-J: ``x[..., ::2]`` /
  ``x[..., 1::2]`` + stack + flatten), full or partial rotary (``cat`` with ``x[..., rot:]``);
* ``hf``: ``q * cos + rotate_half(q) * sin`` over ``[B, H, S, D]`` with cos/sin tables computed
  in the graph from ``position_ids`` and ``inv_freq`` (``cat((freqs, freqs), -1)``).

The layout kind (:data:`KINDS`) says where q and k come from: views of one qkv projection
(an input or a matmul), graph inputs, intermediates, transposed / permuted / unbound /
selected / expanded / ``as_strided`` views, pointwise roots of transposed tensors, rotated
results returned as graph outputs, two pairs on one projection, axial RoPE. Unrelated odd ops
(:data:`ODD_OPS`: 0-d tensors, empty tensors, integer maths on positions, in-place ops on a
clone) are sprinkled in. Head sizes 128 (rewritten) and 64 (not in the default head sizes);
fp32 mostly, fp16 / bf16 sometimes.

Drawn besides (``fuzz_kinds.py``): a reader of the rotated q or k (every aten view op and
``as_strided``, returned or read by a pointwise op, a matmul or attention; or a user's in-place
custom op on a view of it, the tensor read on); a second RoPE pair of the rotated q/k; the
spelling of the RoPE's arithmetic (keywords, ``alpha=1``, methods, ``out=``; ``alpha != 1``,
never rewritten); how sglang gathers the cos/sin rows (``index_select``, ``cache[positions]``,
``embedding``) and whether positions are negative (eager wraps them in ``cache[positions]``
only) or out of range (eager raises).

Every program is drawn from ``random.Random(seed)`` (no hypothesis: the CLI runs where
hypothesis is not installed). The oracle (:meth:`LayoutProgram.expected_rewrites`) is computed
from the drawn parameters alone (see :data:`ORACLE_RULES`).

Property, for each program (:func:`check_program`), compiled in a fresh dynamo state with the
FX graph / AOTAutograd caches off:

1. every output equals eager's and is close to a float64 evaluation of the same program
   (tolerance by dtype); the inputs are not modified;
2. every output's strides equal eager's (strides that differ on size-1 dims only are recorded
   as notes, not failures, unless ``--strict-size1-strides``: plain Inductor does that itself);
3. the compile does not fail (CPU: ``strict=True``, so an error inside the pass raises), and
   ``counters["rope_compile"]`` has no ``pass_errors`` / ``candidate_errors``;
4. ``counters["rope_compile"]["rewritten"]`` equals the oracle's count;
5. where eager raises (an index out of range), the compiled program raises too when run (on
   the CPU, where checking is always on; such programs are not run on a GPU, where an index
   out of range is a device-side assert that ends the process's CUDA context, eager's own
   kernels included). Their kernels are compiled without OpenMP regions: a bounds check of
   Inductor's thrown inside one aborts the process.

A values / strides / raise failure is re-run with plain Inductor (no RoPE pass): if the very
same failures (same outputs, same strides, the same missing or extra raise) show there, it is
Inductor's own behaviour and is reported as ``inductor_only`` (printed, counted, not a pass
failure). Known open misses (:data:`KNOWN_BUGS`) are labelled: their counts may differ from the
oracle's, nothing else may.

CLI (from the repo root; program i uses seed S+i, so ranges parallelise over processes)::

    python tests/fuzz_layouts.py --device cpu --programs 300 --seed 0 --out stats.json
    python tests/fuzz_layouts.py --device cuda --programs 200 --seed 100000 --fail-fast

``--device cpu`` compiles with ``options={"devices": ("cpu",), "strict": True}``; ``cuda`` with
the default options, so the GPU lowering is in the loop; both with the layout-copy rule off
(``FORCE_REWRITE``: every rewrite the pass can make is made and checked). Exit status 1 on any
failure. ``--out`` writes the statistics, the new kinds' tables included (``by_reader``,
``by_reader_use``, ``by_spelling``, ``by_index``, ``by_second_rope``, ``raised_as_eager``,
``raise_mismatches``, ``skipped_programs``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # As conftest.py: Triton (if imported at all) runs interpreted without a GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fuzz_kinds as fk  # noqa: E402
from pass_helpers import FORCE_REWRITE, fresh_compile, rope_counters  # noqa: E402


def _ensure_backend() -> None:
    """``backend="rope_compile"`` comes from the installed package's entry point; in a bare
    source checkout (a device machine without ``pip install -e .``) register it by name."""
    from torch._dynamo.backends import registry

    try:
        registry.lookup_backend("rope_compile")
    except Exception:  # noqa: BLE001  (not installed: InvalidBackend)
        from rope_compile.backend import rope_compile_backend

        registry.register_backend(rope_compile_backend, name="rope_compile")


_ensure_backend()

MAX_POS = 64
HIDDEN = 32
ALIGNED_HEADS = (128, 256, 512)  # the pass's default head_sizes
POS_OFFSET = 5

SGLANG_KINDS = (
    "qkv_split",                 # q, k, v split from one projection (input or matmul), viewed
    "graph_inputs",              # q, k graph inputs ([T, H, D] or flat [T, H*D] viewed)
    "intermediate",              # q, k computed (pointwise), or split from a computed buffer
    "transposed_input",          # q = a.transpose(1, 2): last stride H, not 1
    "permuted_input",            # q = a.permute(1, 0, 2) of an [H, T, D] input: last stride 1
    "unbind_interleave",         # q, k = qk.view(T, H, D, 2).unbind(-1): last stride 2
    "select",                    # q = s[0], k = s[1]; qkv.view(T, 3, H, D).select(1, i);
                                 # qkv.view(T, H, 3, D)[:, :, i]; x[:, :H], x[:, H:]
    "expand_k",                  # k = k1.expand(T, H, D): stride-0 heads (GQA expand)
    "as_strided_input",          # q, k = as_strided views of a 1-D input (variant overlap:
                                 # k overlaps q by half a head: never rewritten)
    "as_strided_intermediate",   # q, k = as_strided views of a computed buffer
    "pointwise_root_transposed",  # q = a.transpose(0, 1) * 2.0
    "rotated_outputs",           # qkv split, rotated q, k returned beside v
    "two_pairs",                 # two q/k pairs split from one projection
    "axial",                     # one table on the first half of each head, another on the 2nd
)
HF_KINDS = (
    "hf_inputs",                 # q, k [B, H, S, D] graph inputs
    "hf_projection",             # split of [B, S, W], view(B, S, H, D).transpose(1, 2)
    "hf_unequal_halves",         # angles cat((f, 1.5 f), -1): full tables, still rewritten
    "hf_expand_k",               # k = k1.expand(B, H, S, D): stride-0 heads
    "hf_transposed",             # q = a.transpose(2, 3) of [B, H, D, S]: last stride S
    "hf_seq_first",              # q = a.permute(1, 2, 0, 3) of [S, B, H, D]: the token dims
                                 # (B, S) merge into one only if B == 1 or S == 1
)
KINDS = SGLANG_KINDS + HF_KINDS
# pre_reader: the pre-RoPE q (a view of its root) is also read, elementwise, into an output.
ODD_OPS = ("zero_d", "empty", "int_positions", "inplace_unrelated", "pre_reader")
# consumed: only pointwise results of the rotated q/k are outputs; outputs: the rotated q/k are
# graph outputs; mixed: rotated q and a result of k; with_pre: rotated q/k and the pre-RoPE
# q/k views themselves (outputs aliasing the inputs / the projection).
# reshaped: the rotated q/k flattened back to [T, H*D] ([B, S, H*D] for hf), as forward_native
# returns them; viewed: views of the rotated q/k (a transpose, a slice of the heads).
OUT_MODES = ("consumed", "outputs", "mixed", "with_pre", "reshaped", "viewed")

# Layout kinds whose q/k layout (or table) the fused op cannot take: never rewritten.
NEVER_REWRITTEN = {
    "transposed_input": "x's last stride is H, not 1",
    "unbind_interleave": "x's last stride is 2, not 1",
    "expand_k": "k has stride-0 heads (expanded)",
    "hf_expand_k": "k has stride-0 heads (expanded)",
    "hf_transposed": "x's last stride is S, not 1",
}
NEVER_REWRITTEN_VARIANTS = {
    ("as_strided_input", "overlap"): "q and k overlap in memory",
}
ORACLE_RULES = (
    "a spelling in fuzz_kinds.CHANGES_THE_MATH (the RoPE's sub or add with alpha != 1) -> 0; "
    "every other spelling (keywords, alpha=1, methods, out=) as plain",
    "second RoPE (of the rotated q/k): + 1 for sglang (fresh dense or already rewritten "
    "tensors) and where the first pair is rewritten; else (HF) + 1 for partial rotary and "
    "hf_expand_k (contiguous [B, H, S, D] copies) if B, S or every H is 1, + 0 otherwise "
    "(full rotary keeps q's layout, which the first pair could not take)",
    "readers of the rotated q/k (every aten view op, as_strided, an in-place custom op on a "
    "view) and index modes (negative, out of range: eager raises or wraps) never change the "
    "count",
    "kinds in NEVER_REWRITTEN -> 0 (the reason is in the table)",
    "head size not in the pass's head sizes (64; axial: 64 heads rotate 32-wide halves) -> 0",
    "two_pairs, axial (head 128) -> 2 (two pairs on one storage root)",
    "every other kind, with head 128 -> 1 (rotated outputs, pointwise roots of transposed "
    "tensors, as_strided / select / permute views with last stride 1 included)",
    "as_strided_input/overlap (q and k share elements) -> 0",
    "hf_seq_first with B > 1 and S > 1 (token dims do not merge) -> 0, else 1",
    "hf_inputs and hf_unequal_halves (contiguous [B, H, S, D]; unequal halves are read as "
    "full tables) with B > 1, S > 1 and H > 1 for q or k: the heads dim sits between the "
    "token dims, which do not merge -> 0",
    "odd ops, dtype, style, partial rotary and output mode (pre-RoPE q/k returned too "
    "included) never change the count",
)


@dataclass
class LayoutProgram:
    kind: str
    variant: str  # the kind's sub-layout (e.g. "mm" / "input" projection)
    is_neox: bool
    head_size: int
    rotary_dim: int
    dtype: torch.dtype
    num_tokens: int  # T (sglang) or S (hf)
    batch: int  # B (hf)
    num_q_heads: int
    num_kv_heads: int
    odd_ops: tuple[str, ...]
    out_mode: str
    seed: int
    # fuzz_kinds: what reads the rotated q or k (reader_on), how the RoPE's arithmetic is
    # spelled, how sglang gathers the cos/sin rows, and the positions' index mode; second: a
    # second RoPE pair of the rotated q/k (positions flipped)
    reader: str = "none"
    reader_use: str = "returned"
    reader_on: str = "q"
    custom_view: str = "whole"
    second: bool = False
    spelling: str = "plain"
    gather: str = "index_select"
    index_mode: str = "in_range"
    expected_override: int | None = field(default=None, repr=False)  # self-tests only

    @property
    def form(self) -> str:
        return "hf" if self.kind in HF_KINDS else "sglang"

    @property
    def expected_rewrites(self) -> int | None:
        """The oracle: how many pairs the pass must rewrite (None: either)."""
        if self.expected_override is not None:
            return self.expected_override
        if self.spelling in fk.CHANGES_THE_MATH or self.head_size not in ALIGNED_HEADS:
            return 0
        return self._first_pair_rewrites() + (self._second_pair_rewrites() if self.second
                                              else 0)

    @property
    def index_target(self) -> str:
        """What the index mode applies to (and how it is read)."""
        return f"positions({self.gather})" if self.form == "sglang" else "position_ids(angles)"

    @property
    def eager_raises(self) -> bool:
        """Whether eager raises (sglang: an index the gather does not take; the integer
        maths of ``int_positions`` brings every position into range)."""
        return (self.form == "sglang" and "int_positions" not in self.odd_ops
                and fk.eager_raises(self.index_mode, self.gather))

    def _second_pair_rewrites(self) -> int:
        """A second RoPE of the rotated q/k. Where the first pair is rewritten, it reads the
        fused call's views, in q's and k's own (provable) layouts: rewritten. Otherwise it reads
        fresh tensors: sglang's are dense ``[T, H, D]`` (rewritten); HF's partial rotary ones
        (``cat``) and hf_expand_k's (a rotated expanded k is laid out anew) are contiguous
        ``[B, H, S, D]``, whose token dims merge only if B, S or every H is 1; full-rotary HF ones
        keep q's layout (``x * cos + ..`` lays its output out as x), which the first pair could
        not take."""
        if self.form == "sglang" or self._first_pair_rewrites():
            return 1
        if self.rotary_dim < self.head_size or self.kind == "hf_expand_k":
            heads = max(self.num_q_heads, self.num_kv_heads)
            return 0 if self.batch > 1 and self.num_tokens > 1 and heads > 1 else 1
        return 0

    def _first_pair_rewrites(self) -> int:
        if self.kind in NEVER_REWRITTEN or (self.kind, self.variant) in NEVER_REWRITTEN_VARIANTS:
            return 0
        if self.head_size not in ALIGNED_HEADS:
            return 0
        if self.batch > 1 and self.num_tokens > 1 and (
                self.kind == "hf_seq_first"
                or (self.kind in ("hf_inputs", "hf_unequal_halves")
                    and max(self.num_q_heads, self.num_kv_heads) > 1)):
            return 0  # x's token dims (B, S) do not merge into one without a copy
        return 2 if self.kind in ("two_pairs", "axial") else 1

    def describe(self) -> str:
        dt = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[self.dtype]
        shape = (f"T{self.num_tokens}" if self.form == "sglang"
                 else f"B{self.batch}S{self.num_tokens}")
        rot = "full" if self.rotary_dim == self.head_size else f"rot{self.rotary_dim}"
        parts = [self.kind, self.variant, "neox" if self.is_neox else "gptj",
                 f"D{self.head_size}", rot, dt, shape,
                 f"H{self.num_q_heads}/{self.num_kv_heads}", self.out_mode]
        parts += list(self.odd_ops)
        parts += self.extras()
        parts.append(f"seed{self.seed}")
        return "-".join(parts)

    def extras(self) -> list[str]:
        """The fuzz_kinds draws in :meth:`describe` (the default ones left out)."""
        return fk.kind_labels(self, "positions")


_VARIANTS = {
    "qkv_split": ("input", "mm", "kqv_order", "token_slice"),
    "graph_inputs": ("3d", "flat"),
    "intermediate": ("pointwise", "split_of_computed"),
    "select": ("stacked", "qkv_view", "heads_interleaved", "head_slices"),
    "as_strided_input": ("dense", "padded", "overlap"),
    "as_strided_intermediate": ("dense", "padded"),
    "rotated_outputs": ("input", "mm"),
    "two_pairs": ("input", "mm"),
    "axial": ("input", "mm"),
    "hf_projection": ("input", "mm"),
}


def draw_program(seed: int) -> LayoutProgram:
    """The program of ``seed`` (deterministic; drawn uniformly over the layout kinds)."""
    rng = random.Random(seed)
    kind = rng.choice(KINDS)
    variant = rng.choice(_VARIANTS.get(kind, ("plain",)))
    form = "hf" if kind in HF_KINDS else "sglang"
    head = rng.choice((128, 128, 128, 64))
    is_neox = True if form == "hf" else rng.random() < 0.6
    partial = kind != "axial" and rng.random() < 0.3
    rot = head if not partial else rng.choice((head // 2, head // 4))
    dtype = rng.choice((torch.float32,) * 6 + (torch.float16, torch.bfloat16))
    hq = rng.choice((1, 2, 4))
    hk = rng.choice([h for h in (1, 2, 4) if hq % h == 0])
    if kind == "unbind_interleave" or (kind == "select" and variant != "head_slices"):
        hk = hq
    if kind in ("transposed_input", "expand_k", "hf_expand_k"):
        hq = max(hq, 2)  # a size-1 heads dim would make the layout trivially dense
        hk = rng.choice([h for h in (1, 2) if hq % h == 0]) if kind != "transposed_input" \
            else max(hk, 2)
        if kind == "transposed_input" and hq % hk:
            hk = hq
    tokens = rng.randint(2 if kind == "hf_transposed" else 1, 6)
    odd = tuple(op for op in ODD_OPS if rng.random() < 0.25)
    out_mode = "outputs" if kind == "rotated_outputs" else rng.choice(OUT_MODES)
    batch = rng.choice((1, 2))
    # fuzz_kinds, drawn last (the draws above are those of the seed before them)
    reader = rng.choice(("none",) * 8 + fk.VIEW_READERS + ("custom_op",) * 4)
    return LayoutProgram(kind=kind, variant=variant, is_neox=is_neox, head_size=head,
                         rotary_dim=rot, dtype=dtype, num_tokens=tokens,
                         batch=batch, num_q_heads=hq, num_kv_heads=hk,
                         odd_ops=odd, out_mode=out_mode, seed=seed, reader=reader,
                         reader_use=rng.choice(fk.READER_USES), reader_on=rng.choice("qk"),
                         custom_view=rng.choice(fk.CUSTOM_OP_VIEWS),
                         second=kind not in SINGLE_RUN_KINDS and rng.random() < 0.15,
                         spelling=rng.choice(("plain",) * 4 + fk.ROPE_SPELLINGS[1:]),
                         gather=rng.choice(fk.GATHERS),
                         index_mode=rng.choice(("in_range",) * 4 + ("negative",) * 2
                                               + ("out_of_range",)))


# Kinds with two pairs already: no second RoPE of the rotated pair.
SINGLE_RUN_KINDS = ("two_pairs", "axial")


# --------------------------------------------------------------------------------------------
# the RoPE spellings


def rope_native(x, cache, positions, rot: int, is_neox: bool, spelling: str = "plain",
                gather: str = "index_select"):
    """sglang ``forward_native`` RoPE of ``x [T, H, D]`` (first ``rot`` features); the
    arithmetic spelled as ``spelling`` says, the rows gathered by ``gather``
    (:mod:`fuzz_kinds`)."""
    cos, sin = fk.gather(cache, positions, gather).chunk(2, -1)
    cos = fk.cast(cos.unsqueeze(-2), x.dtype, spelling)
    sin = fk.cast(sin.unsqueeze(-2), x.dtype, spelling)
    partial = rot < x.shape[-1]
    x_rot = x[..., :rot] if partial else x
    s = spelling
    if is_neox:
        x1, x2 = (torch.chunk(input=x_rot, chunks=2, dim=-1) if s == "keywords"
                  else x_rot.chunk(2, -1))
    else:
        x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
    o1 = fk.sub(fk.mul(x1, cos, s), fk.mul(x2, sin, s), s,
                fk.ROPE_ALPHAS.get(s) if s == "sub_alpha" else None)
    o2 = fk.add(fk.mul(x2, cos, s), fk.mul(x1, sin, s), s,
                fk.ROPE_ALPHAS.get(s) if s == "add_alpha" else None)
    if s == "keywords":
        out = (torch.cat(tensors=(o1, o2), dim=-1) if is_neox
               else torch.stack(tensors=(o1, o2), dim=-1).flatten(start_dim=-2))
    else:
        out = torch.cat((o1, o2), -1) if is_neox else torch.stack((o1, o2), -1).flatten(-2)
    return torch.cat((out, x[..., rot:]), -1) if partial else out


def rotate_half(x, spelling: str = "plain"):
    """HF's ``cat((-x2, x1), -1)`` (keywords: ``torch.neg(input=..)``; methods: ``.neg()``)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if spelling == "keywords":
        return torch.cat(tensors=(torch.neg(input=x2), x1), dim=-1)
    if spelling == "methods":
        return torch.cat((x2.neg(), x1), dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_hf(x, cos, sin, rot: int, spelling: str = "plain"):
    """HF RoPE of ``x [B, H, S, D]`` with ``cos``/``sin`` ``[B, S, rot]`` tables (the arithmetic
    spelled as ``spelling`` says; ``sub_alpha``: ``torch.sub(x cos, rot(x) sin, alpha=-2)``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    s = spelling

    def rotated(x):
        a, b = fk.mul(x, cos, s), fk.mul(rotate_half(x, s), sin, s)
        if s == "sub_alpha":
            return torch.sub(a, b, alpha=-fk.ROPE_ALPHAS[s])
        return fk.add(a, b, s, fk.ROPE_ALPHAS[s] if s == "add_alpha" else None)

    if rot < x.shape[-1]:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat((rotated(x_rot), x_pass), -1)
    return rotated(x)


def hf_tables(emb, dtype, spelling: str = "plain"):
    """HF's ``emb.cos().to(dtype), emb.sin().to(dtype)`` in the spelling."""
    if spelling == "keywords":
        return torch.cos(input=emb).to(dtype=dtype), torch.sin(input=emb).to(dtype=dtype)
    return fk.cast(emb.cos(), dtype, spelling), fk.cast(emb.sin(), dtype, spelling)


# --------------------------------------------------------------------------------------------
# programs


def _uniform(g, shape, dtype=torch.float32):
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def _selection(g, rows: int, width: int, dtype):
    """A signed selection matrix: ``x @ w`` is exact in every dtype."""
    w = torch.zeros(rows, width, dtype=torch.float64)
    w[torch.randint(0, rows, (width,), generator=g), torch.arange(width)] = (
        torch.randint(0, 2, (width,), generator=g) * 2 - 1).double()
    return w.to(dtype)


class _Inputs:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.named: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.named[name] = tensor


def build_program(p: LayoutProgram, device: str = "cpu"):
    """(fn, args): ``fn(*args)`` returns a tuple of tensors."""
    inp = _Inputs(p.seed)
    body = _build_sglang(p, inp) if p.form == "sglang" else _build_hf(p, inp)
    _add_odd_inputs(p, inp)
    names = list(inp.named)

    def fn(*tensors):
        env = dict(zip(names, tensors, strict=True))
        outs = body(env)
        outs += _odd_outputs(p, env)
        return tuple(outs)

    args = tuple(t.to(device) for t in inp.named.values())
    return fn, args


def _emit(p: LayoutProgram, rq, rk, outs: list, q=None, k=None) -> None:
    if p.out_mode == "consumed":
        outs += [rq * 2.0, rk + 1.0]
    elif p.out_mode == "outputs":
        outs += [rq, rk]
    elif p.out_mode == "with_pre":
        outs += [rq, rk, q, k]
    elif p.out_mode == "reshaped":
        if p.form == "hf":
            b, s = rq.shape[0], rq.shape[2]
            outs += [rq.transpose(1, 2).reshape(b, s, -1), rk.transpose(1, 2).reshape(b, s, -1)]
        else:
            outs += [rq.reshape(rq.shape[0], -1), rk.reshape(rk.shape[0], -1)]
    elif p.out_mode == "viewed":
        outs += [rq.transpose(0, 1), rk[:, :1]]
    elif p.out_mode == "mixed":
        outs += [rq, rk * 2.0]
    else:
        raise ValueError(p.out_mode)
    if "pre_reader" in p.odd_ops:
        outs.append(q[..., :8] * 1.0)


def _projection(p: LayoutProgram, inp: _Inputs, lead: tuple[int, ...], width: int):
    """Adds the projection inputs; returns f(env) -> the projection [*lead, width]."""
    if p.variant == "mm":
        inp.add("x", _uniform(inp.g, (*lead, HIDDEN), p.dtype))
        inp.add("w", _selection(inp.g, HIDDEN, width, p.dtype))
        return lambda e: e["x"] @ e["w"]
    inp.add("qkv", _uniform(inp.g, (*lead, width), p.dtype))
    return lambda e: e["qkv"]


def _build_sglang(p: LayoutProgram, inp: _Inputs):
    t, hq, hk, d, rot, dt = (p.num_tokens, p.num_q_heads, p.num_kv_heads, p.head_size,
                             p.rotary_dim, p.dtype)
    g = inp.g
    inp.add("positions", fk.with_mode(torch.randint(0, MAX_POS, (t,), generator=g), MAX_POS,
                                      p.index_mode, _index_generator(p.seed)))
    cache_width = d // 2 if p.kind == "axial" else rot
    inp.add("cache", _uniform(g, (MAX_POS, cache_width)))
    kind, variant = p.kind, p.variant
    make_qk = None  # env, outs -> list of (q, k) pairs [T, H, D]

    if kind == "qkv_split" and variant == "kqv_order":
        inp.add("kqv", _uniform(g, (t, (hq + 2 * hk) * d), dt))

        def make_qk(e, outs):
            k, q, v = e["kqv"].split([hk * d, hq * d, hk * d], -1)
            outs.append(v * 1 if p.out_mode == "consumed" else v)
            return [(q.view(t, hq, d), k.view(t, hk, d))]
    elif kind == "qkv_split" and variant == "token_slice":
        inp.add("qkv", _uniform(g, (t + 2, (hq + 2 * hk) * d), dt))

        def make_qk(e, outs):  # tokens 1 .. T of a T + 2 token projection
            q, k, v = e["qkv"][1:t + 1].split([hq * d, hk * d, hk * d], -1)
            outs.append(v * 1 if p.out_mode == "consumed" else v)
            return [(q.view(t, hq, d), k.view(t, hk, d))]
    elif kind in ("qkv_split", "rotated_outputs", "axial"):
        proj = _projection(p, inp, (t,), (hq + 2 * hk) * d)

        def make_qk(e, outs):
            q, k, v = proj(e).split([hq * d, hk * d, hk * d], -1)
            outs.append(v * 1 if p.out_mode == "consumed" else v)
            return [(q.view(t, hq, d), k.view(t, hk, d))]
    elif kind == "two_pairs":
        proj = _projection(p, inp, (t,), 2 * (hq + hk) * d)

        def make_qk(e, outs):
            q, k, q2, k2 = proj(e).split([hq * d, hk * d] * 2, -1)
            return [(q.view(t, hq, d), k.view(t, hk, d)), (q2.view(t, hq, d), k2.view(t, hk, d))]
    elif kind == "graph_inputs":
        if variant == "3d":
            inp.add("a", _uniform(g, (t, hq, d), dt))
            inp.add("b", _uniform(g, (t, hk, d), dt))
            make_qk = lambda e, outs: [(e["a"], e["b"])]
        else:
            inp.add("a", _uniform(g, (t, hq * d), dt))
            inp.add("b", _uniform(g, (t, hk * d), dt))
            make_qk = lambda e, outs: [(e["a"].view(t, hq, d), e["b"].view(t, hk, d))]
    elif kind == "intermediate":
        if variant == "pointwise":
            inp.add("a", _uniform(g, (t, hq, d), dt))
            inp.add("b", _uniform(g, (t, hk, d), dt))
            make_qk = lambda e, outs: [(e["a"] * 2.0, e["b"] + 1.0)]
        else:
            inp.add("a", _uniform(g, (t, (hq + hk) * d), dt))

            def make_qk(e, outs):
                q, k = (e["a"] * 2.0).split([hq * d, hk * d], -1)
                return [(q.view(t, hq, d), k.view(t, hk, d))]
    elif kind == "transposed_input":
        inp.add("a", _uniform(g, (t, d, hq), dt))
        inp.add("b", _uniform(g, (t, d, hk), dt))
        make_qk = lambda e, outs: [(e["a"].transpose(1, 2), e["b"].transpose(1, 2))]
    elif kind == "permuted_input":
        inp.add("a", _uniform(g, (hq, t, d), dt))
        inp.add("b", _uniform(g, (hk, t, d), dt))
        make_qk = lambda e, outs: [(e["a"].permute(1, 0, 2), e["b"].permute(1, 0, 2))]
    elif kind == "unbind_interleave":
        inp.add("qk", _uniform(g, (t, hq * d * 2), dt))

        def make_qk(e, outs):
            return [tuple(e["qk"].view(t, hq, d, 2).unbind(-1))]
    elif kind == "select":
        if variant == "stacked":
            inp.add("s", _uniform(g, (2, t, hq, d), dt))
            make_qk = lambda e, outs: [(e["s"][0], e["s"][1])]
        elif variant == "qkv_view":
            inp.add("qkv", _uniform(g, (t, 3 * hq * d), dt))

            def make_qk(e, outs):
                qkv = e["qkv"].view(t, 3, hq, d)
                outs.append(qkv.select(1, 2) * 1)
                return [(qkv.select(1, 0), qkv.select(1, 1))]
        elif variant == "heads_interleaved":
            inp.add("qkv", _uniform(g, (t, hq * 3 * d), dt))

            def make_qk(e, outs):
                qkv = e["qkv"].view(t, hq, 3, d)
                outs.append(qkv[:, :, 2] * 1)
                return [(qkv[:, :, 0], qkv[:, :, 1])]
        else:
            inp.add("x", _uniform(g, (t, hq + hk, d), dt))
            make_qk = lambda e, outs: [(e["x"][:, :hq], e["x"][:, hq:])]
    elif kind == "expand_k":
        inp.add("a", _uniform(g, (t, hq, d), dt))
        inp.add("b", _uniform(g, (t, 1, d), dt))
        make_qk = lambda e, outs: [(e["a"], e["b"].expand(t, hq, d))]
    elif kind in ("as_strided_input", "as_strided_intermediate"):
        pad = 16 if variant == "padded" else 0
        stride = (hq + hk) * d + pad
        inp.add("buf", _uniform(g, (t * stride,), dt))

        def make_qk(e, outs):
            buf = e["buf"] if kind == "as_strided_input" else e["buf"] * 1.5
            q = buf.as_strided((t, hq, d), (stride, d, 1), 0)
            k_offset = d // 2 if variant == "overlap" else hq * d
            k = buf.as_strided((t, hk, d), (stride, d, 1), k_offset)
            return [(q, k)]
    elif kind == "pointwise_root_transposed":
        inp.add("a", _uniform(g, (hq, t, d), dt))
        inp.add("b", _uniform(g, (hk, t, d), dt))
        make_qk = lambda e, outs: [(e["a"].transpose(0, 1) * 2.0, e["b"].transpose(0, 1) * 3.0)]
    else:
        raise ValueError(kind)

    if kind == "axial":
        inp.add("cache2", _uniform(g, (MAX_POS, d // 2)))
        inp.add("positions2", torch.randint(0, MAX_POS, (t,), generator=g))

    def body(e):
        outs: list = []
        positions = e["positions"]
        if "int_positions" in p.odd_ops:
            positions = (positions + POS_OFFSET) % MAX_POS
        pairs = make_qk(e, outs)
        half = d // 2

        s, how = p.spelling, p.gather

        def axial(x):
            return torch.cat((
                rope_native(x[..., :half], e["cache"], positions, half, p.is_neox, s, how),
                rope_native(x[..., half:], e["cache2"], e["positions2"], half, p.is_neox, s,
                            how)), -1)

        for q, k in pairs:
            if kind == "axial":
                rq, rk = axial(q), axial(k)
            else:
                rq = rope_native(q, e["cache"], positions, rot, p.is_neox, s, how)
                rk = rope_native(k, e["cache"], positions, rot, p.is_neox, s, how)
            if p.second:
                flipped = positions.flip(0)
                rq = rope_native(rq, e["cache"], flipped, rot, p.is_neox, s, how)
                rk = rope_native(rk, e["cache"], flipped, rot, p.is_neox, s, how)
            _read(p, rq, rk, outs)
            _emit(p, rq, rk, outs, q, k)
        return outs

    return body


def _build_hf(p: LayoutProgram, inp: _Inputs):
    b, s, hq, hk, d, rot, dt = (p.batch, p.num_tokens, p.num_q_heads, p.num_kv_heads,
                                p.head_size, p.rotary_dim, p.dtype)
    g = inp.g
    inp.add("position_ids", fk.with_mode(torch.randint(0, MAX_POS, (b, s), generator=g),
                                         MAX_POS, p.index_mode, _index_generator(p.seed)))
    inp.add("inv_freq", 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)))
    kind = p.kind
    if kind == "hf_projection":
        proj = _projection(p, inp, (b, s), (hq + 2 * hk) * d)

        def make_qk(e, outs):
            q, k, v = proj(e).split([hq * d, hk * d, hk * d], -1)
            outs.append(v * 1 if p.out_mode == "consumed" else v)
            return (q.view(b, s, hq, d).transpose(1, 2), k.view(b, s, hk, d).transpose(1, 2))
    elif kind in ("hf_inputs", "hf_unequal_halves"):
        inp.add("q", _uniform(g, (b, hq, s, d), dt))
        inp.add("k", _uniform(g, (b, hk, s, d), dt))
        make_qk = lambda e, outs: (e["q"], e["k"])
    elif kind == "hf_expand_k":
        inp.add("q", _uniform(g, (b, hq, s, d), dt))
        inp.add("k", _uniform(g, (b, 1, s, d), dt))
        make_qk = lambda e, outs: (e["q"], e["k"].expand(b, hq, s, d))
    elif kind == "hf_seq_first":
        inp.add("q", _uniform(g, (s, b, hq, d), dt))
        inp.add("k", _uniform(g, (s, b, hk, d), dt))
        make_qk = lambda e, outs: (e["q"].permute(1, 2, 0, 3), e["k"].permute(1, 2, 0, 3))
    elif kind == "hf_transposed":
        inp.add("q", _uniform(g, (b, hq, d, s), dt))
        inp.add("k", _uniform(g, (b, hk, d, s), dt))
        make_qk = lambda e, outs: (e["q"].transpose(2, 3), e["k"].transpose(2, 3))
    else:
        raise ValueError(kind)

    def body(e):
        outs: list = []
        position_ids = e["position_ids"]
        if "int_positions" in p.odd_ops:
            position_ids = position_ids + POS_OFFSET
        inv_freq = e["inv_freq"]
        freqs = position_ids[:, :, None].to(inv_freq.dtype) * inv_freq[None, None, :]
        second = freqs * 1.5 if kind == "hf_unequal_halves" else freqs
        emb = torch.cat((freqs, second), -1)
        q, k = make_qk(e, outs)
        cos, sin = hf_tables(emb, q.dtype, p.spelling)
        rq, rk = rope_hf(q, cos, sin, rot, p.spelling), rope_hf(k, cos, sin, rot, p.spelling)
        if p.second:
            cos2, sin2 = cos.flip(1), sin.flip(1)
            rq = rope_hf(rq, cos2, sin2, rot, p.spelling)
            rk = rope_hf(rk, cos2, sin2, rot, p.spelling)
        _read(p, rq, rk, outs)
        _emit(p, rq, rk, outs, q, k)
        return outs

    return body


def _index_generator(seed: int) -> torch.Generator:
    """The generator of the index mode's changes (apart from the inputs' generator, so that the
    inputs of a program do not depend on its index mode)."""
    return torch.Generator().manual_seed(seed + 7_777_777)


def _read(p: LayoutProgram, rq, rk, outs: list) -> None:
    """The drawn reader of the rotated q or k (``fuzz_kinds.read``): its outputs appended, or
    (``custom_op``) the tensor mutated in place before the program reads it on."""
    outs += fk.read(rq if p.reader_on == "q" else rk, p.reader, p.reader_use, p.custom_view)


def _add_odd_inputs(p: LayoutProgram, inp: _Inputs) -> None:
    if "zero_d" in p.odd_ops:
        inp.add("scale", torch.tensor(3.0))
        inp.add("table", _uniform(inp.g, (4,)))
    if "inplace_unrelated" in p.odd_ops:
        inp.add("u", _uniform(inp.g, (4, 8)))


def _odd_outputs(p: LayoutProgram, env: dict) -> list:
    outs = []
    if "zero_d" in p.odd_ops:
        outs.append(env["scale"] * env["table"].unsqueeze(0) + env["scale"])
    if "empty" in p.odd_ops:
        first = next(t for t in env.values() if t.is_floating_point())
        outs.append(first[:0].sum() + torch.zeros(0, device=first.device).sum())
    if "inplace_unrelated" in p.odd_ops:
        t = env["u"].clone()
        t.add_(1)
        t.mul_(2.0)
        outs.append(t)
    return outs


# --------------------------------------------------------------------------------------------
# known pass bugs: labelled in the report while open (a known miss: its rewrite count may
# differ from the oracle's, nothing else may). Both bugs found by this fuzzer before are fixed
# (a graph output that is a view of a rotated q/k; partial rotary with one head's rotated part
# in the other's pass-through tail); test_fuzz_layouts keeps a regression test for each.

KNOWN_BUGS: dict[str, str] = {"gptj_mutated": fk.GPTJ_MUTATED}


def known_bug(p: LayoutProgram) -> str | None:
    """The known open pass bug ``p`` may hit (its failures are then labelled), or None."""
    if p.kind != "axial" and fk.gptj_mutated(p.form, p.is_neox, p.rotary_dim, p.head_size,
                                             p.reader):
        return "gptj_mutated"
    return None


# --------------------------------------------------------------------------------------------
# the checker

# (atol, rtol) against eager and against float64, by output dtype.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-4, 1e-4),
    torch.float16: (8e-3, 8e-3),
    torch.bfloat16: (6e-2, 6e-2),
}


# Whether strides that differ from eager's on size-1 dims only (the same memory layout) fail a
# program. Off by default: plain Inductor returns such strides itself (the control run shows
# it), so they are recorded as notes ("size1_strides" in the statistics). The CLI's
# --strict-size1-strides turns it on.
SIZE1_STRIDES_FAIL = False


# The fuzzers check that every rewrite is sound on every layout, so the layout-copy rule (a
# cost policy that only ever leaves a pair to Inductor, passes/layout_copy_rule.py) is off:
# axial pairs, read only by the cat that joins each head's halves, are still rewritten and
# checked. The rule itself: tests/test_pass_layout_copy_rule.py.
def compile_options(device: str) -> dict:
    if device == "cpu":
        return {"devices": ("cpu",), "strict": True, **FORCE_REWRITE}
    return dict(FORCE_REWRITE)


@dataclass
class Result:
    program: LayoutProgram
    expected: int | None
    rewritten: int = 0
    known_bug: str | None = None  # the known pass bug the program may hit
    failures: list[str] = field(default_factory=list)  # "category: message"
    counters: dict = field(default_factory=dict)
    seconds: float = 0.0
    inductor_only: bool = False  # the failures reproduce without the pass
    skipped: str | None = None  # not run on this device, and why

    @property
    def categories(self) -> set[str]:
        return {f.split(":", 1)[0] for f in self.failures}

    @property
    def failed(self) -> bool:
        if self.inductor_only or self.skipped:
            return False
        notes = set() if SIZE1_STRIDES_FAIL else {"size1_strides"}
        if self.known_bug:  # a known miss: its count may differ, nothing else may
            notes |= ORACLE_CATEGORIES
        return bool(self.categories - notes)

    @property
    def hit_known_bug(self) -> bool:
        return bool(self.known_bug and self.categories & ORACLE_CATEGORIES)


ORACLE_CATEGORIES = {"oracle_missed", "oracle_unexpected"}


def pass_caused(result) -> set[str]:
    """The failure categories of ``result`` that are the passes' whatever plain Inductor does
    (a known miss's count aside): no control run for them."""
    caused = {"compile", "pass_errors", "harness"}
    if not result.known_bug:
        caused |= ORACLE_CATEGORIES
    return result.categories & caused


def _to64(args):
    return tuple(a.double() if a.is_floating_point() else a for a in args)


def _value_and_layout_failures(outs, eager, ref64) -> list[str]:
    found = []
    if not isinstance(outs, tuple) or len(outs) != len(eager):
        return [f"values: {len(outs)} outputs, eager has {len(eager)}"]
    for i, (out, e, r) in enumerate(zip(outs, eager, ref64, strict=True)):
        if out.shape != e.shape or out.dtype != e.dtype:
            found.append(f"values: output {i} is {out.dtype}{list(out.shape)}, eager "
                         f"{e.dtype}{list(e.shape)}")
            continue
        atol, rtol = TOLERANCES.get(e.dtype, (0, 0))
        got = out.detach().cpu()
        if e.is_floating_point():
            for what, want in (("eager", e.cpu()), ("float64", r.cpu().to(e.dtype))):
                if not torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol):
                    err = (got.double() - want.double()).abs().max().item()
                    found.append(f"values: output {i} differs from {what} (max abs error "
                                 f"{err:.3g})")
                    break
        elif not torch.equal(got, e.cpu()):
            found.append(f"values: integer output {i} differs from eager")
        if out.stride() != e.stride():
            # Strides of size-1 dims do not change the layout; Inductor itself does not keep
            # them (see SIZE1_STRIDES_FAIL).
            size1 = all(a == b or n <= 1 for a, b, n in zip(out.stride(), e.stride(), e.shape,
                                                              strict=True))
            found.append(f"{'size1_strides' if size1 else 'strides'}: output {i} has strides "
                         f"{out.stride()}, eager {e.stride()}")
    return found


def _run_compiled(fn, args, backend: str, options: dict | None, one_thread: bool = False):
    """Compile ``fn`` afresh and run it on clones of ``args``: (outputs, the clones after the
    call, counters, error message). ``one_thread``: Inductor's C++ kernels without OpenMP
    regions, for programs that index out of range: Inductor's bounds check throws, and a throw
    inside an OpenMP region aborts the process (plain Inductor's own behaviour)."""
    with fresh_compile(), torch._inductor.config.patch(
            {"cpp.threads": 1} if one_thread else {}):
        run_args = [a.clone() for a in args]
        try:
            kwargs = {"options": options} if options is not None else {}
            outs = torch.compile(fn, backend=backend, **kwargs)(*run_args)
            return outs, run_args, rope_counters(), None
        except Exception as err:  # noqa: BLE001  (any compile error is a finding)
            message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            return None, run_args, rope_counters(), message


def run_eagerly(fn, args, raises: bool) -> tuple[tuple | None, list[str]]:
    """(``fn(*args)``, or None where it raised; failures): eager must raise exactly where the
    program's oracle says (``raises``)."""
    try:
        out = fn(*args)
    except Exception as err:  # noqa: BLE001  (which exception is eager's business)
        if raises:
            return None, []
        return None, [f"harness: eager raised {type(err).__name__}: {err}"[:300]]
    if raises:
        return out, ["harness: the oracle says eager raises, it did not"]
    return out, []


def run_failures(raised: bool, outs, error: str | None) -> list[str]:
    """Where eager raised, the compiled program must raise too, when run (not when compiled);
    where eager returned, it must return."""
    if raised and outs is not None:
        return ["raises: eager raises (an index out of range), the compiled program returned"]
    if error is not None and not fk.is_run_error(error):
        return [f"compile: {error}"]
    if error is not None and not raised:
        return [f"raises: eager returns, the compiled program raised {error}"]
    return []


def same_failures(failures: list[str], base: list[str]) -> bool:
    """Whether ``failures`` all show in ``base`` (plain Inductor's): the same outputs, the same
    strides, the same raise (error messages aside)."""
    def key(message):
        return "raises" if message.startswith("raises:") else message.split(" (max abs")[0]

    return {key(f) for f in failures} <= {key(f) for f in base}


def skipped_on(device: str, raises: bool) -> str | None:
    """Programs whose eager run raises are run on the CPU only: on a GPU an index out of range
    is a device-side assert (eager's own kernels too), which ends the process's CUDA context."""
    return f"eager raises: not run on {device}" if raises and device != "cpu" else None


def check_program(p: LayoutProgram, device: str = "cpu", control: bool = True) -> Result:
    """Compile ``p`` with the pass and check the 4-part property; ``control``: re-run a failure
    with plain Inductor to tell Inductor's own behaviour from the pass's. Where eager raises,
    the compiled program must raise when run (and the counters are still the oracle's)."""
    start = time.perf_counter()
    result = Result(p, p.expected_rewrites, known_bug=known_bug(p),
                    skipped=skipped_on(device, p.eager_raises))
    if result.skipped:
        return result
    fn, args = build_program(p, device)
    snapshot = [a.clone() for a in args]
    eager, result.failures = run_eagerly(fn, [a.clone() for a in args], p.eager_raises)
    raised = eager is None
    ref64 = None if raised else fn(*_to64(args))
    outs, _, seen, error = _run_compiled(fn, args, "rope_compile", compile_options(device),
                                         one_thread=raised)
    result.counters = seen
    result.rewritten = seen.get("rewritten", 0)
    result.failures += run_failures(raised, outs, error)
    for key in ("pass_errors", "candidate_errors"):
        if seen.get(key):
            result.failures.append(f"pass_errors: counters[{key!r}] = {seen[key]}")
    if outs is not None and not raised:
        result.failures += _value_and_layout_failures(outs, eager, ref64)
    for i, (a, s) in enumerate(zip(args, snapshot, strict=True)):
        if not torch.equal(a, s):
            result.failures.append(f"values: input {i} was modified")
    compiled = error is None or fk.is_run_error(error)
    if result.expected is not None and compiled and result.rewritten != result.expected:
        direction = "missed" if result.rewritten < result.expected else "unexpected"
        result.failures.append(f"oracle_{direction}: {result.rewritten} pair(s) rewritten, "
                               f"expected {result.expected}; skips: "
                               f"{sorted(k for k in seen if k.startswith('skipped'))}")
    others = [f for f in result.failures if f.split(":", 1)[0] not in ORACLE_CATEGORIES]
    if control and others and not pass_caused(result):
        # Values / strides / a raise only: does plain Inductor do the same?
        base_outs, _, _, base_error = _run_compiled(fn, args, "inductor", None, raised)
        base = run_failures(raised, base_outs, base_error)
        if base_outs is not None and not raised:
            base += _value_and_layout_failures(base_outs, eager, ref64)
        result.inductor_only = same_failures(others, base)
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# statistics


def new_stats(device: str) -> dict:
    return {
        "device": device, "torch": torch.__version__, "programs": 0, "failed_programs": 0,
        "inductor_only_programs": 0, "expected_rewrites": 0, "rewrites": 0,
        "known_bug_programs": {}, "oracle_unspecified": 0, "wrong_values": 0,
        "stride_mismatches": 0,
        "size1_stride_notes": 0,
        "compile_failures": 0, "pass_errors": 0, "oracle_missed": 0, "oracle_unexpected": 0,
        "seconds": 0.0, "by_kind": {}, "by_form": {}, "by_dtype": {}, "odd_ops": {},
        **new_kind_stats(), "failures": [],
    }


def new_kind_stats() -> dict:
    """The fuzz_kinds tables of the statistics (both fuzzers): programs, and failed programs,
    per reader (and per reader and use), spelling, index mode (and gather), second RoPE; the
    programs whose eager run raised, those whose compiled run raised too, the raise mismatches
    (the passes'; Inductor's own are among inductor_only_programs), and those not run on this
    device."""
    return {"skipped_programs": 0, "eager_raised": 0, "raised_as_eager": 0,
            "raise_mismatches": 0,
            "harness_errors": 0, "by_reader": {}, "by_reader_use": {},
            "by_spelling": {}, "by_index": {}, "by_second_rope": {}}


def _count(stats: dict, table: str, key: str, failed: bool) -> None:
    row = stats[table].setdefault(key, {"programs": 0, "failed": 0})
    row["programs"] += 1
    row["failed"] += int(failed)


def record_kinds(stats: dict, p, r) -> None:
    """Count ``p``'s fuzz_kinds draws (``p``: a layout or prologue program, ``r`` its result)."""
    if r.skipped:
        stats["skipped_programs"] += 1
        return
    failed = r.failed
    reader = p.reader if p.reader != "custom_op" else f"custom_op({p.custom_view})"
    _count(stats, "by_reader", reader, failed)
    if p.reader not in ("none", "custom_op"):
        _count(stats, "by_reader_use", f"{p.reader}/{p.reader_use}", failed)
    _count(stats, "by_spelling", p.spelling, failed)
    index = f"{p.index_mode}/{p.index_target}"
    _count(stats, "by_index", index, failed)
    _count(stats, "by_second_rope", str(p.second), failed)
    stats["eager_raised"] += int(p.eager_raises)
    stats["raised_as_eager"] += int(p.eager_raises and "raises" not in r.categories)


def kinds_summary(stats: dict) -> str:
    def table(name):
        return ", ".join(f"{k} {v['programs']}" + (f" ({v['failed']} FAILED)" if v["failed"]
                                                   else "")
                         for k, v in sorted(stats[name].items()))

    return "\n".join([
        f"  readers: {table('by_reader')}",
        f"  spellings: {table('by_spelling')}; second RoPE: {table('by_second_rope')}",
        f"  indices: {table('by_index')}; eager raised {stats['eager_raised']}, the compiled "
        f"program too {stats['raised_as_eager']}; "
        f"raised where eager does not or the reverse: {stats['raise_mismatches']}; harness "
        f"errors {stats['harness_errors']}; not run on this device: "
        f"{stats['skipped_programs']}",
    ])


def record(stats: dict, r: Result) -> None:
    p = r.program
    record_kinds(stats, p, r)
    if r.skipped:
        return
    stats["programs"] += 1
    stats["seconds"] += r.seconds
    if r.expected is None:
        stats["oracle_unspecified"] += 1
    else:
        stats["expected_rewrites"] += r.expected
    stats["rewrites"] += r.rewritten
    cats = r.categories
    if r.hit_known_bug:
        stats["known_bug_programs"][r.known_bug] = (
            stats["known_bug_programs"].get(r.known_bug, 0) + 1)
    if r.inductor_only:
        stats["inductor_only_programs"] += 1
    elif r.failures:
        stats["failed_programs"] += int(r.failed)
        stats["size1_stride_notes"] += int("size1_strides" in cats)
        for cat, key in (("values", "wrong_values"), ("strides", "stride_mismatches"),
                         ("compile", "compile_failures"), ("pass_errors", "pass_errors"),
                         ("oracle_missed", "oracle_missed"),
                         ("oracle_unexpected", "oracle_unexpected"),
                         ("raises", "raise_mismatches"), ("harness", "harness_errors")):
            stats[key] += int(cat in cats)
    if r.failures:
        stats["failures"].append({"seed": p.seed, "program": p.describe(),
                                  "failed": r.failed, "inductor_only": r.inductor_only,
                                  "known_bug": r.known_bug if r.hit_known_bug else None,
                                  "failures": r.failures})
    kind = stats["by_kind"].setdefault(p.kind, {"programs": 0, "expected_rewrites": 0,
                                                "rewrites": 0, "failed": 0})
    kind["programs"] += 1
    kind["expected_rewrites"] += r.expected or 0
    kind["rewrites"] += r.rewritten
    kind["failed"] += int(r.failed)
    for table, key in (("by_form", p.form), ("by_dtype", str(p.dtype).replace("torch.", ""))):
        stats[table][key] = stats[table].get(key, 0) + 1
    for op in p.odd_ops:
        stats["odd_ops"][op] = stats["odd_ops"].get(op, 0) + 1


def summary(stats: dict) -> str:
    n = max(stats["programs"], 1)
    lines = [
        f"layout fuzz ({stats['device']}, torch {stats['torch']}): {stats['programs']} programs, "
        f"{stats['failed_programs']} failed (known pass bugs: "
        f"{stats['known_bug_programs'] or 'none'}), {stats['inductor_only_programs']} "
        "inductor-only; "
        f"{stats['seconds']:.0f} s ({stats['seconds'] / n:.2f} s/program)",
        f"  rewrites: expected {stats['expected_rewrites']}, done {stats['rewrites']}; oracle "
        f"missed {stats['oracle_missed']}, unexpected {stats['oracle_unexpected']}, "
        f"unspecified {stats['oracle_unspecified']}",
        f"  wrong values {stats['wrong_values']}, stride mismatches "
        f"{stats['stride_mismatches']} (+ {stats['size1_stride_notes']} on size-1 dims only, "
        f"{'failing' if SIZE1_STRIDES_FAIL else 'notes'}), compile failures "
        f"{stats['compile_failures']}, pass errors {stats['pass_errors']}",
        "  by kind: " + ", ".join(
            f"{k} {v['programs']} ({v['rewrites']}/{v['expected_rewrites']} rw"
            + (f", {v['failed']} FAILED" if v["failed"] else "") + ")"
            for k, v in sorted(stats["by_kind"].items())),
        f"  forms {stats['by_form']}, dtypes {stats['by_dtype']}, odd ops {stats['odd_ops']}",
        kinds_summary(stats),
    ]
    return "\n".join(lines)


def run(device: str, programs: int, seed: int, fail_fast: bool = False, log=print,
        time_limit: float | None = None) -> dict:
    """Check programs ``seed .. seed + programs - 1``; with ``time_limit`` (seconds), stop
    drawing new programs once it has passed (the statistics count the programs run)."""
    stats = new_stats(device)
    start = time.perf_counter()
    for i in range(programs):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
        p = draw_program(seed + i)
        r = check_program(p, device)
        record(stats, r)
        if r.failures:
            tag = "INDUCTOR-ONLY" if r.inductor_only else ("FAIL" if r.failed else "NOTE")
            if r.hit_known_bug:
                tag += f"(known bug: {r.known_bug})"
            log(f"{tag} seed={p.seed} {p.describe()}: " + " | ".join(r.failures))
            if fail_fast and r.failed:
                break
    return stats


def fuzz_main(fuzzer, argv, extra_stats: dict) -> int:
    """The command line of a fuzzer module (this one, ``fuzz_prologue``): its ``run``,
    ``summary``, docstring and ``SIZE1_STRIDES_FAIL`` switch; ``extra_stats`` go into the JSON."""
    parser = argparse.ArgumentParser(description=fuzzer.__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--programs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the statistics as JSON here")
    parser.add_argument("--fail-fast", action="store_true")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop drawing new programs after this many seconds")
    parser.add_argument("--strict-size1-strides", action="store_true",
                        help="strides differing from eager's on size-1 dims only fail too")
    args = parser.parse_args(argv)
    fuzzer.SIZE1_STRIDES_FAIL = args.strict_size1_strides
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    stats = fuzzer.run(args.device, args.programs, args.seed, args.fail_fast,
                       log=lambda line: print(line, flush=True), time_limit=args.time_limit)
    stats["seed"], stats["requested_programs"] = args.seed, args.programs
    stats.update(extra_stats)
    print(fuzzer.summary(stats))
    if args.out:
        Path(args.out).write_text(json.dumps(stats, indent=1, default=str))
    return 1 if stats["failed_programs"] else 0


def main(argv=None) -> int:
    return fuzz_main(sys.modules[__name__], argv, {
        "oracle_rules": list(ORACLE_RULES), "never_rewritten": NEVER_REWRITTEN})


if __name__ == "__main__":
    sys.exit(main())
