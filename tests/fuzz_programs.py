"""Generators and helpers for the fuzz tests (``test_fuzz_pass.py``, ``test_fuzz_op.py``,
``test_memory.py``).

Hypothesis profiles and switches
--------------------------------
Two profiles are registered here (never loaded globally, so other test modules keep their own
settings); the fuzz tests take their settings from :func:`fuzz_settings`, which reads the
environment variable ``ROPE_FUZZ_PROFILE``:

* ``ci`` (default): small, derandomized (the same examples on every run), no deadline; the
  per-test example counts keep all fuzz tests together within the CI budget (a few minutes on
  a 2-core machine).
* ``long``: thousands of examples per property, randomized, with the example database, for a
  soak run, e.g. ``ROPE_FUZZ_PROFILE=long python -m pytest tests/test_fuzz_pass.py``.

``ROPE_FUZZ_STATS=path`` writes the figures printed after the pytest summary (examples tried
per property, rewrites expected and done, wrong decisions) as JSON.

Programs
--------
:class:`RopeProgram` describes one RoPE-like program; :func:`build_program` turns it into a plain
Python function written with torch calls (spelled like ``rope_compile.module.apply_rotary_emb`` /
``RotaryEmbedding.forward_native``, with the drawn perturbation injected) plus its example
inputs. The oracle properties :attr:`RopeProgram.expected_rewrites`,
:attr:`RopeProgram.expected_matches` and :attr:`RopeProgram.expected_pairs` are computed from
the drawn parameters alone. :func:`rope_programs` draws them with a structured (shrinkable)
strategy, :func:`uniform_rope_programs` uniformly from one drawn seed (an even spread for the
expensive compiled tests). :func:`post_grad_graph` traces a program to the graph the pass sees
inside Inductor (``make_fx`` with Inductor's decompositions, dead-code elimination, Inductor's
joint-graph and post-grad passes) without compiling it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from rope_compile.module import apply_rotary_emb

# --------------------------------------------------------------------------------------------
# hypothesis profiles

PROFILE = os.environ.get("ROPE_FUZZ_PROFILE", "ci")

_COMMON = {
    "deadline": None,
    "suppress_health_check": (HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much),
}
settings.register_profile("ci", max_examples=50, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=2000, derandomize=False, **_COMMON)
if PROFILE not in ("ci", "long"):
    raise ValueError(f"ROPE_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")


def fuzz_settings(ci: int, long: int, shrink: bool = True) -> settings:
    """Settings of one fuzz test: ``ci`` examples under the ci profile, ``long`` under long.

    ``shrink=False`` for tests whose examples are expensive (each compiles): a failure is then
    reported as generated, with the program description in the assertion message."""
    phases = tuple(Phase) if shrink else tuple(p for p in Phase if p != Phase.shrink)
    return settings(settings.get_profile(PROFILE),
                    max_examples=ci if PROFILE == "ci" else long, phases=phases)


# Figures for the final report: how many examples each property tried, and what it found.
STATS: dict[str, dict[str, int]] = {}


def record(prop: str, **counts: int) -> None:
    entry = STATS.setdefault(prop, {})
    for key, value in counts.items():
        entry[key] = entry.get(key, 0) + value


def format_stats() -> str:
    lines = []
    for prop, entry in sorted(STATS.items()):
        parts = ", ".join(f"{k}={v}" for k, v in sorted(entry.items()))
        lines.append(f"[rope fuzz] {prop}: {parts}")
    return "\n".join(lines)


def report_stats_at_exit(config) -> None:
    """Print :data:`STATS` after pytest's summary (once per session); with the environment
    variable ``ROPE_FUZZ_STATS=path``, also write them there as JSON."""
    if getattr(config, "_rope_fuzz_report", False):
        return
    config._rope_fuzz_report = True
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def report():
        if not STATS:
            return
        if reporter is not None:
            reporter.write_line(f"rope fuzz figures (profile {PROFILE}):")
            for line in format_stats().splitlines():
                reporter.write_line(line)
        path = os.environ.get("ROPE_FUZZ_STATS")
        if path:
            import json

            with open(path, "w") as f:
                json.dump({"profile": PROFILE, "stats": STATS}, f, indent=1, sort_keys=True)

    config.add_cleanup(report)


# --------------------------------------------------------------------------------------------
# programs

ALIGNED_HEADS = (128, 256)
UNALIGNED_HEADS = (64, 96, 192)
FUSED_HEAD_SIZES = (128, 256, 512)  # the pass's default head sizes
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Perturbations. One-sided ones break the RoPE of ``defect_side`` only.
ONE_SIDED = (
    "swap_sign",  # o1 = x1*cos + x2*sin, o2 = x2*cos - x1*sin (the inverse rotation)
    "cos_for_sin",  # o2 = x2*cos + x1*cos
    "wrong_split",  # rotated halves of rot/2 - 2 features (cos/sin sliced to match)
    "swapped_halves",  # (x1, x2) swapped: x1 = second half / odd features
    "split_positions",  # cos from cache[positions], sin from cache[positions2]
    "sub_alpha",  # o1 = torch.sub(x1*cos, x2*sin, alpha=2.0): an argument that changes the math
    "add_alpha",  # o2 = torch.add(x2*cos, x1*sin, alpha=0.5)
)
# Both sides are RoPE, but not a pair the fused op can serve.
UNPAIRED = (
    "diff_positions",  # k uses another positions tensor
    "diff_cache",  # k uses another cos_sin_cache
    "mixed_style",  # neox on q, GPT-J on k (or the reverse)
    "mixed_dtype",  # k cast to another float dtype before its RoPE
)
LONE = ("lone_q",)  # k is returned unrotated
DEFECTS = ONE_SIDED + UNPAIRED + LONE

SOURCES = ("flat", "3d", "strided", "qkv")
# q and k that share memory, which one in-place call cannot rotate: "shared" (k is q, as in
# shared-QK attention, ``forward_native(positions, q, q)``), "overlap" (k a view of q's first
# heads). Values are checked, the rewrite count is not (a pass may refuse or copy).
ALIASING_SOURCES = ("shared", "overlap")

MAX_POSITION = 32
MAX_OFFSET = 8
HIDDEN = 16  # width of x in the qkv-projection programs


@dataclass(frozen=True)
class RopeProgram:
    is_neox: bool
    head_size: int
    rotary_dim: int
    num_q_heads: int
    num_kv_heads: int
    dtype: torch.dtype
    # "f32": fp32 cache input; "model": cache input in the model dtype; "cast": fp32 cache input
    # cast to the model dtype inside the program (as RotaryEmbedding under torch.compile).
    cache_mode: str
    pos_dtype: torch.dtype
    offsets: bool  # positions = positions + offsets inside the program
    # "flat": q/k inputs [T, H*D]; "3d": [T, H, D]; "strided": [T, H*D] column slices of wider
    # buffers; "qkv": q, k, v split from x @ W inside the program; "shared" / "overlap": see
    # ALIASING_SOURCES.
    source: str
    # Pre-RoPE q/k also returned: "none"; "scaled": q_pre * 2, k_pre * 2; "alias": q_pre and
    # k_pre themselves (views of the inputs or of the projection).
    extra_users: str
    library_spelling: bool  # non-defective sides call rope_compile.module.apply_rotary_emb
    defect: str | None
    defect_side: str  # "q" or "k" (one-sided defects)
    num_tokens: int
    seed: int
    # 2: RoPE applied again to the first layer's outputs (chained RoPE, dependent pairs)
    layers: int = 1
    strided_positions: bool = False  # positions (and offsets, positions2) are [::2] views
    transposed_cache: bool = False  # cos_sin_cache has strides (1, max_position)
    dynamic: bool = False  # compiled tests: tokens dim marked dynamic, rerun with more tokens

    @property
    def is_real_pair(self) -> bool:
        """q and k are both RoPE and could share one fused call (ignoring head size)."""
        return self.defect is None

    @property
    def mixed_dtype(self) -> torch.dtype:
        """k's dtype in a "mixed_dtype" program."""
        return torch.float32 if self.dtype != torch.float32 else torch.bfloat16

    @property
    def tolerance_dtype(self) -> torch.dtype | None:
        """The dtype whose precision bounds every output (None: each output's own dtype)."""
        if self.defect != "mixed_dtype":
            return None
        return max(self.dtype, self.mixed_dtype, key=lambda d: torch.finfo(d).eps)

    @property
    def operands_overlap(self) -> bool:
        return self.source in ALIASING_SOURCES

    @property
    def expect_rewrite(self) -> bool:
        return self.is_real_pair and self.head_size in FUSED_HEAD_SIZES

    @property
    def expected_rewrites(self) -> int | None:
        """Pairs the pass must rewrite; None (unspecified) when q and k overlap: a pass may
        refuse them or fuse them correctly, only the values are checked."""
        if self.operands_overlap:
            return None
        if self.layers > 1 and self.expect_rewrite:
            # Chained pairs may be paired across layers (q1 with its own successor q2, as
            # GPT-J graphs order them) and then skipped as dependent: a missed fusion only.
            return None
        return self.layers if self.expect_rewrite else 0

    @property
    def matches_per_layer(self) -> int:
        return 1 if self.defect in ONE_SIDED + LONE else 2

    @property
    def expected_matches(self) -> int | None:
        """RoPE applications ``find_rope_matches`` must prove (None: not specified). Mixed
        dtypes: the matcher looks through float casts of x, so k's RoPE of ``k.to(dtype)`` is
        matched or not depending on whether a view separates the cast from the slicing, and a
        chained program may match ``x.float() -> RoPE -> .to(dtype)``."""
        if self.defect == "mixed_dtype":
            return None
        return self.layers * self.matches_per_layer

    @property
    def expected_pairs(self) -> int | None:
        """Pairs ``pair_matches`` must form (None: not specified). With two dependent layers,
        each match pairs with its other-layer twin when q and k do not pair (the pass then
        skips it: the second depends on the first)."""
        if self.defect == "mixed_dtype":
            return None  # a pass may pair them and skip the pair, or never pair them
        if self.layers == 1:
            return 1 if self.is_real_pair else 0
        return self.matches_per_layer

    def describe(self) -> str:
        parts = [
            "neox" if self.is_neox else "gptj",
            f"D{self.head_size}r{self.rotary_dim}",
            f"H{self.num_q_heads}-{self.num_kv_heads}",
            str(self.dtype).removeprefix("torch."),
            f"cache-{self.cache_mode}",
            str(self.pos_dtype).removeprefix("torch."),
            f"T{self.num_tokens}",
            self.source,
        ]
        if self.offsets:
            parts.append("offsets")
        if self.extra_users != "none":
            parts.append(f"extra-{self.extra_users}")
        if self.library_spelling:
            parts.append("lib")
        if self.layers > 1:
            parts.append(f"layers{self.layers}")
        if self.strided_positions:
            parts.append("strided-pos")
        if self.transposed_cache:
            parts.append("cache-T")
        if self.dynamic:
            parts.append("dynamic")
        if self.defect:
            parts.append(f"DEFECT={self.defect}" + (
                f"@{self.defect_side}" if self.defect in ONE_SIDED else ""))
        parts.append(f"seed{self.seed}")
        return "-".join(parts)


