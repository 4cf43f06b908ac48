"""Soundness fuzzing of the attention prologue: RoPE + QK-norm + KV-store passes (generator,
oracle and checker in ``fuzz_prologue.py``).

* ``test_generator_*``: the seeded generator is deterministic and covers every form, source,
  norm, store (near-misses included), dtype and oracle outcome within the first seeds, and
  every reader, spelling (RoPE, norm, store), index mode on loc and positions, and the second
  RoPE after a norm and after a store (``fuzz_kinds.py``).
* ``test_oracle_rules*``: the oracle's counters for hand-picked programs.
* ``test_checker_*``: the checker really reports a wrong counter and wrong cache rows.
* ``test_cpu_prologue``: programs compiled with ``backend="rope_compile"`` (CPU, strict) and
  checked. ``ROPE_FUZZ_PROFILE=ci`` (default): a greedy cover of every form / source / norm /
  store / dtype / head size / cache-dtype change / scale, spelling, reader class, index mode
  and second RoPE; ``long``: ``ROPE_FUZZ_PROLOGUE_PROGRAMS`` (default 300) consecutive seeds.
* ``test_cuda_prologue`` (``gpu``): the same with default options on CUDA,
  ``ROPE_FUZZ_GPU_PROGRAMS`` programs (default 40).
"""

from __future__ import annotations

import os
from dataclasses import replace

import fuzz_kinds as fk
import fuzz_prologue as fp
import pytest
import torch

PROFILE = os.environ.get("ROPE_FUZZ_PROFILE", "ci")
CI_BASE_SEED = 30_000
LONG_PROGRAMS = int(os.environ.get("ROPE_FUZZ_PROLOGUE_PROGRAMS", "300"))
GPU_PROGRAMS = int(os.environ.get("ROPE_FUZZ_GPU_PROGRAMS", "40"))
COVERAGE_SEEDS = 400


def _features(p: fp.PrologueProgram) -> set:
    if p.head_size not in fp.ALIGNED_HEADS:
        return {("head", p.head_size)}  # nothing rewritten: one such program is enough
    found = {("form", p.form), ("source", p.source), ("norm", p.norm), ("store", p.store),
             ("dtype", p.dtype), ("head", p.head_size), ("neox", p.is_neox),
             ("partial", p.rotary_dim < p.head_size)}
    if p.store != "none":
        found |= {("store_form", p.form, p.store), ("how", p.form, p.store_how),
                  ("cache_dtype_differs", p.cache_dtype != p.dtype),
                  ("scale", p.scale is not None)}
    if p.norm != "none":
        found.add(("gemma", p.gemma))
    if p.norm == "whole":  # OLMo2's rounding: the Qwen3 form in float32, round_once else
        found.add(("olmo2", p.olmo2, p.dtype == torch.float32))
    # fuzz_kinds: readers (by class: every view and use is in test_fuzz_layouts' cover),
    # spellings, indices (loc or positions, raising or not); the second pair after a norm,
    # after a store
    found |= {("reader", READER_CLASS.get(p.reader, p.reader), p.store != "none"),
              ("spelling", p.spelling),
              ("index", p.index_mode, p.index_on, p.eager_raises)}
    if p.second:
        found |= {("second", p.form), ("second_after_norm", p.norm in ("qwen3", "gemma",
                                                                       "whole")),
                  ("second_after_store", p.store == "write")}
    return found


# The readers by how the passes must treat them (passes/readers.py): views they replay, views
# and as_strided that read a copy in the old layout, an in-place custom op.
READER_CLASS = {
    **dict.fromkeys(("view", "reshape", "permute", "transpose", "slice", "select", "unsqueeze",
                     "squeeze", "expand", "split", "unbind", "narrow", "movedim", "unflatten",
                     "t"), "layout_free_view"),
    **dict.fromkeys(("diagonal", "unfold", "view_dtype"), "unknown_view"),
    **dict.fromkeys(("as_strided", "as_strided_overlap"), "as_strided"),
}


