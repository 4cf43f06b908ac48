"""Soundness fuzzer for the attention prologue: random programs of projection -> optional RMSNorm
of q and k (per head or of the whole projection) -> RoPE -> optional KV-cache write of k and v
-> an attention-like reader, compiled with ``backend="rope_compile"`` (``FuseQKRopePass``, then
``FuseQKNormPass`` and ``FuseKVStorePass``) and checked against eager.

A program (:class:`PrologueProgram`, drawn from ``random.Random(seed)``) is:

* ``form``: ``sglang`` (``forward_native`` of ``[T, H, D]`` from a ``[max_pos, rot]``
  cos_sin_cache, neox or GPT-J; paged ``[S, Hk, D]`` caches written at ``loc``, distinct random
  rows) or ``hf`` (``q * cos + rotate_half(q) * sin`` over ``[B, H, S, D]``, tables computed in
  the graph; a StaticCache-like ``[B, Hk, L, D]`` cache written at ``cache_position``);
* ``source`` of q/k/v (:data:`SOURCES`): a qkv input split, a matmul (``x @ w``, exact), separate
  q/k/v inputs, a qkv input whose rows are padded (a strided view);
* head 128 (rewritten) or 64 (not in the default head sizes), full or partial rotary, GQA,
  fp32/bf16/fp16, 1..17 tokens (odd counts included);
* ``norm`` (:data:`NORMS`): none, Qwen3 ``w * (xf * rsqrt(var + eps)).to(dtype)``, Gemma3
  ``(xf * rsqrt(var + eps) * (1 + w.float())).to(dtype)``, either of the two over the whole
  ``[.., H * D]`` projection before the view into heads (``whole``: HF OLMo2's layout, weights
  ``[H * D]``; a Qwen3-form one has OLMo2's own rounding ``(w * xf * r).to(dtype)`` half the
  time, ``olmo2``), or a near-miss: another eps for k, a norm output with another reader (the
  normalised q is returned);
* ``store`` (:data:`STORES`): none, a write (sglang: ``k_cache[loc] = k`` / ``index_put_``,
  optionally ``(k.float() / scale)``; the cache fp32/bf16/fp16, sometimes another dtype than q;
  hf: ``index_copy_(2, cache_position, k)`` / ``cache[:, :, cache_position] = k``), or a
  near-miss: an accumulating write (sglang ``accumulate=True``; hf ``cache[.., cp] += k``, a
  read-modify-write), k and v written at different ``loc``, a k cache that is a view of the
  projection's k region (sglang), a cache computed in the graph (``input * 0.5``: a clone
  would vanish in functionalization, the write becoming a functional write of the input);
* the reader: attention of q over the whole cache (or over k/v when nothing is stored); the
  rotated q and k are outputs too;
* drawn besides (``fuzz_kinds.py``), after the store: a reader of the rotated (normed) q or k
  (every aten view op and ``as_strided``, returned or read by a pointwise op, a matmul or
  attention; or a user's in-place custom op on a view of it, read on by the outputs and the
  attention); a second RoPE pair of the rotated q/k (after the QK-norm + RoPE, after the KV
  store); the spelling of the RoPE's, the norm's and the store's arithmetic (keywords,
  ``alpha=1``, methods, ``out=``, ``torch.square`` / ``x * x``, ``.rsqrt()``, ``type_as``,
  ``mean(.., dtype=float32)``; ``alpha != 1`` in the RoPE, the norm's ``var + eps`` or Gemma's
  ``1 + w``: not matched); sglang's gather of the cos/sin rows; negative (eager wraps them in
  setitem, ``index_put_`` and ``cache[positions]``; ``index_copy_``, ``index_select`` and
  ``embedding`` raise) or out-of-range (eager raises) cache rows or positions.

The oracle (:meth:`PrologueProgram.expected`) is computed from the drawn parameters alone (see
:data:`ORACLE_RULES`): the counters ``rewritten``, ``qk_norm rewritten`` and ``kv_store
rewritten``, and for a near-miss the ``... skipped: <reason>`` counter it must leave.

Property, for each program (:func:`check_program`), compiled in a fresh dynamo state with the
FX graph / AOTAutograd caches off:

1. every output, and every input after the step (the caches: mutated in place), equals eager's
   and is close to a float64 evaluation of the same program (tolerance by dtype); integer
   inputs are unchanged;
2. cache rows the step does not write are bit-identical to before the step; where the KV store
   is fused, the written rows are bit for bit torch's cast of the compiled k (and ``/ scale``),
   as ``tests/test_pass_kv_store.py`` checks;
3. every output's strides equal eager's (size-1 dims: notes, as in ``fuzz_layouts.py``);
4. no compile failure (CPU: ``strict=True``), no ``pass_errors`` / ``candidate_errors``;
5. the counters equal the oracle's;
6. where eager raises, the compiled program raises too when run (CPU; not run on a GPU; as in
   ``fuzz_layouts.py``), and the counters are still the oracle's.

A values / strides / raise failure is re-run with plain Inductor (no passes): if the same
failures show there, it is Inductor's own (``inductor_only``; printed, counted, not a failure of
the passes). Known open misses (:data:`KNOWN_BUGS`) are labelled: their counters may differ from
the oracle's, nothing else may.

CLI (from the repo root; program i uses seed S+i)::

    python tests/fuzz_prologue.py --device cpu --programs 300 --seed 0 --out stats.json
    python tests/fuzz_prologue.py --device cuda --programs 200 --seed 100000 --time-limit 500

``--device cpu`` compiles with ``options={"devices": ("cpu",), "strict": True}``; ``cuda`` with
the default options, so the GPU lowering is in the loop. Exit status 1 on any failure. ``--out``
writes the statistics with the new kinds' tables (as ``fuzz_layouts.py``).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import fuzz_kinds as fk  # noqa: E402
import torch  # noqa: E402
from fuzz_layouts import (  # noqa: E402  (registers the backend, sets TRITON_INTERPRET)
    ALIGNED_HEADS,
    MAX_POS,
    ORACLE_CATEGORIES,
    TOLERANCES,
    _index_generator,
    _Inputs,
    _run_compiled,
    _selection,
    _to64,
    _uniform,
    _value_and_layout_failures,
    compile_options,
    fuzz_main,
    hf_tables,
    kinds_summary,
    new_kind_stats,
    pass_caused,
    record_kinds,
    rope_hf,
    rope_native,
    run_eagerly,
    run_failures,
    same_failures,
    skipped_on,
)

HIDDEN = 32
FORMS = ("sglang", "hf")
SOURCES = (
    "qkv_input",   # q, k, v split from a qkv graph input
    "qkv_mm",      # split from x @ w (a selection matrix: exact in every dtype)
    "separate",    # q, k, v separate graph inputs
    "strided",     # split from qkv[..., :W] of a row-padded input (row stride W + 8)
)
NORMS = ("none", "qwen3", "gemma", "eps", "other_reader", "whole")
NEAR_NORMS = ("eps", "other_reader")
STORES = ("none", "write", "accumulate", "other_loc", "overlap_view", "computed_cache")
NEAR_STORES = ("accumulate", "other_loc", "overlap_view", "computed_cache")
# fuzz_kinds spellings with a non-default argument that changes the math: the RoPE is not
# matched (nothing rewritten), or the norm is not (its reason, a prefix, counted once)
ROPE_ALPHAS = ("sub_alpha", "add_alpha")
NORM_ALPHAS = {
    "eps_alpha": "q: the norm's mean(x^2) + eps: aten.add.Tensor with alpha=100.0",
    "gemma_alpha": "q: the Gemma norm's factor 1 + float(weight): aten.add.Tensor with "
                   "alpha=3.0",
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-6

# The reason (a prefix of the counter's text after "<pass> skipped: ") each near-miss leaves.
NORM_REASONS = {
    "eps": "q and k norms use different eps",
    "other_reader": "the q norm output has another reader",
}
STORE_REASONS = {
    ("sglang", "accumulate"): "the k write accumulates",
    ("sglang", "other_loc"): "k and v are written at different cache_loc",
    ("hf", "other_loc"): "k and v are written at different cache_loc",
    ("sglang", "overlap_view"): "k_buffer shares memory with",
    ("sglang", "computed_cache"): "k_buffer is computed in the graph",
    ("hf", "computed_cache"): "k_buffer is computed in the graph",
}
ORACLE_RULES = (
    "rewritten: 1 if the head size is in the pass's head sizes (128), else 0 (64); q/k are "
    "views of a projection, inputs or row-padded views, all provable layouts; 2 with a second "
    "RoPE pair of the rotated q/k (after the norm, after the store); 0 (and nothing else "
    "rewritten) where the RoPE's sub or add has alpha != 1",
    "a norm spelled with alpha != 1 (var + eps, Gemma's 1 + w): qk_norm rewritten 0 and its "
    "reason counted once; every other spelling (keywords, alpha=1, methods, out=, square, "
    "x * x, .rsqrt(), type_as, mean(dtype=float32)) as plain",
    "readers of the rotated q/k (every aten view op, as_strided, an in-place custom op on a "
    "view) and index modes (negative, out of range) never change a counter",
    "qk_norm rewritten: 1 where the RoPE is rewritten and the norm is Qwen3's or Gemma3's "
    "form with one eps, per head or over the whole [.., H * D] projection (whole, any head "
    "counts, sglang and hf layouts), or a whole norm with OLMo2's rounding (olmo2: the op's "
    "round_once in bf16/fp16, the Qwen3 form in float32), any dtype; near-misses (eps, "
    "other_reader) -> 0 and their 'qk_norm skipped: <reason>' counted",
    "kv_store rewritten: 1 where the RoPE is rewritten and k and v are written (overwritten) at "
    "one loc into graph-input caches, any cache dtype, optional scale; near-misses -> 0 and "
    "their 'kv_store skipped: <reason>' counted, except hf 'accumulate' (cache[.., cp] += k: "
    "the stored value is not the rotated k, not a candidate: nothing counted)",
    "source, dtype, cache dtype, scale, neox/GPT-J, partial rotary, token counts never change a "
    "count, except: a Gemma-form norm of bf16/fp16 q/k whose rotated k is cast to float32 by "
    "the store (a scale or a float32 cache): the normal counts, or nothing rewritten and "
    "'skipped: q and k have different dtypes' counted twice (where Inductor's pointless_convert "
    "removed eager's roundings of k: not provable, see half_norm_cast_to_float32)",
)


@dataclass
class PrologueProgram:
    form: str
    source: str
    is_neox: bool
    head_size: int
    rotary_dim: int
    dtype: torch.dtype
    num_tokens: int  # T (sglang) or S (hf)
    batch: int  # B (hf)
    num_q_heads: int
    num_kv_heads: int
    norm: str
    gemma: bool  # the norm's form (near-misses too)
    store: str
    store_how: str  # sglang: setitem / index_put_; hf: index_copy_ / setitem
    cache_dtype: torch.dtype
    scale: float | None
    extra_rows: int  # cache rows beyond the ones written
    seed: int
    olmo2: bool = False  # norm "whole", Qwen3 form: HF Olmo2RMSNorm's rounding instead
    # fuzz_kinds: what reads the rotated (normed) q or k, after the store (reader_on); a second
    # RoPE pair of the rotated q/k after the store; the arithmetic's spelling (RoPE, norm,
    # store); how sglang gathers the cos/sin rows; the index mode of the cache rows (loc) or
    # the positions (index_target)
    reader: str = "none"
    reader_use: str = "returned"
    reader_on: str = "q"
    custom_view: str = "whole"
    second: bool = False
    spelling: str = "plain"
    gather: str = "index_select"
    index_mode: str = "in_range"
    index_on: str = "loc"  # "loc" (with a store) or "positions"
    expected_override: dict | None = field(default=None, repr=False)  # self-tests only

    @property
    def kind(self) -> str:
        return f"{self.form}/{self.norm}/{self.store}"

    def expected(self) -> dict[str, int]:
        """The oracle: counter -> value (``rewritten``, ``qk_norm rewritten``, ``kv_store
        rewritten`` and the near-miss's skip reason, as ``"<pass> skipped: <prefix>"``)."""
        if self.expected_override is not None:
            return dict(self.expected_override)
        rope = int(self.head_size in ALIGNED_HEADS and self.spelling not in ROPE_ALPHAS)
        want = {"rewritten": rope * (2 if self.second else 1), "qk_norm rewritten": 0,
                "kv_store rewritten": 0}
        if self.spelling in NORM_ALPHAS and rope:
            want[f"qk_norm skipped: {NORM_ALPHAS[self.spelling]}"] = 1
        elif self.norm in ("qwen3", "gemma", "whole"):
            want["qk_norm rewritten"] = rope
        elif self.norm in NEAR_NORMS and rope:
            want[f"qk_norm skipped: {NORM_REASONS[self.norm]}"] = 1
        if self.store == "write":
            want["kv_store rewritten"] = rope
        elif (self.form, self.store) in STORE_REASONS and rope:
            want[f"kv_store skipped: {STORE_REASONS[(self.form, self.store)]}"] = 1
        return want

    def describe(self) -> str:
        dt = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
        shape = (f"T{self.num_tokens}" if self.form == "sglang"
                 else f"B{self.batch}S{self.num_tokens}")
        rot = "full" if self.rotary_dim == self.head_size else f"rot{self.rotary_dim}"
        parts = [self.form, self.source, "neox" if self.is_neox else "gptj", f"D{self.head_size}",
                 rot, dt[self.dtype], shape, f"H{self.num_q_heads}/{self.num_kv_heads}",
                 f"norm:{self.norm}" + ("(gemma)" if self.gemma and self.norm != "none" else "")
                 + ("(olmo2)" if self.olmo2 else "")]
        store = f"store:{self.store}"
        if self.store != "none":
            store += f"({self.store_how},{dt[self.cache_dtype]}"
            store += f",scale{self.scale})" if self.scale is not None else ")"
        parts += [store, *self.extras(), f"seed{self.seed}"]
        return "-".join(parts)

    def extras(self) -> list[str]:
        """The fuzz_kinds draws in :meth:`describe` (the default ones left out)."""
        return fk.kind_labels(self, self.index_on)

    @property
    def index_target(self) -> str:
        """What the index mode applies to, and the op that reads or writes it."""
        return f"{self.index_on}({self._index_op})"

    @property
    def _index_op(self) -> str:
        if self.index_on == "positions":
            return self.gather if self.form == "sglang" else "angles"
        if self.form == "sglang":
            return "index_put_" if "index_put_" in (self.store_how,) or (
                self.store == "accumulate") else "setitem"
        return "setitem" if self.store == "accumulate" else self.store_how

    @property
    def eager_raises(self) -> bool:
        """Whether eager raises: an index its op does not take (HF positions are angles)."""
        return self._index_op != "angles" and fk.eager_raises(self.index_mode, self._index_op)


def draw_program(seed: int) -> PrologueProgram:
    """The program of ``seed`` (deterministic)."""
    rng = random.Random(seed)
    form = rng.choice(FORMS)
    source = rng.choice(SOURCES)
    head = rng.choice((128, 128, 128, 64))
    is_neox = True if form == "hf" else rng.random() < 0.6
    rot = head if rng.random() < 0.7 else rng.choice((head // 2, head // 4))
    dtype = rng.choice((torch.float32,) * 3 + (torch.bfloat16, torch.bfloat16, torch.float16))
    hq = rng.choice((1, 2, 4))
    hk = rng.choice([h for h in (1, 2, 4) if hq % h == 0])
    norm = rng.choice(("none",) * 3 + ("qwen3",) * 2 + ("gemma",) * 2 + NEAR_NORMS
                      + ("whole",))
    gemma = norm == "gemma" or (norm in (*NEAR_NORMS, "whole") and rng.random() < 0.5)
    stores = ("none", "write", "write", "write") + tuple(
        s for s in NEAR_STORES if (form, s) in STORE_REASONS or s == "accumulate")
    store = rng.choice(stores)
    if store == "overlap_view":
        source = "qkv_input"  # the cache is a view of the projection input's k region
        if norm in NEAR_NORMS:
            norm = "none"  # (which memory the cache shares is then v's; see STORE_REASONS)
    how = rng.choice(("setitem", "index_put_") if form == "sglang" else ("index_copy_",
                                                                        "setitem"))
    cache_dtype = dtype if rng.random() < 0.6 else rng.choice(DTYPES)
    scale = (rng.choice((0.5, 0.37, 2.0)) if form == "sglang" and store != "none"
             and rng.random() < 0.3 else None)
    if form == "sglang":
        tokens, batch = rng.randint(1, 17), 1
    else:
        tokens, batch = rng.randint(1, 9), rng.choice((1, 2))
    extra_rows = rng.randint(0, 6)
    olmo2 = norm == "whole" and not gemma and rng.random() < 0.5  # drawn last: seeds kept
    # fuzz_kinds, drawn after (the draws above are those of the seed before them)
    reader = rng.choice(("none",) * 8 + fk.VIEW_READERS + ("custom_op",) * 4)
    spellings = fk.ROPE_SPELLINGS[1:]
    if norm != "none":
        spellings += tuple(s for s in fk.NORM_SPELLINGS if s not in NORM_ALPHAS
                           or (norm not in NEAR_NORMS and (gemma or s != "gemma_alpha")))
        if gemma and norm not in NEAR_NORMS:
            spellings += ("gemma_alpha",)  # (twice: Gemma's factor is one norm form of two)
    index_on = "loc" if store != "none" and rng.random() < 0.7 else "positions"
    return PrologueProgram(form=form, source=source, is_neox=is_neox, head_size=head,
                           rotary_dim=rot, dtype=dtype, num_tokens=tokens, batch=batch,
                           num_q_heads=hq, num_kv_heads=hk, norm=norm, gemma=gemma, store=store,
                           store_how=how, cache_dtype=cache_dtype, scale=scale,
                           extra_rows=extra_rows, seed=seed, olmo2=olmo2, reader=reader,
                           reader_use=rng.choice(fk.READER_USES), reader_on=rng.choice("qk"),
                           custom_view=rng.choice(fk.CUSTOM_OP_VIEWS),
                           second=rng.random() < 0.2,
                           spelling=rng.choice(("plain",) * 6 + spellings),
                           gather=rng.choice(fk.GATHERS),
                           index_mode=rng.choice(("in_range",) * 4 + ("negative",) * 2
                                                 + ("out_of_range",)),
                           index_on=index_on)


# --------------------------------------------------------------------------------------------
# the program's pieces


def rms_norm(x, weight, eps: float, gemma: bool, olmo2: bool = False,
             spelling: str = "plain"):
    """HF ``Qwen3RMSNorm`` (``gemma=False``), ``Gemma3RMSNorm`` or ``Olmo2RMSNorm``
    (``olmo2``: ``(w * normed).to(dtype)``, one rounding after the weight) over x's last
    dim; each step spelled as ``spelling`` says (:mod:`fuzz_kinds`)."""
    s = spelling
    xf = fk.cast(x, torch.float32, s)
    normed = fk.rms_normalised(xf, eps, s)
    if gemma:
        return fk.round_to(fk.mul(normed, fk.gemma_factor(weight, s), s), x, s)
    if olmo2:
        return fk.round_to(fk.mul(weight, normed, s), x, s)
    return fk.mul(weight, fk.round_to(normed, x, s), s)


def _up(x):
    """x in float32 (float64 stays float64: the float64 twin)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _attend(q, keys, values):
    """Softmax attention of ``q [.., Hq, Sq, D]`` over ``keys/values [.., Hk, Sk, D]`` (GQA by
    repeat), in float32; the result in q's dtype."""
    rep = q.shape[-3] // keys.shape[-3]
    keys = _up(keys).repeat_interleave(rep, -3)
    values = _up(values).repeat_interleave(rep, -3)
    scores = _up(q) @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (scores.softmax(-1) @ values).to(q.dtype)


def _stored(x, buf_dtype, scale, spelling: str = "plain"):
    """The value a cache of ``buf_dtype`` stores for ``x`` (sglang's set_kv_buffer_native)."""
    if scale is not None:
        x = fk.div(fk.cast(x, torch.float32, spelling), scale, spelling)
    return fk.cast(x, buf_dtype, spelling)


def _loc(p: PrologueProgram, g: torch.Generator) -> torch.Tensor:
    """Distinct, unsorted cache rows (sglang) or the cache positions (hf); with the index mode
    on ``loc``, some negative (the same rows) or one out of range."""
    t = p.num_tokens
    if p.form == "hf":
        start = int(torch.randint(0, p.extra_rows + 1, (1,), generator=g))
        loc, rows = torch.arange(start, start + t), t + p.extra_rows
    else:
        rows = t if p.store == "overlap_view" else t + p.extra_rows
        loc = torch.randperm(rows, generator=g)[:t]
    if p.index_on == "loc" and p.store != "none":
        loc = fk.with_mode(loc, rows, p.index_mode, _index_generator(p.seed))
    return loc


def _hf_positions(p: PrologueProgram, loc: torch.Tensor) -> torch.Tensor:
    """HF's position_ids ``[B, S]``: the cache positions, or (index mode on the positions) the
    positions with the mode applied (angles: any integer is valid)."""
    if p.index_on == "positions":
        loc = fk.with_mode(loc, MAX_POS, p.index_mode, _index_generator(p.seed))
    return loc[None].expand(p.batch, -1).clone()


def build_program(p: PrologueProgram, device: str = "cpu"):
    """(fn, args): ``fn(*args)`` mutates the cache args (as eager) and returns a tuple."""
    inp = _Inputs(p.seed)
    g = inp.g
    hq, hk, d, dt = p.num_q_heads, p.num_kv_heads, p.head_size, p.dtype
    lead = (p.num_tokens,) if p.form == "sglang" else (p.batch, p.num_tokens)
    widths = [hq * d, hk * d, hk * d]
    # projection
    if p.source == "qkv_input":
        inp.add("qkv", _uniform(g, (*lead, sum(widths)), dt))
        project = lambda e: e["qkv"].split(widths, -1)
    elif p.source == "strided":
        inp.add("qkv", _uniform(g, (*lead, sum(widths) + 8), dt))
        project = lambda e: e["qkv"][..., :sum(widths)].split(widths, -1)
    elif p.source == "qkv_mm":
        inp.add("x", _uniform(g, (*lead, HIDDEN), dt))
        inp.add("w", _selection(g, HIDDEN, sum(widths), dt))
        project = lambda e: (e["x"] @ e["w"]).split(widths, -1)
    else:
        for name, width in zip("qkv", widths, strict=True):
            inp.add(f"{name}_in", _uniform(g, (*lead, width), dt))
        project = lambda e: (e["q_in"], e["k_in"], e["v_in"])
    # norm weights (Gemma: around 0, used as 1 + w; Qwen3: around 1)
    if p.norm != "none":
        for name, heads in (("q", hq), ("k", hk)):
            width = heads * d if p.norm == "whole" else d
            w = torch.randn(width, generator=g, dtype=torch.float64) * 0.1
            inp.add(f"{name}_weight", (w + (0.0 if p.gemma else 1.0)).to(dt))
    k_eps = 1e-5 if p.norm == "eps" else EPS
    # rope tables
    if p.form == "sglang":
        positions = torch.randint(0, MAX_POS, (p.num_tokens,), generator=g)
        if p.index_on == "positions":
            positions = fk.with_mode(positions, MAX_POS, p.index_mode, _index_generator(p.seed))
        inp.add("positions", positions)
        inp.add("cos_sin_cache", _uniform(g, (MAX_POS, p.rotary_dim)))
    else:
        inp.add("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, p.rotary_dim, 2,
                                                            dtype=torch.float32)
                                               / p.rotary_dim)))
    # caches
    loc = _loc(p, g)
    if p.store != "none":
        inp.add("loc", loc)
        if p.form == "hf":
            inp.add("position_ids", _hf_positions(p, loc))
            shape = (p.batch, hk, p.num_tokens + p.extra_rows, d)
        else:  # overlap_view: the k cache is the projection's T rows, v's as many
            shape = (p.num_tokens + (0 if p.store == "overlap_view" else p.extra_rows), hk, d)
        if p.store != "overlap_view":
            inp.add("k_cache", _uniform(g, shape, p.cache_dtype))
        inp.add("v_cache", _uniform(g, shape, p.cache_dtype))
    elif p.form == "hf":
        inp.add("position_ids", _hf_positions(p, loc))
    names = list(inp.named)
    body = _sglang_body(p, project, k_eps) if p.form == "sglang" else _hf_body(p, project, k_eps)

    def fn(*tensors):
        return tuple(body(dict(zip(names, tensors, strict=True))))

    fn.arg_names = names
    args = tuple(t.to(device) for t in inp.named.values())
    return fn, args


