"""Smoke test of benchmarks/bench_op.py: one tiny row, launcher (a) and eager (c), on CPU.

Runs the Triton launcher through the interpreter (``TRITON_INTERPRET=1``, set by conftest.py when
there is no GPU); skipped when neither the interpreter nor CUDA is available.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bench_op():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("benchmarks.bench_op")


def _device() -> str:
    from rope_compile.kernels.rope_cache import is_interpreter

    if is_interpreter():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA device")


RESULT_KEYS = {
    "name", "row", "floor_bytes", "floor_us", "timer", "n_buffers", "triton_config", "time_us",
    "host_us", "pct_copy_bw", "check", "max_err", "tol", "errors", "skipped", "copy_bw_gbs",
}


def test_run_benchmark_tiny_row():
    device = _device()
    bench = _bench_op()
    row = bench.Row(hq=2, hk=1, d=64, rot=64, neox=True, tokens=3)
    results = bench.run_benchmark(
        [row], device=device, repeats=3, impls=("triton", "eager"), host_iters=3,
        host_max_tokens=3, log=lambda _: None,
    )

    assert len(results) == 1
    res = results[0]
    assert res.keys() >= RESULT_KEYS
    assert res["name"] == "2/1/64/64 neox T=3"
    assert res["errors"] == {}
    assert res["check"] == {"triton": "OK", "eager": "OK"}
    for impl in ("triton", "eager"):
        assert res["time_us"][impl] > 0
        assert res["max_err"][impl] <= res["tol"][impl]
    assert res["host_us"]["triton"] > 0  # T <= host_max_tokens
    assert res["host_us"]["eager"] is None  # host time is only taken for (a), (b), (d), (e)
    assert res["floor_bytes"] == 2 * 3 * (2 + 1) * 64 * 2 + 3 * 64 * 4
    assert res["floor_us"] > 0 and res["copy_bw_gbs"] > 0
    assert res["timer"] == ("cuda-graph" if device == "cuda" else "perf_counter")

    table = bench.results_table(results, ("triton", "eager"))
    assert "2/1/64/64 neox T=3" in table and "err" not in table


def test_row_table_and_selection():
    bench = _bench_op()
    names = [r.name for r in bench.ROWS]
    assert len(names) == len(set(names))
    assert "32/8/128/128 neox T=0" in names
    quick = bench.select_rows(bench.ROWS, quick=True)
    assert quick and all(r.quick for r in quick)
    picked = bench.select_rows(bench.ROWS, patterns="gptj")
    assert picked and all("gptj" in r.name for r in picked)
    swept = bench.select_rows(bench.ROWS, sweep=True)
    assert swept and all(r.sweep for r in swept)


def test_public_function_row():
    """(f), the public function, is checked and timed like the op."""
    device = _device()
    bench = _bench_op()
    row = bench.Row(hq=2, hk=1, d=64, rot=32, neox=False, tokens=5)
    [res] = bench.run_benchmark([row], device=device, repeats=2, impls=("public",),
                                host_iters=2, host_max_tokens=5, log=lambda _: None)
    assert res["check"] == {"public": "OK"} and res["errors"] == {}
    assert res["time_us"]["public"] > 0 and res["host_us"]["public"] > 0


def test_e2e_interleaved_rounds_eager_tiny():
    """bench_e2e's run/timing structure on CPU with the eager config (no compilation)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    e2e = importlib.import_module("benchmarks.bench_e2e")
    cfg = e2e.ModelConfig(layers=1, hidden=256, num_q_heads=2, num_kv_heads=1, head_dim=128,
                          intermediate=256)
    shapes = [("decode", 3), ("prefill", 8)]
    logged = []
    results = e2e.run_e2e(cfg, shapes, [e2e.CompileConfig("eager", None)], "cpu",
                          decode_steps=2, prefill_steps=2, rounds=3, log=logged.append)
    assert [(r["kind"], r["tokens"]) for r in results] == shapes
    for r in results:
        assert r["error"] is None and r["max_abs_diff_vs_eager"] == 0
        low, high = r["ms_spread"]
        assert 0 < low <= r["ms"] <= high
        assert r["host_ms"] > 0
    assert sum("timing round" in line for line in logged) == 3
    assert "host ms/step" in e2e.results_table(results)