@st.composite
def rope_programs(draw, dynamic: bool = False) -> RopeProgram:
    """A RoPE-like program: a real q/k RoPE pair or a near miss, about half each.

    ``dynamic``: may draw programs whose compiled test marks the tokens dim dynamic."""
    # Fused head sizes (incl. 512) twice as likely as the others: most programs exercise a
    # rewrite, the rest check the pass leaves unaligned heads alone.
    head_size = draw(st.sampled_from(2 * ALIGNED_HEADS + (512,) + UNALIGNED_HEADS))
    full = draw(st.booleans())
    rot = head_size if full else 2 * draw(st.integers(4, head_size // 2 - 1))
    num_q_heads = draw(st.sampled_from((1, 2, 4)))
    num_kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if num_q_heads % h == 0]))
    real = draw(st.booleans())
    defect = None if real else draw(st.sampled_from(DEFECTS))
    is_dynamic = dynamic and draw(st.integers(0, 3)) == 0
    return RopeProgram(
        is_neox=draw(st.booleans()),
        head_size=head_size,
        rotary_dim=rot,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        dtype=draw(st.sampled_from(DTYPES)),
        cache_mode=draw(st.sampled_from(("f32", "model", "cast"))),
        pos_dtype=draw(st.sampled_from((torch.int64, torch.int32))),
        offsets=draw(st.booleans()),
        source=draw(st.sampled_from(2 * SOURCES + ALIASING_SOURCES)),
        extra_users=draw(st.sampled_from(("none", "scaled", "alias"))),
        library_spelling=draw(st.booleans()),
        defect=defect,
        defect_side=draw(st.sampled_from(("q", "k"))),
        num_tokens=draw(st.integers(2 if is_dynamic else 1, 6)),
        seed=draw(st.integers(0, 2**16)),
        layers=draw(st.sampled_from((1, 1, 1, 2))),
        strided_positions=draw(st.booleans()),
        transposed_cache=draw(st.booleans()),
        dynamic=is_dynamic,
    )