def _normed(p: PrologueProgram, e: dict, x, heads: int, name: str, eps: float, outs: list):
    """x (``[*lead, heads * D]``) -> ``[*lead, heads, D]``, normalised as ``p.norm`` says."""
    lead = x.shape[:-1]
    if p.norm == "none":
        return x.view(*lead, heads, p.head_size)
    if p.norm == "whole":
        return rms_norm(x, e[f"{name}_weight"], eps, p.gemma, p.olmo2, p.spelling).view(
            *lead, heads, p.head_size)
    out = rms_norm(x.view(*lead, heads, p.head_size), e[f"{name}_weight"], eps, p.gemma,
                   spelling=p.spelling)
    if p.norm == "other_reader" and name == "q":
        outs.append(out)  # the normalised q, read besides the RoPE
    return out


def _after_store(p: PrologueProgram, rq, rk, rope, outs: list):
    """After the store (if any): the second RoPE pair (``rope(q, k)``, its results returned)
    and the reader of the rotated q or k (``fuzz_kinds.read``: views read on, or an in-place
    custom op on a view, the tensor read on by the outputs and the attention). The q the
    attention reads."""
    if p.second:
        rq2, rk2 = rope(rq, rk)
        outs += [rq2, rk2]
    outs += fk.read(rq if p.reader_on == "q" else rk, p.reader, p.reader_use, p.custom_view)
    return rq2 if p.second else rq


