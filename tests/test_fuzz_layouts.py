"""Layout fuzzing of the fused Q+K RoPE pass (generator, oracle and checker in
``fuzz_layouts.py``).

* ``test_generator_*``: the seeded generator is deterministic and covers every layout kind,
  variant, odd op, dtype, head size and oracle outcome within the first seeds, and every
  reader, reader use, custom-op view, spelling, gather, index mode and the second RoPE
  (``fuzz_kinds.py``) (no compile).
* ``test_programs_run_eagerly``: one program per kind runs eagerly and agrees with its float64
  twin (harness sanity, no compile).
* ``test_checker_*``: the checker really reports wrong values, wrong strides, a wrong
  rewrite count, and a compiled program that returns where eager raises (or the reverse).
* ``test_cpu_layouts``: programs compiled with ``backend="rope_compile"`` (CPU forced on,
  ``strict=True``) checked for values, strides, compile errors and the oracle's rewrite count.
  ``ROPE_FUZZ_PROFILE=ci`` (default): a greedy cover of every layout kind, reader, reader
  use, custom-op view, spelling, index mode (with each gather) and the second RoPE;
  ``long``: 400 consecutive seeds (``ROPE_FUZZ_LAYOUT_PROGRAMS`` overrides the count).
* ``test_cuda_layouts`` (``gpu``): the same with default options on CUDA,
  ``ROPE_FUZZ_GPU_PROGRAMS`` programs (default 40).

The CLI (``python tests/fuzz_layouts.py --help``) runs the same checks over seed ranges with
statistics.
"""

from __future__ import annotations

import os
from dataclasses import replace

import fuzz_kinds as fk
import fuzz_layouts as fl
import pytest
import torch

PROFILE = os.environ.get("ROPE_FUZZ_PROFILE", "ci")
CI_BASE_SEED = 20_000
LONG_PROGRAMS = int(os.environ.get("ROPE_FUZZ_LAYOUT_PROGRAMS", "400"))
GPU_PROGRAMS = int(os.environ.get("ROPE_FUZZ_GPU_PROGRAMS", "40"))
COVERAGE_SEEDS = 300


def _features(p: fl.LayoutProgram) -> set:
    """What a CI program covers: its layout kind, and its fuzz_kinds draws."""
    found = {("kind", p.kind), ("reader", p.reader), ("spelling", p.spelling),
             ("second", p.second), ("index", p.index_mode, p.index_target)}
    if p.reader == "custom_op":
        found.add(("custom_view", p.custom_view))
    elif p.reader != "none":
        found.add(("use", p.reader_use))
    return found


def _cover(base: int, pool: int = 400) -> list[int]:
    """A greedy set of seeds (no known bug hit) covering every feature the pool has (aligned
    heads only, so that the pass runs; the 64 head is covered by the kinds' own draws)."""
    programs = {s: fl.draw_program(s) for s in range(base, base + pool)}
    candidates = {s: _features(p) for s, p in programs.items()
                  if p.head_size == 128 and fl.known_bug(p) is None}
    want = set().union(*candidates.values())
    seeds: list[int] = []
    while want:
        best = max(candidates, key=lambda s: (len(candidates[s] & want), -s))
        seeds.append(best)
        want -= candidates[best]
    return sorted(seeds)


def _first_seed_per_kind(base: int) -> list[int]:
    seeds, seen, seed = [], set(), base
    while len(seen) < len(fl.KINDS):
        kind = fl.draw_program(seed).kind
        if kind not in seen:
            seen.add(kind)
            seeds.append(seed)
        seed += 1
    return seeds


def _cpu_seeds() -> list[int]:
    if PROFILE == "long":
        return list(range(CI_BASE_SEED, CI_BASE_SEED + LONG_PROGRAMS))
    return _cover(CI_BASE_SEED)


# --------------------------------------------------------------------------------------------
# generator


def test_generator_is_deterministic():
    for seed in range(50):
        a, b = fl.draw_program(seed), fl.draw_program(seed)
        assert a == b and a.describe() == b.describe()
        fn_a, args_a = fl.build_program(a)
        _, args_b = fl.build_program(b)
        assert all(torch.equal(x, y) for x, y in zip(args_a, args_b, strict=True))
    assert len({fl.draw_program(s).describe() for s in range(50)}) == 50