def program_from_rng(rng: random.Random, dynamic: bool = False) -> RopeProgram:
    """The same space as :func:`rope_programs`, drawn uniformly from ``rng``: real pairs and
    near misses half each, a quarter dynamic (when allowed)."""
    head_size = rng.choice(2 * ALIGNED_HEADS + (512,) + UNALIGNED_HEADS)
    rot = head_size if rng.random() < 0.5 else 2 * rng.randint(4, head_size // 2 - 1)
    num_q_heads = rng.choice((1, 2, 4))
    is_dynamic = dynamic and rng.random() < 0.25
    return RopeProgram(
        is_neox=rng.random() < 0.5,
        head_size=head_size,
        rotary_dim=rot,
        num_q_heads=num_q_heads,
        num_kv_heads=rng.choice([h for h in (1, 2, 4) if num_q_heads % h == 0]),
        dtype=rng.choice(DTYPES),
        cache_mode=rng.choice(("f32", "model", "cast")),
        pos_dtype=rng.choice((torch.int64, torch.int32)),
        offsets=rng.random() < 0.5,
        source=rng.choice(2 * SOURCES + ALIASING_SOURCES),
        extra_users=rng.choice(("none", "scaled", "alias")),
        library_spelling=rng.random() < 0.5,
        defect=None if rng.random() < 0.5 else rng.choice(DEFECTS),
        defect_side=rng.choice(("q", "k")),
        num_tokens=rng.randint(2 if is_dynamic else 1, 6),
        seed=rng.randint(0, 2**16),
        layers=rng.choice((1, 1, 1, 2)),
        strided_positions=rng.random() < 0.5,
        transposed_cache=rng.random() < 0.5,
        dynamic=is_dynamic,
    )


def uniform_rope_programs(dynamic: bool = False):
    """:func:`program_from_rng` of a drawn seed: an even spread of programs even under the
    derandomized ci profile (whose structured draws favour the simplest choices). For tests
    whose examples are too expensive to shrink anyway."""
    return st.integers(0, 2**64 - 1).map(
        lambda seed: program_from_rng(random.Random(seed), dynamic))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, is_neox: bool,
          defect: str | None, sin_other: torch.Tensor | None, library: bool) -> torch.Tensor:
    """RoPE of ``x`` ``[T, H, D]``, as ``forward_native`` spells it, with ``defect`` injected.

    ``cos``/``sin`` are ``[T, rot/2]`` halves of the gathered cache rows."""
    x_rot = x[..., :rot]
    x_pass = x[..., rot:]
    if defect is None and library:
        return torch.cat((apply_rotary_emb(x_rot, cos, sin, is_neox), x_pass), dim=-1)
    if defect == "split_positions":
        sin = sin_other
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if defect == "wrong_split":
        half = rot // 2 - 2
        cos, sin = cos[..., :half], sin[..., :half]
        if is_neox:
            x1, x2 = x_rot[..., :half], x_rot[..., half:2 * half]
        else:
            x1, x2 = x_rot[..., 0:2 * half:2], x_rot[..., 1:2 * half:2]
        x_pass = x[..., 2 * half:]
    elif is_neox:
        x1, x2 = torch.chunk(x_rot, 2, dim=-1)
    else:
        x1 = x_rot[..., ::2]
        x2 = x_rot[..., 1::2]
    if defect == "swapped_halves":
        x1, x2 = x2, x1
    if defect == "swap_sign":
        o1 = x1 * cos + x2 * sin
        o2 = x2 * cos - x1 * sin
    elif defect == "cos_for_sin":
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * cos
    elif defect == "sub_alpha":
        o1 = torch.sub(x1 * cos, x2 * sin, alpha=2.0)
        o2 = x2 * cos + x1 * sin
    elif defect == "add_alpha":
        o1 = x1 * cos - x2 * sin
        o2 = torch.add(x2 * cos, x1 * sin, alpha=0.5)
    else:
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
    # neox: cat; GPT-J: stack + flatten (as apply_rotary_emb).
    rotated = (torch.cat((o1, o2), dim=-1) if is_neox
               else torch.stack((o1, o2), dim=-1).flatten(-2))
    return torch.cat((rotated, x_pass), dim=-1)