def _sglang_body(p: PrologueProgram, project, k_eps: float):
    t, hq, hk, d, rot = p.num_tokens, p.num_q_heads, p.num_kv_heads, p.head_size, p.rotary_dim

    def body(e):
        outs: list = []
        q, k, v = project(e)
        qn = _normed(p, e, q, hq, "q", EPS, outs)
        kn = _normed(p, e, k, hk, "k", k_eps, outs)
        cache, positions = e["cos_sin_cache"], e["positions"]
        rq = rope_native(qn, cache, positions, rot, p.is_neox, p.spelling, p.gather)
        rk = rope_native(kn, cache, positions, rot, p.is_neox, p.spelling, p.gather)
        outs += [rq.reshape(t, hq * d), rk.reshape(t, hk * d)]  # as forward_native returns
        v3 = v.view(t, hk, d)

        def again(x, y):  # the second RoPE pair, at the positions flipped (once)
            flipped = positions.flip(0)
            return tuple(rope_native(z, cache, flipped, rot, p.is_neox, p.spelling, p.gather)
                         for z in (x, y))

        if p.store == "none":
            rq = _after_store(p, rq, rk, again, outs)
            outs.append(_attend(rq.transpose(0, 1), rk.transpose(0, 1), v3.transpose(0, 1)))
            return outs
        loc = e["loc"]
        if p.store == "overlap_view":
            k_cache = k.view(t, hk, d)  # the projection's own k region
        elif p.store == "computed_cache":
            k_cache = e["k_cache"] * 0.5  # exact (a clone would not survive functionalization)
        else:
            k_cache = e["k_cache"]
        v_cache = e["v_cache"] * 0.5 if p.store == "computed_cache" else e["v_cache"]
        k_val = _stored(rk, k_cache.dtype, p.scale, p.spelling)
        v_val = _stored(v3, v_cache.dtype, p.scale, p.spelling)
        v_loc = loc.flip(0) if p.store == "other_loc" else loc
        if p.store == "accumulate":
            k_cache.index_put_((loc,), k_val, accumulate=True)
            v_cache.index_put_((loc,), v_val, accumulate=True)
        elif p.store_how == "index_put_":
            k_cache.index_put_((loc,), k_val)
            v_cache.index_put_((v_loc,), v_val)
        else:
            k_cache[loc] = k_val
            v_cache[v_loc] = v_val
        rq = _after_store(p, rq, rk, again, outs)
        outs.append(_attend(rq.transpose(0, 1), k_cache.transpose(0, 1),
                            v_cache.transpose(0, 1)))
        if p.store == "computed_cache":
            outs += [k_cache, v_cache]
        return outs

    return body