def test_generator_covers_every_layout_kind():
    programs = [fl.draw_program(seed) for seed in range(COVERAGE_SEEDS)]
    seen = {p.kind for p in programs}
    assert seen == set(fl.KINDS), f"kinds never drawn: {set(fl.KINDS) - seen}"
    for kind, variants in fl._VARIANTS.items():
        drawn = {p.variant for p in programs if p.kind == kind}
        assert drawn == set(variants), f"{kind}: variants never drawn: {set(variants) - drawn}"
    odd = {op for p in programs for op in p.odd_ops}
    assert odd == set(fl.ODD_OPS), f"odd ops never drawn: {set(fl.ODD_OPS) - odd}"
    assert {p.dtype for p in programs} == {torch.float32, torch.float16, torch.bfloat16}
    assert {p.head_size for p in programs} == {64, 128}
    assert {p.out_mode for p in programs} == set(fl.OUT_MODES)
    assert {p.form for p in programs} == {"sglang", "hf"}
    # fuzz_kinds: readers (each view reader with each use), spellings, indices, second RoPE
    assert {p.reader for p in programs} == set(fk.READERS)
    assert {p.reader_use for p in programs if p.reader in fk.VIEW_READERS} == set(
        fk.READER_USES)
    assert {p.custom_view for p in programs if p.reader == "custom_op"} == set(
        fk.CUSTOM_OP_VIEWS)
    assert {p.reader_on for p in programs if p.reader != "none"} == {"q", "k"}
    assert {p.spelling for p in programs} == set(fk.ROPE_SPELLINGS)
    assert {(p.index_mode, p.gather) for p in programs if p.form == "sglang"} == {
        (m, g) for m in fk.INDEX_MODES for g in fk.GATHERS}
    assert {p.index_mode for p in programs if p.form == "hf"} == set(fk.INDEX_MODES)
    assert {p.eager_raises for p in programs} == {True, False}
    assert {p.second for p in programs} == {True, False}
    assert {p.kind for p in map(fl.draw_program, range(1000)) if p.second} == set(
        fl.KINDS) - set(fl.SINGLE_RUN_KINDS)
    sglang = [p for p in programs if p.form == "sglang"]
    assert {p.is_neox for p in sglang} == {True, False}
    assert any(p.rotary_dim < p.head_size for p in programs)
    assert {p.expected_rewrites for p in programs} == {0, 1, 2}
    # Every kind the oracle may rewrite is drawn with a rewrite expected at least once, and
    # every never-rewritten kind with an aligned head (so that 0 is the layout's doing).
    programs = [p for p in programs if not p.second
                and p.spelling not in fk.CHANGES_THE_MATH]  # (their own rules: test_oracle_*)
    for kind in fl.KINDS:
        expected = {p.expected_rewrites for p in programs if p.kind == kind
                    and p.head_size == 128}
        if kind in ("as_strided_input", "hf_seq_first", "hf_inputs", "hf_unequal_halves"):
            continue  # by variant / shape, below
        want = 0 if kind in fl.NEVER_REWRITTEN else (2 if kind in ("two_pairs", "axial") else 1)
        assert expected == {want}, (kind, expected)
    for variant in fl._VARIANTS["as_strided_input"]:
        expected = {p.expected_rewrites for p in programs if p.kind == "as_strided_input"
                    and p.variant == variant and p.head_size == 128}
        assert expected == {0 if variant == "overlap" else 1}, (variant, expected)
    seq_first = [p for p in programs if p.kind == "hf_seq_first" and p.head_size == 128]
    assert {p.expected_rewrites for p in seq_first if p.batch > 1 and p.num_tokens > 1} == {0}
    assert {p.expected_rewrites for p in seq_first if p.batch == 1} == {1}