def _cover(base: int, pool: int = 300) -> list[int]:
    """A greedy set of seeds (no known bug hit) covering every feature the pool has with an
    aligned head (so the passes run), and the 64 head once."""
    programs = {s: fp.draw_program(s) for s in range(base, base + pool)}
    candidates = {s: _features(p) for s, p in programs.items() if fp.known_bug(p) is None}
    want = set().union(*candidates.values())
    seeds: list[int] = []
    while want:
        best = max(candidates, key=lambda s: (len(candidates[s] & want), -s))
        if not candidates[best] & want:
            break
        seeds.append(best)
        want -= candidates[best]
    return sorted(seeds)


def _cpu_seeds() -> list[int]:
    if PROFILE == "long":
        return list(range(CI_BASE_SEED, CI_BASE_SEED + LONG_PROGRAMS))
    return _cover(CI_BASE_SEED)


# --------------------------------------------------------------------------------------------
# generator and oracle


def test_generator_is_deterministic():
    for seed in range(30):
        a, b = fp.draw_program(seed), fp.draw_program(seed)
        assert a == b and a.describe() == b.describe()
        fn_a, args_a = fp.build_program(a)
        _, args_b = fp.build_program(b)
        assert len(fn_a.arg_names) == len(args_a)
        assert all(torch.equal(x, y) for x, y in zip(args_a, args_b, strict=True))


def test_generator_covers_every_kind():
    programs = [fp.draw_program(seed) for seed in range(COVERAGE_SEEDS)]
    assert {p.form for p in programs} == set(fp.FORMS)
    assert {p.source for p in programs} == set(fp.SOURCES)
    assert {p.norm for p in programs} == set(fp.NORMS)
    assert {p.store for p in programs} == set(fp.STORES)
    assert {(p.form, p.store) for p in programs if p.store in fp.NEAR_STORES} >= set(
        fp.STORE_REASONS)
    assert {p.dtype for p in programs} == set(fp.DTYPES)
    assert {p.cache_dtype for p in programs if p.store != "none"} == set(fp.DTYPES)
    assert any(p.cache_dtype != p.dtype for p in programs if p.store == "write")
    assert any(p.scale is not None for p in programs if p.store == "write")
    assert {p.head_size for p in programs} == {64, 128}
    assert {p.is_neox for p in programs if p.form == "sglang"} == {True, False}
    assert any(p.rotary_dim < p.head_size for p in programs)
    assert {p.num_tokens for p in programs if p.form == "sglang"} == set(range(1, 18))
    assert {p.batch for p in programs if p.form == "hf"} == {1, 2}
    assert {p.gemma for p in programs if p.norm in fp.NEAR_NORMS} == {True, False}
    assert {(p.gemma, p.olmo2) for p in programs if p.norm == "whole"} == {
        (True, False), (False, False), (False, True)}
    assert {p.dtype for p in programs if p.olmo2} == set(fp.DTYPES)
    assert {(p.form, p.store_how) for p in programs if p.store == "write"} == {
        ("sglang", "setitem"), ("sglang", "index_put_"), ("hf", "index_copy_"),
        ("hf", "setitem")}
    outcomes = {tuple(sorted(p.expected().items())) for p in programs}
    assert len(outcomes) > 10


def test_generator_covers_every_new_kind():
    programs = [fp.draw_program(seed) for seed in range(COVERAGE_SEEDS)]
    assert {p.reader for p in programs} == set(fk.READERS)
    assert {(p.reader, p.store != "none") for p in programs if p.reader == "custom_op"} == {
        ("custom_op", True), ("custom_op", False)}
    assert {p.custom_view for p in programs if p.reader == "custom_op"} == set(
        fk.CUSTOM_OP_VIEWS)
    assert {p.reader_use for p in programs if p.reader in fk.VIEW_READERS} == set(
        fk.READER_USES)
    assert {p.spelling for p in programs} == {"plain", *fk.ROPE_SPELLINGS,
                                              *fk.NORM_SPELLINGS}
    assert {p.spelling for p in programs if p.norm == "none"} == set(fk.ROPE_SPELLINGS)
    assert {p.gemma for p in programs if p.spelling == "gemma_alpha"} == {True}
    assert {(p.form, p.index_mode, p.index_target) for p in programs} >= {
        (form, mode, target) for mode in fk.INDEX_MODES
        for form, target in (("sglang", "loc(setitem)"), ("sglang", "loc(index_put_)"),
                             ("hf", "loc(index_copy_)"), ("hf", "loc(setitem)"),
                             ("hf", "positions(angles)"))}
    assert {(p.index_mode, p.index_target) for p in programs if p.form == "sglang"} >= {
        (mode, f"positions({g})") for mode in fk.INDEX_MODES for g in fk.GATHERS}
    assert {p.eager_raises for p in programs} == {True, False}
    second = [p for p in programs if p.second]
    assert {p.form for p in second} == set(fp.FORMS)
    assert {(p.norm in ("qwen3", "gemma", "whole"), p.store == "write") for p in second} == {
        (True, True), (True, False), (False, True), (False, False)}