def _hf_body(p: PrologueProgram, project, k_eps: float):
    b, s, hq, hk, d, rot = (p.batch, p.num_tokens, p.num_q_heads, p.num_kv_heads, p.head_size,
                            p.rotary_dim)

    def body(e):
        outs: list = []
        q, k, v = project(e)
        qn = _normed(p, e, q, hq, "q", EPS, outs).transpose(1, 2)  # [B, Hq, S, D]
        kn = _normed(p, e, k, hk, "k", k_eps, outs).transpose(1, 2)
        inv_freq = e["inv_freq"]
        freqs = e["position_ids"][:, :, None].to(inv_freq.dtype) * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = hf_tables(emb, qn.dtype, p.spelling)
        rq, rk = rope_hf(qn, cos, sin, rot, p.spelling), rope_hf(kn, cos, sin, rot, p.spelling)
        outs += [rq, rk]
        v4 = v.view(b, s, hk, d).transpose(1, 2)

        def again(x, y):  # the second RoPE pair, at the positions flipped (once)
            cos2, sin2 = cos.flip(1), sin.flip(1)
            return tuple(rope_hf(z, cos2, sin2, rot, p.spelling) for z in (x, y))

        if p.store == "none":
            rq = _after_store(p, rq, rk, again, outs)
            outs.append(_attend(rq, rk, v4))
            return outs
        cp = e["loc"]
        k_cache, v_cache = e["k_cache"], e["v_cache"]
        if p.store == "computed_cache":
            k_cache, v_cache = k_cache * 0.5, v_cache * 0.5
        k_val = fk.cast(rk, k_cache.dtype, p.spelling)
        v_val = fk.cast(v4, v_cache.dtype, p.spelling)
        v_cp = cp.flip(0) if p.store == "other_loc" else cp
        if p.store == "accumulate":
            k_cache[:, :, cp] += k_val
            v_cache[:, :, cp] += v_val
        elif p.store_how == "index_copy_":
            k_cache.index_copy_(2, cp, k_val)
            v_cache.index_copy_(2, v_cp, v_val)
        else:
            k_cache[:, :, cp] = k_val
            v_cache[:, :, v_cp] = v_val
        rq = _after_store(p, rq, rk, again, outs)
        outs.append(_attend(rq, k_cache, v_cache).transpose(1, 2).reshape(b, s, hq * d))
        if p.store == "computed_cache":
            outs += [k_cache, v_cache]
        return outs

    return body