def test_oracle_rules():
    base = fk.without_kinds(fl.draw_program(0))

    def expected(**changes):
        return replace(base, **changes).expected_rewrites

    assert expected(kind="qkv_split", head_size=128) == 1
    assert expected(kind="qkv_split", head_size=64) == 0
    assert expected(kind="two_pairs", head_size=128) == 2
    assert expected(kind="axial", head_size=128) == 2
    assert expected(kind="axial", head_size=64) == 0
    assert expected(kind="rotated_outputs", head_size=128) == 1
    assert expected(kind="pointwise_root_transposed", head_size=128) == 1
    assert expected(kind="as_strided_input", variant="dense", head_size=128) == 1
    assert expected(kind="as_strided_input", variant="overlap", head_size=128) == 0
    assert expected(kind="select", variant="head_slices", head_size=128) == 1
    assert expected(kind="hf_seq_first", head_size=128, batch=2, num_tokens=3) == 0
    assert expected(kind="hf_seq_first", head_size=128, batch=1, num_tokens=3) == 1
    assert expected(kind="hf_seq_first", head_size=128, batch=2, num_tokens=1) == 1
    hf = {"kind": "hf_inputs", "head_size": 128, "batch": 2, "num_tokens": 3}
    assert expected(**hf, num_q_heads=2, num_kv_heads=1) == 0
    assert expected(**hf, num_q_heads=1, num_kv_heads=1) == 1
    assert expected(**{**hf, "batch": 1}, num_q_heads=4, num_kv_heads=2) == 1
    # Unequal halves are read as full tables: rewritten wherever hf_inputs is.
    unequal = {**hf, "kind": "hf_unequal_halves"}
    assert expected(**unequal, num_q_heads=2, num_kv_heads=1) == 0
    assert expected(**unequal, num_q_heads=1, num_kv_heads=1) == 1
    for kind in ("transposed_input", "unbind_interleave", "expand_k", "hf_expand_k",
                 "hf_transposed"):
        assert expected(kind=kind, head_size=128) == 0, kind


def test_oracle_rules_of_the_kinds():
    """fuzz_kinds: alpha != 1 in the RoPE's arithmetic -> 0; default-valued spellings as plain;
    a second RoPE pair adds its own count; readers and index modes change nothing."""
    base = fk.without_kinds(fl.draw_program(0))

    def expected(**changes):
        return replace(base, **changes).expected_rewrites

    plain = {"kind": "qkv_split", "head_size": 128}
    assert expected(**plain) == 1
    for spelling in fk.ROPE_SPELLINGS:
        want = 0 if spelling in fk.CHANGES_THE_MATH else 1
        assert expected(**plain, spelling=spelling) == want, spelling
        assert expected(**plain, spelling=spelling, second=True) == 2 * want, spelling
    for reader in fk.READERS:
        assert expected(**plain, reader=reader) == 1, reader
    for mode in fk.INDEX_MODES:
        for gather in fk.GATHERS:
            assert expected(**plain, index_mode=mode, gather=gather) == 1
    # the second pair: fresh dense sglang tensors (rewritten where the first is not);
    # HF keeps q's layout
    assert expected(kind="transposed_input", head_size=128, second=True) == 1
    assert expected(kind="expand_k", head_size=128, second=True) == 1
    assert expected(kind="qkv_split", head_size=64, second=True) == 0
    assert expected(kind="hf_projection", head_size=128, second=True, batch=2,
                    num_tokens=3) == 2
    assert expected(kind="hf_transposed", head_size=128, rotary_dim=128, second=True) == 0
    # partial rotary: the first pair's cat is a contiguous [B, H, S, D] (seed 3000077)
    transposed = {"kind": "hf_transposed", "head_size": 128, "rotary_dim": 32, "second": True,
                  "num_tokens": 6, "num_q_heads": 4, "num_kv_heads": 1}
    assert expected(**transposed, batch=1) == 1
    assert expected(**transposed, batch=2) == 0
    hf_expand = {"kind": "hf_expand_k", "head_size": 128, "second": True}
    assert expected(**hf_expand, batch=2, num_tokens=3) == 0
    assert expected(**hf_expand, batch=1, num_tokens=3) == 1
    hf = {"kind": "hf_inputs", "head_size": 128, "second": True, "num_q_heads": 2}
    assert expected(**hf, batch=2, num_tokens=3) == 0
    assert expected(**hf, batch=1, num_tokens=3) == 2
    # where eager raises: sglang's gathers of negative (index_select, embedding) or out of
    # range positions; never HF (positions are angles) or with int_positions' modulo
    sglang = replace(base, kind="qkv_split", index_mode="negative", odd_ops=())
    assert {g: replace(sglang, gather=g).eager_raises for g in fk.GATHERS} == {
        "index_select": True, "embedding": True, "getitem": False}
    assert replace(sglang, index_mode="out_of_range", gather="getitem").eager_raises
    assert not replace(sglang, index_mode="out_of_range", gather="getitem",
                       odd_ops=("int_positions",)).eager_raises
    assert not replace(sglang, kind="hf_inputs", index_mode="out_of_range").eager_raises