def test_oracle_rules():
    base = replace(fk.without_kinds(fp.draw_program(0)), form="sglang", source="qkv_input",
                   head_size=128, rotary_dim=128, norm="none", store="none", num_tokens=3)
    want = {"rewritten": 1, "qk_norm rewritten": 0, "kv_store rewritten": 0}
    assert base.expected() == want
    assert replace(base, head_size=64, norm="qwen3", store="write").expected() == {
        "rewritten": 0, "qk_norm rewritten": 0, "kv_store rewritten": 0}
    assert replace(base, norm="gemma", store="write").expected() == {
        "rewritten": 1, "qk_norm rewritten": 1, "kv_store rewritten": 1}
    assert replace(base, norm="eps").expected() == {
        **want, "qk_norm skipped: q and k norms use different eps": 1}
    assert replace(base, store="accumulate").expected() == {
        **want, "kv_store skipped: the k write accumulates": 1}
    assert replace(base, form="hf", store="accumulate").expected() == want  # not a candidate
    assert replace(base, form="hf", store="computed_cache").expected() == {
        **want, "kv_store skipped: k_buffer is computed in the graph": 1}
    assert replace(base, head_size=64, store="other_loc").expected()["rewritten"] == 0
    # the whole-projection norm (OLMo2's layout) is rewritten in every layout and head count
    rewritten = {**want, "qk_norm rewritten": 1}
    hf_whole = replace(base, form="hf", norm="whole", num_q_heads=1, num_kv_heads=1,
                       num_tokens=1, batch=2)
    assert hf_whole.expected() == rewritten  # [B, 1, 1 * D]
    assert replace(hf_whole, num_tokens=3, num_q_heads=4, num_kv_heads=2).expected() == rewritten
    assert replace(base, norm="whole", num_q_heads=1, num_kv_heads=1).expected() == rewritten
    assert replace(base, norm="whole", gemma=True, store="write").expected() == {
        **rewritten, "kv_store rewritten": 1}
    # with OLMo2's own rounding: rewritten in every dtype (the Qwen3 form in float32, the op's
    # round_once in bf16/fp16)
    olmo2 = replace(base, norm="whole", olmo2=True, dtype=torch.float32)
    assert olmo2.expected() == rewritten
    assert replace(olmo2, dtype=torch.bfloat16).expected() == rewritten
    assert replace(olmo2, dtype=torch.float16, store="write").expected() == {
        **rewritten, "kv_store rewritten": 1}
    assert replace(olmo2, dtype=torch.float16, head_size=64).expected()["rewritten"] == 0
    # setitem with leading size-1 dims (sglang T == 1, hf B == 1) was a miss, fixed: no
    # known bug for it any more.
    assert not fp.known_bug(replace(base, store="write", store_how="setitem", num_tokens=1))
    assert not fp.known_bug(replace(base, form="hf", store="write", store_how="setitem",
                                    batch=1))