def make_fn(p: RopeProgram):
    """The program as a Python function of ``(positions, offsets, a, b, cache, positions2,
    cache2)``; ``a, b`` are ``q, k`` or ``x, w_qkv`` (``source == "qkv"``)."""
    d, rot, hq, hk = p.head_size, p.rotary_dim, p.num_q_heads, p.num_kv_heads

    def trig(cache, positions, model_dtype):
        if p.cache_mode == "cast":
            cache = cache.to(model_dtype)
        cos_sin = cache.index_select(0, positions)
        return cos_sin.chunk(2, dim=-1)

    def fn(positions, offsets, a, b, cache, positions2, cache2):
        if p.offsets:
            positions = positions + offsets
            positions2 = positions2 + offsets
        positions = positions.flatten()
        num_tokens = positions.shape[0]
        outs = []
        if p.source == "qkv":
            qkv = a @ b
            q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
            outs.append(v)
        elif p.source == "shared":
            q, k = a, a
        elif p.source == "overlap":
            q, k = a, a[:, :hk * d]
        else:
            q, k = a, b
        cos, sin = trig(cache, positions, q.dtype)

        def side(x, name):
            shape = x.shape
            if name == "k" and p.defect == "mixed_dtype" and x.dtype != torch.float64:
                x = x.to(p.mixed_dtype)  # (the float64 twin stays float64)
            x3 = x.view(num_tokens, -1, d)
            defect = p.defect if (p.defect in ONE_SIDED and p.defect_side == name) else None
            is_neox = p.is_neox
            c, s = cos, sin
            sin2 = None
            if defect == "split_positions":
                _, sin2 = trig(cache, positions2, x.dtype)
            if name == "k":
                if p.defect == "lone_q":
                    return x
                if p.defect == "mixed_style":
                    is_neox = not is_neox
                if p.defect == "diff_positions":
                    c, s = trig(cache, positions2, x.dtype)
                if p.defect == "diff_cache":
                    c, s = trig(cache2, positions, x.dtype)
            out = _rope(x3, c, s, rot, is_neox, defect, sin2, p.library_spelling)
            return out.reshape(shape)

        q_out, k_out = side(q, "q"), side(k, "k")
        for _ in range(p.layers - 1):
            q_out, k_out = side(q_out, "q"), side(k_out, "k")
        outs = [q_out, k_out, *outs]
        if p.extra_users == "scaled":
            outs += [q * 2, k * 2]
        elif p.extra_users == "alias":
            outs += [q, k]
        return tuple(outs)

    return fn