@pytest.mark.parametrize("seed", _first_seed_per_kind(0),
                         ids=lambda s: fl.draw_program(s).kind)
def test_programs_run_eagerly(seed):
    """Each kind builds, runs, and agrees with its float64 twin (eager rounding only); the
    layout the kind claims is really the one q/k get."""
    p = fk.without_kinds(fl.draw_program(seed))
    fn, args = fl.build_program(p)
    eager = fn(*args)
    ref64 = fn(*fl._to64(args))
    assert len(eager) == len(ref64) >= 2
    assert not fl._value_and_layout_failures(eager, eager, ref64)
    for e, r in zip(eager, ref64, strict=True):
        if e.is_floating_point():
            atol, rtol = fl.TOLERANCES[e.dtype]
            torch.testing.assert_close(e.double(), r, atol=atol, rtol=rtol)


@pytest.mark.parametrize("seed", _cover(CI_BASE_SEED))
def test_kinds_run_eagerly(seed):
    """Every reader, spelling and index mode of the CI cover builds and runs: eager raises
    exactly where the oracle says, and agrees with its float64 twin elsewhere."""
    p = fl.draw_program(seed)
    fn, args = fl.build_program(p)
    eager, failures = fl.run_eagerly(fn, [a.clone() for a in args], p.eager_raises)
    assert not failures, (p.describe(), failures)
    if eager is not None:
        assert not fl._value_and_layout_failures(eager, eager, fn(*fl._to64(args)))


# --------------------------------------------------------------------------------------------
# the checker catches what it claims to catch


def test_checker_reports_raises():
    """Eager raised: the compiled program must raise when run, not return, and not fail to
    compile; eager returned: a compiled raise is a failure. Plain Inductor's same behaviour
    makes it Inductor's own."""
    assert fl.run_failures(True, None, "RuntimeError: index out of bounds") == []
    assert [f.split(":")[0] for f in fl.run_failures(True, (torch.zeros(1),), None)] == [
        "raises"]
    assert [f.split(":")[0] for f in fl.run_failures(
        True, None, "BackendCompilerFailed: backend='rope_compile' raised")] == ["compile"]
    returned = fl.run_failures(False, None, "IndexError: positions must lie in [0, 64)")
    assert [f.split(":")[0] for f in returned] == ["raises"]
    assert fl.same_failures(returned, fl.run_failures(False, None, "RuntimeError: other"))
    assert not fl.same_failures(returned, [])
    raising = replace(fk.without_kinds(fl.draw_program(0)), kind="qkv_split", odd_ops=(),
                      index_mode="out_of_range")
    fn, args = fl.build_program(raising)
    assert fl.run_eagerly(fn, args, True)[1] == []
    assert fl.run_eagerly(fn, args, False)[1][0].startswith("harness: eager raised")