def _bench(name: str):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def test_models_every_model_builds_tiny():
    """Every model of bench_models builds at the tiny size (no compile) and runs eagerly."""
    bench = _bench("bench_models")
    assert bench.select_models("qwen3,gemma2") == ["qwen3", "gemma2"]
    assert bench.select_models("gpt-fast") == ["gpt-fast"]
    with pytest.raises(SystemExit):
        bench.select_models("nope")
    for name in bench.MODEL_NAMES:
        model, args = bench.build(name, bench.TINY, "cpu", torch.float32)
        with torch.no_grad():
            assert bench._logits(model(*args)).isfinite().all(), name


def test_models_qwen3_tiny_cpu(tmp_path):
    """bench_models end to end on CPU: Qwen3 (q/k norm), default mode, two rounds."""
    bench = _bench("bench_models")
    rows = bench.main(["--device", "cpu", "--tiny", "--models", "qwen3", "--rounds", "2",
                       "--iters", "1", "--modes", "default,reduce-overhead",
                       "--out", str(tmp_path)])
    [row] = rows  # reduce-overhead is dropped without CUDA
    assert row["error"] is None and row["mode"] == "default"
    assert row["fused_calls"] == 1 and row["rewritten"] == 1
    assert row["max_err_rope_compile"] < 1e-4 and row["max_err_inductor"] < 1e-4
    assert len(row["ms_rounds_inductor"]) == len(row["ms_rounds_rope_compile"]) == 2
    low, high = row["ms_spread_rope_compile"]
    assert 0 < low <= row["ms_rope_compile"] <= high
    assert len(row["b2b_ms_rounds_inductor"]) == len(row["b2b_ms_rounds_rope_compile"]) == 2
    low, high = row["b2b_ms_spread_inductor"]
    assert 0 < low <= row["b2b_ms_inductor"] <= high and row["b2b_speedup"] > 0
    assert "HF Qwen3" in (tmp_path / "models.md").read_text()
    assert (tmp_path / "models.json").exists()