# --------------------------------------------------------------------------------------------
# known pass bugs (misses): labelled in the report while open

KNOWN_BUGS: dict[str, str] = {
    "gptj_mutated": fk.GPTJ_MUTATED,
    "hf_out_norm": "HF RoPE of a norm whose last product is spelled with out=: "
                   "functionalization re-creates x's transpose for each of its readers, and the "
                   "RoPE matcher compares x by node ('rotate_half(x) does not rotate the x that "
                   "multiplies cos'): the pair is left to Inductor (seed 2000010)",
}


def half_norm_cast_to_float32(p: PrologueProgram) -> bool:
    """A Gemma-form norm of bf16/fp16 q/k, RoPE, then a KV store that casts the rotated k to
    float32 (``k.to(float32) / scale``, or a float32 cache). Inductor's ``pointless_convert``
    may drop eager's bf16 roundings of k on the way (convert(convert(x, bf16), f32) -> x):
    k's norm and RoPE are then one float32 computation in the post-grad graph while q's stay
    rounded. That the source rounded k cannot be proven from such a graph, so the pair is
    refused (:func:`dtype_refusal`). Whether the two converts meet depends on the graph
    around them (a view between them, a cache computed in the graph, ``+=``: measured both
    ways), so for these programs the oracle takes either the normal rewrite or that refusal;
    values and strides are checked the same either way."""
    return (p.gemma and p.norm != "none" and p.dtype != torch.float32 and p.store != "none"
            and (p.scale is not None or p.cache_dtype == torch.float32)
            and p.head_size in ALIGNED_HEADS)