def test_oracle_rules_of_the_kinds():
    """fuzz_kinds: alpha != 1 in the RoPE -> nothing rewritten; in the norm's eps or Gemma's
    factor -> no QK-norm, its reason counted; other spellings as plain; a second pair (after
    the norm, after the store) -> 2 RoPE rewrites; readers and index modes change nothing."""
    base = fk.without_kinds(replace(fp.draw_program(0), **_PLAIN))
    fused = {"rewritten": 1, "qk_norm rewritten": 1, "kv_store rewritten": 1}
    assert base.expected() == fused
    for spelling in ("keywords", "alpha_one", "methods", "out", *fk.NORM_SPELLINGS):
        if spelling not in fk.CHANGES_THE_MATH:
            assert replace(base, spelling=spelling).expected() == fused, spelling
    for spelling in fp.ROPE_ALPHAS:
        assert replace(base, spelling=spelling).expected() == dict.fromkeys(fused, 0)
    for spelling, reason in fp.NORM_ALPHAS.items():
        assert replace(base, spelling=spelling, norm="gemma", gemma=True).expected() == {
            **fused, "qk_norm rewritten": 0, f"qk_norm skipped: {reason}": 1}
    assert replace(base, second=True).expected() == {**fused, "rewritten": 2}
    assert replace(base, second=True, head_size=64).expected()["rewritten"] == 0
    for reader in fk.READERS:
        assert replace(base, reader=reader).expected() == fused
    raises = {}
    for form, how in (("sglang", "setitem"), ("sglang", "index_put_"), ("hf", "index_copy_"),
                      ("hf", "setitem")):
        for mode in fk.INDEX_MODES:
            p = replace(base, form=form, store_how=how, index_mode=mode, index_on="loc")
            assert p.expected() == fused
            raises[form, how, mode] = p.eager_raises
    assert raises == {key: key[2] == "out_of_range" or (key[2] == "negative"
                                                        and key[1] == "index_copy_")
                      for key in raises}
    # HF positions are angles: never raise; sglang's by the gather
    assert not replace(base, form="hf", index_on="positions",
                       index_mode="out_of_range").eager_raises
    assert replace(base, index_on="positions", index_mode="negative",
                   gather="embedding").eager_raises
    assert not replace(base, index_on="positions", index_mode="negative",
                       gather="getitem").eager_raises


@pytest.mark.parametrize("seed", [*range(0, 400, 37), *_cover(CI_BASE_SEED)])
def test_programs_run_eagerly(seed):
    """Each program builds, runs (raising exactly where the oracle says), and agrees with its
    float64 twin within its tolerance."""
    p = fp.draw_program(seed)
    fn, args = fp.build_program(p)
    eager, failures = fp.run_eagerly(fn, [a.clone() for a in args], p.eager_raises)
    assert not failures, (p.describe(), failures)
    if eager is not None:
        ref64 = fn(*fp._to64(tuple(a.clone() for a in args)))
        assert not fp._output_failures(p, eager, eager, ref64)


# --------------------------------------------------------------------------------------------
# the checker catches what it claims to catch

_PLAIN = {"form": "sglang", "source": "qkv_input", "is_neox": True, "head_size": 128,
          "rotary_dim": 128, "dtype": torch.float32, "num_tokens": 3, "batch": 1,
          "num_q_heads": 2, "num_kv_heads": 1, "norm": "qwen3", "gemma": False,
          "store": "write", "store_how": "index_put_", "cache_dtype": torch.float32,
          "scale": None, "extra_rows": 3}


def test_checker_reports_a_wrong_counter():
    p = fk.without_kinds(replace(fp.draw_program(0), **_PLAIN))
    good = fp.check_program(p, control=False)
    assert not good.failures, good.failures
    assert {k: good.counters.get(k) for k in fp.COUNTERS} == dict.fromkeys(fp.COUNTERS, 1)
    bad = fp.check_program(replace(p, expected_override={**p.expected(),
                                                         "kv_store rewritten": 0}),
                           control=False)
    assert bad.failed and bad.categories == {"oracle_unexpected"}, bad.failures


@pytest.mark.parametrize("norm", ["qwen3", "other_reader"])
def test_checker_reports_cache_rows(norm):
    p = fk.without_kinds(replace(fp.draw_program(0), **{**_PLAIN, "norm": norm}))
    fn, args = fp.build_program(p)
    env = dict(zip(fn.arg_names, args, strict=True))
    after = {k: v.clone() for k, v in env.items()}
    outs = fn(*after.values())
    assert not fp._cache_row_failures(p, env, after, outs, kv_fused=True)
    spoilt = dict(after)
    spoilt["k_cache"] = after["k_cache"].clone()
    free = [r for r in range(spoilt["k_cache"].shape[0]) if r not in env["loc"].tolist()]
    spoilt["k_cache"][free[0]] += 1.0
    found = fp._cache_row_failures(p, env, spoilt, outs, kv_fused=True)
    assert any("does not write changed" in f for f in found), found
    spoilt["k_cache"] = after["k_cache"].clone()
    spoilt["k_cache"][env["loc"][0], 0, 0] += 2**-20
    found = fp._cache_row_failures(p, env, spoilt, outs, kv_fused=True)
    assert any("torch's cast of the compiled k" in f for f in found), found