def _uniform(shape, dtype, g) -> torch.Tensor:
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def _positions(values: torch.Tensor, p: RopeProgram) -> torch.Tensor:
    values = values.to(p.pos_dtype)
    if not p.strided_positions:
        return values
    wide = torch.full((2 * values.numel(),), -(10**6), dtype=p.pos_dtype)  # poison
    wide[::2] = values
    return wide[::2]


def _cache(shape, dtype, p: RopeProgram, g) -> torch.Tensor:
    values = _uniform(shape, dtype, g)
    return values.t().contiguous().t() if p.transposed_cache else values


def make_inputs(p: RopeProgram, num_tokens: int | None = None) -> tuple[torch.Tensor, ...]:
    """Example inputs of :func:`make_fn`'s function (values in [-1, 1]; the projection weight is
    a signed selection matrix, so ``x @ w`` is exact in every dtype). ``num_tokens`` overrides
    the program's (dynamic-shape reruns)."""
    t = p.num_tokens if num_tokens is None else num_tokens
    g = torch.Generator().manual_seed(p.seed + 7919 * t)
    d, hq, hk, rot = p.head_size, p.num_q_heads, p.num_kv_heads, p.rotary_dim
    top = MAX_POSITION - (MAX_OFFSET if p.offsets else 0)
    pos = torch.randint(0, top, (t,), generator=g)
    pos2 = torch.randint(0, top, (t,), generator=g)
    if t > 1 and torch.equal(pos, pos2):
        pos2 = pos2.flip(0)
    if torch.equal(pos, pos2):
        pos2 = (pos + 1) % top
    positions, positions2 = _positions(pos, p), _positions(pos2, p)
    offsets = _positions(torch.randint(0, MAX_OFFSET, (t,), generator=g), p)
    cache_dtype = p.dtype if p.cache_mode == "model" else torch.float32
    cache = _cache((MAX_POSITION, rot), cache_dtype, p, g)
    cache2 = _cache((MAX_POSITION, rot), cache_dtype, p, g)
    if p.source == "qkv":
        width = (hq + 2 * hk) * d
        a = _uniform((t, HIDDEN), p.dtype, g)
        rows = torch.randint(0, HIDDEN, (width,), generator=g)
        signs = torch.randint(0, 2, (width,), generator=g) * 2 - 1
        b = torch.zeros(HIDDEN, width, dtype=p.dtype)
        b[rows, torch.arange(width)] = signs.to(p.dtype)
    elif p.source in ("shared", "overlap"):
        a = _uniform((t, hq * d), p.dtype, g)
        b = _uniform((t, 1), p.dtype, g)  # unused
    elif p.source == "3d":
        a = _uniform((t, hq, d), p.dtype, g)
        b = _uniform((t, hk, d), p.dtype, g)
    elif p.source == "flat":
        a = _uniform((t, hq * d), p.dtype, g)
        b = _uniform((t, hk * d), p.dtype, g)
    elif p.source == "strided":
        a = _uniform((t, hq * d + 24), p.dtype, g)[:, 8:8 + hq * d]
        b = _uniform((t, hk * d + 40), p.dtype, g)[:, 32:32 + hk * d]
    else:
        raise ValueError(p.source)
    return positions, offsets, a, b, cache, positions2, cache2