def dtype_refusal() -> dict[str, int]:
    """The counters of a pair refused because k's RoPE is float32 and q's is not."""
    return {"rewritten": 0, "qk_norm rewritten": 0, "kv_store rewritten": 0,
            "skipped: q and k have different dtypes": 2}


def known_bug(p: PrologueProgram) -> str | None:
    """The known open pass bug ``p`` hits (its oracle failures are then labelled), or None."""
    if fk.gptj_mutated(p.form, p.is_neox, p.rotary_dim, p.head_size, p.reader):
        return "gptj_mutated"
    if p.form == "hf" and p.spelling == "out" and p.norm != "none":
        return "hf_out_norm"
    return None


# --------------------------------------------------------------------------------------------
# the checker

SIZE1_STRIDES_FAIL = False
COUNTERS = ("rewritten", "qk_norm rewritten", "kv_store rewritten")


@dataclass
class Result:
    program: PrologueProgram
    expected: dict
    counters: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "category: message"
    seconds: float = 0.0
    inductor_only: bool = False  # the failures reproduce without the passes
    known_bug: str | None = None
    skipped: str | None = None  # not run on this device, and why

    @property
    def categories(self) -> set[str]:
        return {f.split(":", 1)[0] for f in self.failures}

    @property
    def failed(self) -> bool:
        if self.inductor_only or self.skipped:
            return False
        notes = set() if SIZE1_STRIDES_FAIL else {"size1_strides"}
        if self.known_bug:  # a known miss: its counters may differ, nothing else may
            notes |= {"oracle_missed", "oracle_unexpected"}
        return bool(self.categories - notes)

    @property
    def hit_known_bug(self) -> bool:
        return bool(self.known_bug and self.categories & {"oracle_missed",
                                                          "oracle_unexpected"})