def test_decode_prologue_kernel_count():
    """Non-GEMM kernels between a layer's three q/k/v GEMMs and its attention kernel."""
    bench = _bench("bench_decode")
    step = ["triton_red_fused_rms_norm_0", "nvjet_tst_q", "triton_red_fused_q_norm_1",
            "nvjet_tst_k", "nvjet_tst_v", "triton_poi_fused_rope_2",
            "triton_poi_fused_index_copy_3",
            "triton_poi_fused__scaled_dot_product_efficient_attention_4",
            "fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "nvjet_tst_o", "triton_red_fused_add_5",
            "nvjet_tst_q", "nvjet_tst_k", "splitKreduce_kernel", "nvjet_tst_v",
            "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]
    assert bench.prologue_kernels(step) == [4, 0]
    assert bench.prologue_kernels(["triton_poi_fused_0"]) == []


def test_decode_qwen3_tiny_cpu(tmp_path):
    """bench_decode end to end on CPU: Qwen3 with a StaticCache, batch 2, two rounds."""
    bench = _bench("bench_decode")
    rows = bench.main(["--device", "cpu", "--tiny", "--models", "qwen3", "--batches", "2",
                       "--rounds", "2", "--iters", "2", "--out", str(tmp_path)])
    [row] = rows
    assert row["error"] is None and (row["batch"], row["mode"]) == (2, "default")
    assert row["fused_calls_rope_compile"] == 1 and row["rewritten"] == 1
    assert row["fused_calls_inductor"] == 0
    assert row["max_err_rope_compile"] < 1e-4 and row["max_err_inductor"] < 1e-4
    assert len(row["ms_rounds_rope_compile"]) == 2 and row["speedup"] > 0
    assert "HF Qwen3" in (tmp_path / "decode.md").read_text()
    assert (tmp_path / "decode.json").exists()


def test_decode_prologue_kernel_count_sglang():
    """The sglang-style model (one fused qkv GEMM): with an attention kernel, and with SDPA's
    math fallback (QK^T and PV as batched GEMMs), the layers cut by their GEMM count."""
    bench = _bench("bench_decode")
    qkv_gemms, layer_gemms = bench.GEMM_LAYOUT["sglang"]
    layer_tail = ["nvjet_tst_o", "triton_red_fused_add_rms_norm_5", "nvjet_tst_gate_up",
                  "triton_poi_fused_mul_silu_6", "nvjet_tst_down", "triton_red_fused_add_7"]
    fused = ["triton_red_fused_rms_norm_0", "nvjet_tst_qkv", "fused_qk_norm_rope_kv_kernel",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", *layer_tail]
    assert bench.kernel_role("fused_qk_norm_rope_kv_kernel") == "other"
    assert bench.prologue_kernels(fused * 2 + ["nvjet_lm_head"], qkv_gemms) == [1, 1]
    math = ["triton_red_fused_rms_norm_0", "nvjet_tst_qkv", "triton_red_fused_q_norm_1",
            "triton_poi_fused_index_put_2", "triton_poi_fused_repeat_interleave_3",
            "gemv2T_kernel_val", "triton_red_fused_softmax_4", "splitKreduce_kernel",
            "sm90_xmma_gemm_f32f32", *layer_tail]
    step = math * 2 + ["nvjet_lm_head"]
    assert bench.prologue_kernels(step, qkv_gemms, layer_gemms, layers=2) == [3, 3]
    assert bench.prologue_kernels(step, qkv_gemms, layer_gemms, layers=3) == []
    assert bench.prologue_kernels(step, qkv_gemms) == []


def test_decode_sglang_tiny_cpu(tmp_path):
    """bench_decode end to end on CPU: the sglang-style TinyDecoder (q/k norm, forward_native
    RoPE with a FusedSetKVBufferArg store into a paged cache), batch 2, two rounds."""
    bench = _bench("bench_decode")
    model = bench.build("sglang", bench.TINY, "cpu", torch.float32)
    dec = bench.make_decoder("sglang", model, bench.TINY, 2, "cpu", graphs=False)
    assert [tuple(c.shape) for c in dec.k_caches] == [(2 * bench.TINY.cache_len, 1, 128)]
    with torch.no_grad():
        assert dec.step(model).shape == (2, bench.TINY.vocab)
    rows = bench.main(["--device", "cpu", "--tiny", "--models", "sglang", "--batches", "2,1",
                       "--rounds", "2", "--iters", "2", "--budget-s", "1e-3",
                       "--out", str(tmp_path)])
    row, skipped = rows  # the first case ran; the second would pass --budget-s
    assert skipped["batch"] == 1 and skipped["error"].startswith("skipped: --budget-s")
    assert row["error"] is None and (row["key"], row["batch"]) == ("sglang", 2)
    assert row["fused_calls_rope_compile"] == 1 and row["fused_calls_inductor"] == 0
    assert (row["rewritten"], row["qk_norm_rewritten"], row["kv_store_rewritten"]) == (1, 1, 1)
    assert row["max_err_rope_compile"] < 1e-4 and row["max_err_inductor"] < 1e-4
    assert len(row["ms_rounds_rope_compile"]) == 2 and row["speedup"] > 0
    assert "qk-norm 1, kv-store 1" in (tmp_path / "decode.md").read_text()


def test_prologue_op_tiny_cpu(tmp_path):
    """bench_prologue_op on CPU: each kind's fused op checked against eager (q, k and the
    written cache rows) and timed; the floor counts what the op must move."""
    bench = _bench("bench_prologue_op")
    rows = bench.main(["--device", "cpu", "--tiny", "--dtype", "fp32", "--rounds", "1",
                       "--out", str(tmp_path)])
    assert [r["kind"] for r in rows] == list(bench.KINDS)
    for row in rows:
        assert set(row["errors"]) == {"op"} and row["errors"]["op"] < 1e-5
        assert len(row["spread_us"]["op"]) == 2
    s = bench.Shape(3, q_heads=2, kv_heads=1, head_dim=128, slots=16)
    # q and k in place (2 * 3 * 3 * 128 * 4), cos/sin rows, positions; + v, k/v rows, loc.
    assert bench.floor_bytes("norm_rope", s, 4, 4) == 9216 + 1536 + 24 + 1024
    assert bench.floor_bytes("rope_kv", s, 4, 4) == 9216 + 1536 + 24 + 1536 + 3072 + 24
    assert "| norm_rope_kv | 3 |" in (tmp_path / "prologue_op.md").read_text()


def test_layout_copy_tiny_cpu(tmp_path):
    """bench_layout_copy end to end on CPU, T=8: the rule leaves the copies graph to Inductor,
    the forced variant rewrites it, both rewrite the SDPA control; two interleaved rounds."""
    bench = _bench("bench_layout_copy")
    rows = bench.main(["--device", "cpu", "--tiny", "--tokens", "8", "--rounds", "2",
                       "--repeats", "2", "--out", str(tmp_path)])
    by = {(r["graph"], r["variant"]): r for r in rows}
    assert sorted(by) == sorted((g, v) for g in bench.GRAPHS for v in bench.VARIANTS)
    assert all(r["error"] is None for r in rows), rows
    decisions = {key: (r["rewritten"], r["skipped_by_rule"], r["fused_calls"])
                 for key, r in by.items()}
    assert decisions == {
        ("copies", "inductor"): (0, 0, 0), ("copies", "rule"): (0, 1, 0),
        ("copies", "forced"): (1, 0, 1), ("sdpa", "inductor"): (0, 0, 0),
        ("sdpa", "rule"): (1, 0, 1), ("sdpa", "forced"): (1, 0, 1)}
    for r in rows:
        assert r["max_err"] < 1e-4 and len(r["us_rounds"]) == 2
        low, high = r["us_spread"]
        assert 0 < low <= r["us"] <= high
    text = (tmp_path / "layout_copy.md").read_text()
    assert "left to Inductor (rule)" in text and "the rule chose Inductor" in text
    assert (tmp_path / "layout_copy.json").exists()


def test_kernel_profile_time_outside_gemm_and_attention():
    """The prologue/RoPE side of a profile: every kernel but GEMMs and attention."""
    common = _bench("common")
    prof = common.KernelProfile(4, 10.0, {}, {"nvjet_tst_qkv": 5.0, "triton_poi_fused_rope": 1.5,
                                              "flash_fwd_kernel": 3.0,
                                              "fused_qk_norm_rope_kv_kernel": 0.5})
    assert prof.us_outside_gemm_and_attention() == 2.0


def test_sweep_prologue_kernel_cpu(tmp_path):
    """The launch-configuration sweep end to end under the interpreter: the heuristics' row
    first (its choice reported), then the swept configurations, the best among them."""
    bench = _bench("sweep_prologue_kernel")
    [result] = bench.main(["--device", "cpu", "--tokens", "2", "--kinds", "norm_rope",
                           "--max-configs", "2", "--repeats", "1", "--out", str(tmp_path)])
    heuristics, *swept = result["rows"]
    assert heuristics["heuristics"] and set(result["chosen"]) == {
        "block_h", "head_splits", "num_warps"}
    assert [(r["block_h"], r["head_splits"], r["num_warps"]) for r in swept] == [
        (2, 1, 2), (2, 2, 2)]
    assert result["best"]["us"] == min(r["us"] for r in result["rows"]) > 0
    assert "norm_rope, T = 2" in (tmp_path / "sweep_prologue.md").read_text()


def test_models_keep_the_quieter_profile(monkeypatch):
    """bench_models profiles each alternative twice, interleaved (common.quietest_profiles),
    and keeps the profile with less GPU time: a profile that caught one-time work (the H200
    run's int fills) is dropped, whichever of the two it was."""
    bench = _bench("bench_models")
    common = bench.common
    seen = []
    disturbed = {("inductor", 0), ("rope_compile", 1)}  # the first of one, the second of other

    def fake_profile(step, steps, device):
        alt = step()
        turn = sum(1 for a in seen if a == alt)
        seen.append(alt)
        gpu_us = 9000.0 if (alt, turn) in disturbed else {"inductor": 550.0,
                                                           "rope_compile": 520.0}[alt]
        return common.KernelProfile(63.0, gpu_us, {}, {})

    monkeypatch.setattr(common, "profile_gpu_kernels", fake_profile)
    steps = {"inductor": lambda: "inductor", "rope_compile": lambda: "rope_compile"}
    best = common.quietest_profiles(steps, 5, "cuda")
    assert seen == ["inductor", "rope_compile", "rope_compile", "inductor"]  # interleaved
    assert {alt: p.gpu_us for alt, p in best.items()} == {"inductor": 550.0,
                                                          "rope_compile": 520.0}
    monkeypatch.setattr(common, "profile_gpu_kernels", lambda *a: None)  # the CPU: no profile
    assert common.quietest_profiles(steps, 5, "cpu") == {"inductor": None, "rope_compile": None}


def test_sets_beyond_l2(monkeypatch):
    """The input-set count every op benchmark rotates over: together at least 3x the L2
    (rounded up), at least 1 and at most the cap; 1 where there is no L2 (the CPU)."""
    common = _bench("common")
    assert common.sets_beyond_l2(10 * 2**20, "cpu") == 1
    monkeypatch.setattr(common, "l2_cache_bytes", lambda device: 60 * 2**20)
    assert common.sets_beyond_l2(50 * 2**20, "cuda") == 4  # 150 MiB < 180 <= 200
    assert common.sets_beyond_l2(60 * 2**20, "cuda") == 3  # exactly 3x
    assert common.sets_beyond_l2(1 * 2**20, "cuda") == 20  # the default cap
    assert common.sets_beyond_l2(1 * 2**20, "cuda", max_sets=8) == 8
    assert common.sets_beyond_l2(2**30, "cuda") == 1
    assert common.sets_beyond_l2(0, "cuda") == 20  # an empty set counts as one byte