def build_program(p: RopeProgram):
    return make_fn(p), make_inputs(p)


def to_float64(args):
    return tuple(a.to(torch.float64) if a.is_floating_point() else a for a in args)


# --------------------------------------------------------------------------------------------
# comparisons


def check_close(actual: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str,
                ulps: float = 4.0, tol_dtype: torch.dtype | None = None) -> None:
    """``actual`` (in ``dtype``) within ``ulps`` units of the float64 result ``ref64``:
    ``|actual - ref64| <= ulps * eps(dtype) * max(|ref64|, 1)`` (inputs lie in [-1, 1], so 1 is
    the scale of every operand); float32: ``1e-5 + 1e-5 * |ref64|``. ``tol_dtype``: the dtype
    whose eps applies, when coarser than ``dtype`` (a value computed in it on the way)."""
    assert actual.shape == ref64.shape, f"{what}: shape {actual.shape} vs {ref64.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    if not actual.is_floating_point():
        assert torch.equal(actual, ref64), f"{what}: integer outputs differ"
        return
    tol_dtype = tol_dtype or dtype
    if tol_dtype == torch.float32:
        bound = 1e-5 + 1e-5 * ref64.abs()
    else:
        eps = torch.finfo(tol_dtype).eps
        bound = ulps * eps * ref64.abs().clamp(min=1.0)
    err = (actual.to(torch.float64) - ref64).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off; max error "
            f"{err.max().item():.3g}, first at {idx}: got {actual[tuple(idx)].item()}, "
            f"float64 {ref64[tuple(idx)].item()}")


# --------------------------------------------------------------------------------------------
# post-grad-like graphs without compiling


def post_grad_graph(fn, args) -> torch.fx.GraphModule:
    """``fn`` traced as Inductor would hand it to a post-grad custom pass, minus Dynamo and
    AOTAutograd: ``make_fx`` (fake tensors, Inductor's decomposition table), dead-code
    elimination, Inductor's joint-graph passes, ``view_to_reshape`` and its post-grad passes (no
    custom passes). ``test_fuzz_pass.test_harness_graph_is_inductors`` checks that the result
    has the same ops as the graph the pass sees inside a real compile."""
    from torch._guards import detect_fake_mode
    from torch._inductor import config
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.joint_graph import joint_graph_passes
    from torch._inductor.fx_passes.post_grad import post_grad_passes, view_to_reshape
    from torch._inductor.virtualized import V
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        gm = make_fx(fn, tracing_mode="fake", decomposition_table=select_decomp_table())(*args)
    gm.graph.eliminate_dead_code()  # AOTAutograd hands Inductor a graph without dead code
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes
                                  if n.op == "placeholder"])
    with config.patch(post_grad_custom_pre_pass=None, post_grad_custom_post_pass=None,
                      joint_custom_pre_pass=None, joint_custom_post_pass=None), torch.no_grad():
        gm = joint_graph_passes(gm) or gm
        view_to_reshape(gm)
        with V.set_fake_mode(fake_mode):
            post_grad_passes(gm, is_inference=True)
    gm.recompile()
    return gm