def tolerance(p: PrologueProgram) -> tuple[float, float]:
    """(atol, rtol) for every float comparison of ``p``: the loosest of the model and the cache
    dtype (a bf16 k stored in an fp32 cache carries bf16 rounding; an fp16 cache rounds what
    the float64 twin keeps)."""
    tols = [TOLERANCES[p.dtype]] + ([TOLERANCES[p.cache_dtype]] if p.store != "none" else [])
    return max(t[0] for t in tols), max(t[1] for t in tols)


def _output_failures(p: PrologueProgram, outs, eager, ref64) -> list[str]:
    """``fuzz_layouts``' values and strides checks, with :func:`tolerance` for every output."""
    found = _value_and_layout_failures(outs, eager, eager) if isinstance(outs, tuple) else [
        "values: the compiled function did not return a tuple"]
    found = [f for f in found if not f.startswith("values: output")
             or "differs from" not in f]  # values: below, with the program's tolerance
    if not isinstance(outs, tuple) or len(outs) != len(eager):
        return found
    atol, rtol = tolerance(p)
    for i, (out, e, r) in enumerate(zip(outs, eager, ref64, strict=True)):
        if not e.is_floating_point() or out.shape != e.shape or out.dtype != e.dtype:
            continue
        got = out.detach().cpu().double()
        for what, want in (("eager", e.cpu()), ("float64", r.cpu().to(e.dtype))):
            if not torch.allclose(got, want.double(), atol=atol, rtol=rtol):
                err = (got - want.double()).abs().max().item()
                found.append(f"values: output {i} differs from {what} (max abs error "
                             f"{err:.3g})")
                break
    return found


def _arg_failures(p: PrologueProgram, names, after, eager_after, ref64_after) -> list[str]:
    """The args after the compiled step against eager's (and float64's) after the step."""
    found = []
    for name, got, want, r in zip(names, after, eager_after, ref64_after, strict=True):
        if not got.is_floating_point():
            if not torch.equal(got.cpu(), want.cpu()):
                found.append(f"values: integer input {name} differs from eager after the step")
            continue
        atol, rtol = tolerance(p)
        for what, ref in (("eager", want), ("float64", r.to(want.dtype))):
            if not torch.allclose(got.cpu().double(), ref.cpu().double(), atol=atol, rtol=rtol):
                err = (got.cpu().double() - ref.cpu().double()).abs().max().item()
                found.append(f"values: input {name} after the step differs from {what} (max "
                             f"abs error {err:.3g})")
                break
    return found


def _row_mask(loc: torch.Tensor, rows: int) -> torch.Tensor:
    written = torch.zeros(rows, dtype=torch.bool)
    written[loc.cpu()] = True
    return written


def _cache_row_failures(p: PrologueProgram, env_before: dict, env_after: dict,
                        outs, kv_fused: bool) -> list[str]:
    """Untouched rows bit-identical; written rows = torch's cast of the compiled k (fused)."""
    found = []
    if p.store in ("none", "computed_cache", "overlap_view"):
        return found
    loc = env_before["loc"].cpu()
    dim = 0 if p.form == "sglang" else 2
    for name in ("k_cache", "v_cache"):
        before, after = env_before[name].cpu(), env_after[name].cpu()
        written = _row_mask(loc, before.shape[dim])
        keep = before.movedim(dim, 0)[~written]
        if not torch.equal(after.movedim(dim, 0)[~written], keep):
            found.append(f"values: {name} rows the step does not write changed")
    k_index = 2 if p.norm == "other_reader" else 1  # outputs: [normalised q,] q, k, ...
    mutated_k = p.reader == "custom_op" and p.reader_on == "k"  # after the store: not k's
    if kv_fused and not mutated_k and isinstance(outs, tuple) and len(outs) > k_index:
        k_out = outs[k_index].detach().cpu()
        after = env_after["k_cache"].cpu()
        if p.form == "sglang":
            want = _stored(k_out.view(p.num_tokens, p.num_kv_heads, p.head_size), after.dtype,
                           p.scale)
            got = after[loc]
        else:
            want, got = k_out.to(after.dtype), after[:, :, loc]
        if not torch.equal(got, want):
            err = (got.double() - want.double()).abs().max().item()
            found.append(f"values: k_cache written rows are not torch's cast of the compiled k "
                         f"(max abs difference {err:.3g})")
    return found


def _counter_failures(expected: dict, seen: dict) -> list[str]:
    found = []
    for key, want in expected.items():
        if "skipped: " in key:
            got = sum(v for k, v in seen.items() if k.startswith(key))
        else:
            got = seen.get(key, 0)
        if got != want:
            kind = "oracle_missed" if got < want else "oracle_unexpected"
            found.append(f"{kind}: counter {key!r} is {got}, expected {want}; counters "
                         f"{ {k: v for k, v in seen.items() if 'skipped' in k or k in COUNTERS} }")
    return found