# --------------------------------------------------------------------------------------------
# compiled


def _check(seed: int, device: str) -> None:
    p = fp.draw_program(seed)
    r = fp.check_program(p, device)
    assert not r.failed, f"seed {seed} {p.describe()}: " + " | ".join(r.failures)


@pytest.mark.parametrize("seed", _cpu_seeds(), ids=lambda s: fp.draw_program(s).describe())
def test_cpu_prologue(seed):
    _check(seed, "cpu")


@pytest.mark.gpu
def test_cuda_prologue():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    stats = fp.run("cuda", GPU_PROGRAMS, 60_000, log=print)
    print(fp.summary(stats))
    assert stats["programs"] + stats["skipped_programs"] == GPU_PROGRAMS
    failed = [f for f in stats["failures"] if f["failed"]]
    assert not failed, "\n".join(f"seed {f['seed']} {f['program']}: {f['failures']}"
                                 for f in failed)


# --------------------------------------------------------------------------------------------
# refused by design: what the post-grad graph cannot prove


def test_gemma_norm_half_precision_store_cast_to_float32_is_refused():
    """A Gemma-form norm of bf16 q/k whose rotated k the store casts to float32 (a scale):
    Inductor's pointless_convert removed eager's bf16 roundings of k, so k's norm and RoPE are
    one float32 computation in the graph; the pair is refused (q and k have different dtypes,
    counted), values right. Once a fuzzer-found 'bug', now the oracle's rule."""
    p = replace(fk.without_kinds(fp.draw_program(0)), **{
        **_PLAIN, "dtype": torch.bfloat16, "gemma": True, "norm": "gemma",
        "cache_dtype": torch.bfloat16, "scale": 0.37, "num_q_heads": 1, "num_kv_heads": 1})
    assert fp.half_norm_cast_to_float32(p)
    r = fp.check_program(p, control=False)
    assert not r.failures, r.failures
    assert r.counters == {
        "skipped: q and k have different dtypes (torch.bfloat16 vs torch.float32)": 1,
        "skipped: q and k have different dtypes (torch.float32 vs torch.bfloat16)": 1}


@pytest.mark.parametrize("seed", [127, 139])
def test_fuzzer_found_partial_rotary_norm(seed):
    """Found by the CPU run (seeds 123..162): with partial rotary the call rotates
    ``[T, H, rot]`` views of the norm output, which the QK-norm pass refused ("normalises
    [.., 128], not each head of 32"; per head and whole projection alike). Fixed: the view is
    proven to be the first rot columns of each head."""
    r = fp.check_program(fk.without_kinds(fp.draw_program(seed)), control=False)
    assert not r.failed, r.failures
    assert r.counters.get("qk_norm rewritten") == 1, r.counters


@pytest.mark.parametrize("seed", [810026, 830011])
def test_fuzzer_found_hf_setitem_cast_batch_one(seed):
    """Found by the CUDA run: HF ``cache[:, :, cp] = k`` at batch 1 into a cache of another
    dtype (setitem casts, then strips the leading size-1 dim: a view over the cast) was not
    recognised as the k write. Fixed; the programs must pass."""
    r = fp.check_program(fk.without_kinds(fp.draw_program(seed)), control=False)
    assert not r.failed, r.failures  # a size-1-dim stride note is not a failure (as in the CLI)
    assert r.counters.get("rewritten") == 1, r.counters


def test_fuzzer_found_scaled_setitem_one_token():
    """Seed 326: sglang ``k_buffer[loc] = k / 0.5`` with one token and one kv head (setitem
    strips the leading size-1 dims of the division: a view over it) at another loc than v's
    was not recognised as the k write, so the refusal had no counted reason. Fixed: the skip
    is counted, values right."""
    p = fk.without_kinds(fp.draw_program(326))
    assert (p.num_tokens, p.num_kv_heads, p.scale, p.store) == (1, 1, 0.5, "other_loc")
    r = fp.check_program(p, control=False)
    assert not r.failed, r.failures
    assert r.counters.get("kv_store skipped: k and v are written at different cache_loc") == 1