def test_checker_reports_values_and_strides():
    x = torch.rand(3, 4)
    wrong = x.clone()
    wrong[1, 2] += 0.5
    found = fl._value_and_layout_failures((wrong,), (x,), (x.double(),))
    assert [f.split(":")[0] for f in found] == ["values"], found
    transposed = x.t().contiguous().t()  # same values, column-major
    found = fl._value_and_layout_failures((transposed,), (x,), (x.double(),))
    assert [f.split(":")[0] for f in found] == ["strides"], found
    assert fl._value_and_layout_failures((x.clone(),), (x,), (x.double(),)) == []
    # The same layout with another stride on a size-1 dim: a note, not a failure.
    y = torch.rand(1, 3, 4)
    odd = torch.empty_strided((1, 3, 4), (99, 4, 1)).copy_(y)
    found = fl._value_and_layout_failures((odd,), (y,), (y.double(),))
    assert [f.split(":")[0] for f in found] == ["size1_strides"], found
    p = fl.draw_program(0)
    assert not fl.Result(p, 1, failures=found).failed
    assert fl.Result(p, 1, failures=["strides: x"]).failed
    assert not fl.Result(p, 1, failures=["strides: x"], inductor_only=True).failed


def test_checker_reports_a_wrong_rewrite_count():
    """A real aligned pair with a deliberately wrong oracle (0 instead of 1) must fail, and the
    same program with the true oracle must pass."""
    p = replace(fk.without_kinds(fl.draw_program(0)), kind="qkv_split", variant="input",
                head_size=128, rotary_dim=128, dtype=torch.float32, num_tokens=3,
                num_q_heads=2, num_kv_heads=1, odd_ops=(), out_mode="consumed")
    good = fl.check_program(p)
    assert good.rewritten == 1 and not good.failures, good.failures
    bad = fl.check_program(replace(p, expected_override=0), control=False)
    assert bad.failed and bad.categories == {"oracle_unexpected"}, bad.failures


def _reshaped_output_program(out_mode: str = "reshaped") -> fl.LayoutProgram:
    return replace(fk.without_kinds(fl.draw_program(0)), kind="qkv_split", variant="input",
                   is_neox=True, head_size=128, rotary_dim=128, dtype=torch.float32,
                   num_tokens=3, num_q_heads=2, num_kv_heads=2, odd_ops=(), out_mode=out_mode)


def _tail_overlap_program() -> fl.LayoutProgram:
    return replace(_reshaped_output_program("outputs"), kind="as_strided_input",
                   variant="overlap", rotary_dim=32, num_tokens=2, num_q_heads=2,
                   num_kv_heads=1)


@pytest.mark.parametrize("out_mode", ["reshaped", "viewed"])
def test_regression_view_of_rotated_output_keeps_eager_strides(out_mode):
    """Was (found by this fuzzer): a graph output that is a view of a rotated q/k (reshape to
    [T, H*D], transpose, head slice) came back as a strided view into the rotated root."""
    p = _reshaped_output_program(out_mode)
    assert p.expected_rewrites == 1
    r = fl.check_program(p, control=False)
    assert not r.failed and r.rewritten == 1, r.failures


def test_regression_partial_rotary_tail_overlapping_the_other_rotated_part():
    """Was (found by this fuzzer): q's and k's rotated parts disjoint, but k's inside q's
    pass-through tail: the call changed what q's output reads. Now not rewritten."""
    p = _tail_overlap_program()
    assert p.expected_rewrites == 0
    r = fl.check_program(p, control=False)
    assert not r.failed and r.rewritten == 0, r.failures


# --------------------------------------------------------------------------------------------
# compiled


def _check(seed: int, device: str) -> None:
    p = fl.draw_program(seed)
    r = fl.check_program(p, device)
    assert not r.failed, f"seed {seed} {p.describe()}: " + " | ".join(r.failures)


@pytest.mark.parametrize("seed", _cpu_seeds(), ids=lambda s: fl.draw_program(s).describe())
def test_cpu_layouts(seed):
    _check(seed, "cpu")


@pytest.mark.gpu
def test_cuda_layouts():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    stats = fl.run("cuda", GPU_PROGRAMS, 50_000, log=print)
    print(fl.summary(stats))
    assert stats["programs"] + stats["skipped_programs"] == GPU_PROGRAMS
    failed = [f for f in stats["failures"] if f["failed"] and not f["known_bug"]]
    assert not failed, "\n".join(f"seed {f['seed']} {f['program']}: {f['failures']}"
                                 for f in failed)