def check_program(p: PrologueProgram, device: str = "cpu", control: bool = True) -> Result:
    """Compile ``p`` with the passes and check the property (module docstring); ``control``:
    re-run a values/strides failure with plain Inductor."""
    start = time.perf_counter()
    result = Result(p, p.expected(), known_bug=known_bug(p),
                    skipped=skipped_on(device, p.eager_raises))
    if result.skipped:
        return result
    fn, args = build_program(p, device)
    inp_names = fn.arg_names
    env_before = dict(zip(inp_names, [a.clone() for a in args], strict=True))
    eager_args = [a.clone() for a in args]
    eager, result.failures = run_eagerly(fn, eager_args, p.eager_raises)
    raised = eager is None
    ref_args = list(_to64(tuple(a.clone() for a in args)))
    ref64 = None if raised else fn(*ref_args)
    outs, after, seen, error = _run_compiled(fn, args, "rope_compile", compile_options(device),
                                             one_thread=raised)
    result.counters = seen
    result.failures += run_failures(raised, outs, error)
    for key in ("pass_errors", "candidate_errors"):
        if seen.get(key):
            result.failures.append(f"pass_errors: counters[{key!r}] = {seen[key]}")
    if error is None or fk.is_run_error(error):  # compiled: the counters are the compile's
        counter_failures = _counter_failures(result.expected, seen)
        if counter_failures and half_norm_cast_to_float32(p):
            refused = dtype_refusal()  # Inductor may have dropped k's roundings: see there
            if not _counter_failures(refused, seen):
                result.expected, counter_failures = refused, []
        result.failures += counter_failures
    if outs is not None and not raised:
        result.failures += _output_failures(p, outs, eager, ref64)
        result.failures += _arg_failures(p, inp_names, after, eager_args, ref_args)
        kv_fused = seen.get("kv_store rewritten", 0) > 0
        result.failures += _cache_row_failures(p, env_before, dict(zip(inp_names, after,
                                                                       strict=True)),
                                               outs, kv_fused)
    others = [f for f in result.failures if f.split(":", 1)[0] not in ORACLE_CATEGORIES]
    if control and others and not pass_caused(result):
        base_outs, base_after, _, base_error = _run_compiled(fn, args, "inductor", None,
                                                             raised)
        base = run_failures(raised, base_outs, base_error)
        if base_outs is not None and not raised:
            base += _output_failures(p, base_outs, eager, ref64)
            base += _arg_failures(p, inp_names, base_after, eager_args, ref_args)
            base += _cache_row_failures(p, env_before, dict(zip(inp_names, base_after,
                                                                strict=True)), base_outs,
                                        kv_fused=False)  # the fused kernel's own property
        result.inductor_only = same_failures(others, base)
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# statistics


def new_stats(device: str) -> dict:
    return {
        "device": device, "torch": torch.__version__, "programs": 0, "failed_programs": 0,
        "inductor_only_programs": 0, "known_bug_programs": {},
        "expected": dict.fromkeys(COUNTERS, 0),
        "done": dict.fromkeys(COUNTERS, 0), "near_miss_skips_expected": 0,
        "wrong_values": 0, "stride_mismatches": 0, "size1_stride_notes": 0,
        "compile_failures": 0, "pass_errors": 0, "oracle_missed": 0, "oracle_unexpected": 0,
        "seconds": 0.0, "by_form": {}, "by_norm": {}, "by_store": {}, "by_dtype": {},
        "by_source": {}, **new_kind_stats(), "failures": [],
    }


def record(stats: dict, r: Result) -> None:
    p = r.program
    record_kinds(stats, p, r)
    if r.skipped:
        return
    stats["programs"] += 1
    stats["seconds"] += r.seconds
    for key in COUNTERS:
        stats["expected"][key] += r.expected.get(key, 0)
        stats["done"][key] += r.counters.get(key, 0)
    stats["near_miss_skips_expected"] += sum(1 for k in r.expected if "skipped" in k)
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
        stats["failures"].append({"seed": p.seed, "program": p.describe(), "failed": r.failed,
                                  "inductor_only": r.inductor_only,
                                  "known_bug": r.known_bug if r.hit_known_bug else None,
                                  "failures": r.failures})
    for table, key in (("by_form", p.form), ("by_norm", p.norm), ("by_store", p.store),
                       ("by_dtype", str(p.dtype).replace("torch.", "")),
                       ("by_source", p.source)):
        row = stats[table].setdefault(key, {"programs": 0, "failed": 0})
        row["programs"] += 1
        row["failed"] += int(r.failed)


def summary(stats: dict) -> str:
    n = max(stats["programs"], 1)
    exp, done = stats["expected"], stats["done"]

    def table(name):
        return ", ".join(f"{k} {v['programs']}" + (f" ({v['failed']} FAILED)" if v["failed"]
                                                   else "")
                         for k, v in sorted(stats[name].items()))

    return "\n".join([
        f"prologue fuzz ({stats['device']}, torch {stats['torch']}): {stats['programs']} "
        f"programs, {stats['failed_programs']} failed, {stats['inductor_only_programs']} "
        f"inductor-only, known pass bugs hit: {stats['known_bug_programs'] or 'none'}; "
        f"{stats['seconds']:.0f} s ({stats['seconds'] / n:.2f} s/program)",
        "  rewrites expected/done: " + ", ".join(f"{k} {exp[k]}/{done[k]}" for k in COUNTERS)
        + f"; near-miss skips expected {stats['near_miss_skips_expected']}; oracle missed "
        f"{stats['oracle_missed']}, unexpected {stats['oracle_unexpected']}",
        f"  wrong values {stats['wrong_values']}, stride mismatches "
        f"{stats['stride_mismatches']} (+ {stats['size1_stride_notes']} on size-1 dims only), "
        f"compile failures {stats['compile_failures']}, pass errors {stats['pass_errors']}",
        f"  forms: {table('by_form')}; sources: {table('by_source')}; dtypes: "
        f"{table('by_dtype')}",
        f"  norms: {table('by_norm')}; stores: {table('by_store')}",
        kinds_summary(stats),
    ])


def run(device: str, programs: int, seed: int, fail_fast: bool = False, log=print,
        time_limit: float | None = None, seeds=None) -> dict:
    """Check programs ``seed .. seed + programs - 1`` (or ``seeds``); with ``time_limit``
    (seconds), stop drawing new programs once it has passed."""
    stats = new_stats(device)
    start = time.perf_counter()
    for s in (seeds if seeds is not None else range(seed, seed + programs)):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
        p = draw_program(s)
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


def main(argv=None) -> int:
    return fuzz_main(sys.modules[__name__], argv, {
        "oracle_rules": list(ORACLE_RULES), "known_bugs": KNOWN_BUGS})


if __name__ == "__main__":
    sys.exit(main())
