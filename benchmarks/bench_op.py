"""Microbenchmark of rope_compile's fused in-place Q+K RoPE against the alternatives.

One command does everything (GPU)::

    python benchmarks/bench_op.py --out OUT_DIR             # full table (~17 rows)
    python benchmarks/bench_op.py --out OUT_DIR --quick     # subset
    python benchmarks/bench_op.py --out OUT_DIR --sweep     # launcher-config sweep only
    python benchmarks/bench_op.py --list                    # show the rows and exit

It measures the device-to-device copy bandwidth once (the ceiling), then for every row of
:data:`ROWS` times, in GPU µs per call:

* ``triton``     (a) ``rope_compile.kernels.rope_cache.launch_fused_qk_rope`` called directly;
* ``op``         (b) ``torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace``;
* ``public``     (f) ``rope_compile.fused_qk_rope_with_cos_sin_cache_inplace``, which relaunches
  the compiled kernel without the dispatcher (``rope_compile.fast_launch``);
* ``eager``      (c) ``RotaryEmbedding.forward_native`` (out of place);
* ``compile``    (d) ``torch.compile(forward_native)`` (Inductor, default mode; out of place, so
  it also allocates its outputs, which is what users get);
* ``flashinfer`` (e) ``flashinfer.rope.apply_rope_with_cos_sin_cache_inplace``, if importable.

GPU time is measured with our own CUDA-graph timer (``common.time_cuda_graph_us``, not
``triton.testing.do_bench_cudagraph``): 20 calls captured in one graph, rotating among up to
20 input buffers (together 3x the L2 where that many suffice), the graph replayed ``--repeats``
times, each replay timed with CUDA events; median replay time / 20. Before timing, every impl
is checked against ``rope_compile.reference.rope_reference`` on fresh random data (max abs error
within a few bf16/fp16 ulps of the largest output; v and the non-rotated tail bit-identical).

Per row it reports the floor (bytes of the rotated part of q and k read and written, plus the
cos/sin rows read, over the copy bandwidth), each impl's time, the % of copy bandwidth reached by
(a), and, for rows with ``T <= --host-max-tokens`` (default 1), the host µs/call without graphs
(200 back-to-back calls timed with ``time.perf_counter``, one synchronisation at the end: CPU
launch overhead; median of 7 rounds that interleave the impls). Writes ``results.md``,
``results.json`` and ``rope_bench.png`` (if matplotlib is importable) to ``--out``; the
markdown table is the last thing printed.

On CPU (``--device cpu``) the script sets ``TRITON_INTERPRET=1``, uses ``time.perf_counter``
instead of CUDA graphs and skips flashinfer and (unless ``--impls`` names it) torch.compile;
``run_benchmark`` is the entry point the smoke test uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

try:  # imported as benchmarks.bench_op
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

IMPLS = ("triton", "op", "public", "eager", "compile", "flashinfer")
LETTER = {"triton": "a", "op": "b", "public": "f", "eager": "c", "compile": "d",
          "flashinfer": "e"}
IN_PLACE = ("triton", "op", "public", "flashinfer")
HOST_IMPLS = ("triton", "op", "public", "compile", "flashinfer")
# Allowed error, in ulps of the largest output magnitude: the fused kernels compute in fp32 and
# round once; forward_native computes in the input dtype (bf16 products), so it gets more room.
ULPS = {"triton": 2, "op": 2, "public": 2, "flashinfer": 2, "eager": 8, "compile": 8}

SWEEP_BLOCK_H = (1, 2, 4, 8, 16, 32)
SWEEP_HEAD_SPLITS = (1, 2, 4, 8)
SWEEP_NUM_WARPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Row:
    """One problem: heads, head size, rotary dim, style, tokens, dtypes."""

    hq: int
    hk: int
    d: int
    rot: int
    neox: bool
    tokens: int
    dtype: str = "bf16"
    pos_dtype: str = "int64"
    quick: bool = False  # part of --quick
    sweep: bool = False  # part of --sweep

    @property
    def name(self) -> str:
        name = f"{self.hq}/{self.hk}/{self.d}/{self.rot} {'neox' if self.neox else 'gptj'} "
        name += f"T={self.tokens}"
        if self.dtype != "bf16":
            name += f" {self.dtype}"
        if self.pos_dtype != "int64":
            name += f" {self.pos_dtype}"
        return name

    @property
    def max_position(self) -> int:
        return max(8192, self.tokens)

    def floor_bytes(self) -> int:
        """Bytes the op must move: rotated q/k read + written, cos/sin rows (fp32) read."""
        elem = common.DTYPES[self.dtype].itemsize
        return (2 * self.tokens * (self.hq + self.hk) * self.rot * elem
                + self.tokens * self.rot * 4)


def _rows() -> list[Row]:
    rows = []
    for t in (1, 128, 1024, 8192, 32768):  # Llama-3-8B-like
        rows.append(Row(32, 8, 128, 128, True, t, quick=t in (1, 1024, 32768),
                        sweep=t in (1, 128, 1024, 32768)))
    for t in (1024, 16384):
        rows.append(Row(16, 8, 256, 256, True, t, sweep=t == 16384))
    rows += [
        Row(16, 16, 256, 64, False, 16384, quick=True, sweep=True),  # partial rotary, GPT-J
        Row(32, 2, 128, 64, False, 16384, sweep=True),
        Row(8, 1, 512, 512, True, 16384, sweep=True),
        Row(32, 8, 128, 128, True, 1024, dtype="fp16"),
        Row(32, 8, 128, 128, True, 1024, pos_dtype="int32"),
        Row(32, 8, 128, 128, True, 0, quick=True),
        Row(32, 8, 128, 128, True, 7, quick=True),
        Row(32, 8, 128, 128, True, 4097),
    ]
    return rows


ROWS: list[Row] = _rows()


def select_rows(
    rows: Sequence[Row], quick: bool = False, patterns: str | None = None, sweep: bool = False
) -> list[Row]:
    """``--quick`` / ``--sweep`` subsets, then ``--rows`` (comma-separated regexes matched with
    ``re.search`` against the row name, e.g. ``--rows 'T=1024,gptj'``). With ``--sweep`` and
    ``--rows`` every matching row is swept."""
    selected = list(rows)
    if quick:
        selected = [r for r in selected if r.quick]
    if patterns:
        regexes = [re.compile(p.strip()) for p in patterns.split(",") if p.strip()]
        selected = [r for r in selected if any(rx.search(r.name) for rx in regexes)]
    elif sweep:
        selected = [r for r in selected if r.sweep]
    return selected


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    device: str
    launch: Callable
    flashinfer: Callable | None
    flashinfer_reason: str


def _load_flashinfer(device: str) -> tuple[Callable | None, str]:
    if torch.device(device).type != "cuda":
        return None, "needs CUDA"
    try:
        from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace
    except Exception as err:  # noqa: BLE001 - anything that stops the import means n/a
        return None, f"import flashinfer failed: {type(err).__name__}: {err}"
    return apply_rope_with_cos_sin_cache_inplace, ""


def _context(device: str) -> _Context:
    from rope_compile.kernels.rope_cache import launch_fused_qk_rope

    fi, reason = _load_flashinfer(device)
    return _Context(device, launch_fused_qk_rope, fi, reason)


def _skip_reason(impl: str, row: Row, ctx: _Context) -> str | None:
    from rope_compile.kernels.rope_cache import is_interpreter

    on_cpu = torch.device(ctx.device).type == "cpu"
    if impl == "triton" and on_cpu and not is_interpreter():
        return "CPU needs TRITON_INTERPRET=1"
    if impl == "flashinfer":
        if ctx.flashinfer is None:
            return ctx.flashinfer_reason
        if row.tokens == 0:
            # An empty grid is a launch error, which could surface later in another kernel.
            return "T=0 not attempted"
    return None


def _make_call(impl: str, row: Row, inp: common.RopeInputs, module, compiled, ctx: _Context):
    cache, pos, rot, neox = module.cos_sin_cache, inp.positions, row.rot, row.neox
    if impl == "triton":
        launch = ctx.launch
        return lambda: launch(inp.q_rot, inp.k_rot, cache, pos, rot, neox)
    if impl == "op":
        op = torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace
        return lambda: op(inp.q_rot, inp.k_rot, cache, pos, rot, neox)
    if impl == "public":
        from rope_compile import fused_qk_rope_with_cos_sin_cache_inplace as public

        return lambda: public(inp.q_rot, inp.k_rot, cache, pos, rot, neox)
    if impl == "eager":
        return lambda: module.forward_native(pos, inp.q2d, inp.k2d)
    if impl == "compile":
        return lambda: compiled(pos, inp.q2d, inp.k2d)
    if impl == "flashinfer":
        fi, d = ctx.flashinfer, row.d
        return lambda: fi(pos, inp.q2d, inp.k2d, d, cache, neox)
    raise ValueError(f"unknown impl {impl!r}")


def _inputs(row: Row, device: str, seed: int) -> common.RopeInputs:
    return common.make_rope_inputs(
        row.tokens, row.hq, row.hk, row.d, row.rot, common.DTYPES[row.dtype],
        common.POS_DTYPES[row.pos_dtype], device, row.max_position, seed,
    )


def _check(impl: str, row: Row, module, compiled, ctx: _Context) -> tuple[bool, float, float]:
    """Run ``impl`` once on fresh inputs; (ok, max abs error, tolerance)."""
    from rope_compile.reference import rope_reference

    inp = _inputs(row, ctx.device, seed=12345)
    cache = module.cos_sin_cache
    want_q = rope_reference(inp.q3, inp.positions, cache, row.rot, row.neox)
    want_k = rope_reference(inp.k3, inp.positions, cache, row.rot, row.neox)
    v_before = inp.v.clone()
    out = _make_call(impl, row, inp, module, compiled, ctx)()
    common.synchronize(ctx.device)
    if impl in IN_PLACE:
        got_q, got_k = inp.q3, inp.k3
    else:
        got_q = out[0].reshape(row.tokens, row.hq, row.d)
        got_k = out[1].reshape(row.tokens, row.hk, row.d)
    err = max(common.max_abs_err(got_q, want_q), common.max_abs_err(got_k, want_k))
    ref_max = max(common.abs_max(want_q), common.abs_max(want_k))
    tol = common.tolerance(common.DTYPES[row.dtype], ref_max, ULPS[impl])
    untouched = (torch.equal(inp.v, v_before)
                 and torch.equal(got_q[..., row.rot:], want_q[..., row.rot:])
                 and torch.equal(got_k[..., row.rot:], want_k[..., row.rot:]))
    return err <= tol and untouched, err, tol


def _n_buffers(row: Row, device: str, max_buffers: int) -> int:
    """Enough buffers that together they are 3x the L2, so L2 cannot serve them all (at most
    ``max_buffers`` and 4 GiB; for tiny problems they may all still fit)."""
    if torch.device(device).type != "cuda":
        return min(2, max_buffers)
    set_bytes = max(1, _inputs_nbytes(row))
    budget = max(1, (4 * 2**30) // set_bytes)  # at most 4 GiB of buffers
    return max(1, min(common.sets_beyond_l2(set_bytes, device, max_buffers), budget))


def _inputs_nbytes(row: Row) -> int:
    elem = common.DTYPES[row.dtype].itemsize
    pos = common.POS_DTYPES[row.pos_dtype].itemsize
    return row.tokens * ((row.hq + 2 * row.hk) * row.d * elem + pos)


def _short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:300]


def _heuristic_config(row: Row, device: str) -> dict:
    from rope_compile.kernels.rope_cache import launch_shape

    shape = launch_shape(row.tokens, row.hq, row.hk, row.rot, row.neox,
                         torch.device(device).type, common.DTYPES[row.dtype].itemsize)
    return {"block_h": shape.constexprs["BLOCK_H"], "head_splits": shape.head_splits,
            **shape.options}


def _run_row(row: Row, ctx: _Context, impls: Sequence[str], opts: dict, copy_bw: float) -> dict:
    from rope_compile import RotaryEmbedding

    device = ctx.device
    on_cuda = torch.device(device).type == "cuda"
    dtype = common.DTYPES[row.dtype]
    module = RotaryEmbedding(row.d, row.rot, row.max_position, 10000.0, row.neox, dtype)
    module = module.to(device)
    compiled = None
    if "compile" in impls:
        torch._dynamo.reset()  # fresh caches per row: no recompile limit, static shapes
        compiled = torch.compile(module.forward_native)

    floor_bytes = row.floor_bytes()
    res = {
        "name": row.name,
        "row": asdict(row),
        "floor_bytes": floor_bytes,
        "floor_us": floor_bytes / copy_bw * 1e6,
        "timer": "cuda-graph" if on_cuda else "perf_counter",
        "n_buffers": _n_buffers(row, device, opts["max_buffers"]),
        "triton_config": _heuristic_config(row, device),
        "time_us": {},
        "host_us": {},
        "pct_copy_bw": {},
        "check": {},
        "max_err": {},
        "tol": {},
        "errors": {},
        "skipped": {},
    }
    bufs = [_inputs(row, device, seed=i) for i in range(res["n_buffers"])]
    host_calls: dict[str, Callable] = {}
    for impl in impls:
        res["time_us"][impl] = res["host_us"][impl] = res["pct_copy_bw"][impl] = None
        reason = _skip_reason(impl, row, ctx)
        if reason is not None:
            res["check"][impl] = "skip"
            res["skipped"][impl] = reason
            continue
        try:
            if opts["check"]:
                ok, err, tol = _check(impl, row, module, compiled, ctx)
                res["check"][impl] = "OK" if ok else "FAIL"
                res["max_err"][impl], res["tol"][impl] = err, tol
            else:
                res["check"][impl] = "unchecked"
            fns = [_make_call(impl, row, b, module, compiled, ctx) for b in bufs]
            if on_cuda:
                t, _ = common.time_cuda_graph_us(fns, opts["n_calls"], opts["repeats"])
            else:
                t, _ = common.time_perf_counter_us(fns, opts["repeats"], device)
            res["time_us"][impl] = t
            if t > 0 and floor_bytes:
                res["pct_copy_bw"][impl] = 100.0 * res["floor_us"] / t
            if impl in HOST_IMPLS and row.tokens <= opts["host_max_tokens"]:
                host_calls[impl] = fns[0]
        except Exception as err:  # noqa: BLE001 - record and go on with the other impls
            res["errors"][impl] = _short_error(err)
            if res["check"].get(impl) in (None, "unchecked"):
                res["check"][impl] = "err"
    # Host time in interleaved rounds, so that the drift of a shared host hits every impl alike.
    host_samples: dict[str, list[float]] = {impl: [] for impl in host_calls}
    for _ in range(opts["host_rounds"]):
        for impl, fn in host_calls.items():
            host_samples[impl].append(common.host_time_us(fn, opts["host_iters"], device))
    for impl, got in host_samples.items():
        res["host_us"][impl] = statistics.median(got)
    del bufs
    if on_cuda:
        torch.cuda.empty_cache()
    return res


def run_benchmark(
    rows: Sequence[Row],
    device: str = "cuda",
    repeats: int = 10,
    impls: Sequence[str] = IMPLS,
    *,
    copy_bw: float | None = None,
    n_calls: int = 20,
    host_iters: int = 200,
    host_max_tokens: int = 1,
    host_rounds: int = 7,
    max_buffers: int | None = None,
    check: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Benchmark ``rows`` with ``impls``; one result dict per row (see ``_run_row``).

    ``repeats`` is the number of CUDA-graph replays on GPU, of timed calls on CPU. ``copy_bw``
    (bytes/s) is measured when not given. On CPU the Triton launcher needs
    ``TRITON_INTERPRET=1`` set before Triton is imported; flashinfer is skipped there.
    ``max_buffers`` (default ``n_calls``) caps the input buffers rotated through on GPU.
    """
    from rope_compile.validation import set_check_positions

    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    set_check_positions(False)  # the opt-in check syncs, which CUDA-graph capture forbids
    if copy_bw is None:
        copy_bw = common.measure_copy_bandwidth(device)
    ctx = _context(device)
    opts = {"repeats": repeats, "n_calls": n_calls, "host_iters": host_iters,
            "host_rounds": host_rounds,
            "host_max_tokens": host_max_tokens, "max_buffers": max_buffers or n_calls,
            "check": check}
    results = []
    for row in rows:
        t0 = time.perf_counter()
        res = _run_row(row, ctx, impls, opts, copy_bw)
        res["copy_bw_gbs"] = copy_bw / 1e9
        results.append(res)
        times = " ".join(f"{LETTER[i]}={common.fmt(res['time_us'][i])}" for i in impls)
        log(f"[{time.perf_counter() - t0:5.1f}s] {row.name:<30} {times} "
            f"check={_check_cell(res)}")
    return results


def run_sweep(
    rows: Sequence[Row],
    device: str,
    repeats: int,
    copy_bw: float,
    n_calls: int = 20,
    max_buffers: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Time the launcher with every valid (block_h, head_splits, num_warps) override."""
    import triton

    from rope_compile import RotaryEmbedding
    from rope_compile.validation import set_check_positions

    set_check_positions(False)
    ctx = _context(device)
    on_cuda = torch.device(device).type == "cuda"
    out = []
    for row in rows:
        t0 = time.perf_counter()
        module = RotaryEmbedding(row.d, row.rot, row.max_position, 10000.0, row.neox,
                                 common.DTYPES[row.dtype]).to(device)
        cache = module.cos_sin_cache
        n_bufs = _n_buffers(row, device, max_buffers or n_calls)
        bufs = [_inputs(row, device, seed=i) for i in range(n_bufs)]

        def timed(cfg: dict, bufs=bufs, cache=cache, row=row) -> float:
            fns = [
                (lambda b=b: ctx.launch(b.q_rot, b.k_rot, cache, b.positions, row.rot, row.neox,
                                        **cfg))
                for b in bufs
            ]
            if on_cuda:
                return common.time_cuda_graph_us(fns, n_calls, repeats)[0]
            return common.time_perf_counter_us(fns, repeats, device)[0]

        heuristic = _heuristic_config(row, device)
        entry = {"name": row.name, "row": asdict(row), "heuristic": heuristic,
                 "heuristic_us": timed({}), "configs": [], "errors": []}
        max_heads = max(row.hq, row.hk)
        for bh in SWEEP_BLOCK_H:
            if bh > triton.next_power_of_2(max_heads):
                continue
            for hs in SWEEP_HEAD_SPLITS:
                if hs > triton.cdiv(max_heads, bh):
                    continue  # the extra programs would have no heads to rotate
                for nw in SWEEP_NUM_WARPS:
                    cfg = {"block_h": bh, "head_splits": hs, "num_warps": nw}
                    try:
                        entry["configs"].append({**cfg, "us": timed(cfg)})
                    except Exception as err:  # noqa: BLE001 - e.g. out of resources
                        entry["errors"].append({**cfg, "error": _short_error(err)})
        entry["configs"].sort(key=lambda c: c["us"])
        floor_us = row.floor_bytes() / copy_bw * 1e6
        entry["floor_us"] = floor_us
        if entry["configs"]:
            best = entry["configs"][0]
            entry["best"] = best
            entry["best_check"] = _check_config(row, module, ctx, best)
        out.append(entry)
        best_us = entry["configs"][0]["us"] if entry["configs"] else None
        log(f"[{time.perf_counter() - t0:5.1f}s] sweep {row.name:<30} "
            f"heuristic={common.fmt(entry['heuristic_us'], 2)} best={common.fmt(best_us, 2)} "
            f"({len(entry['configs'])} configs, {len(entry['errors'])} failed)")
        del bufs
    return out


def _check_config(row: Row, module, ctx: _Context, cfg: dict) -> str:
    from rope_compile.reference import rope_reference

    inp = _inputs(row, ctx.device, seed=777)
    cache = module.cos_sin_cache
    want_q = rope_reference(inp.q3, inp.positions, cache, row.rot, row.neox)
    want_k = rope_reference(inp.k3, inp.positions, cache, row.rot, row.neox)
    kw = {k: cfg[k] for k in ("block_h", "head_splits", "num_warps")}
    ctx.launch(inp.q_rot, inp.k_rot, cache, inp.positions, row.rot, row.neox, **kw)
    err = max(common.max_abs_err(inp.q3, want_q), common.max_abs_err(inp.k3, want_k))
    ref_max = max(common.abs_max(want_q), common.abs_max(want_k))
    return "OK" if err <= common.tolerance(common.DTYPES[row.dtype], ref_max, 2) else "FAIL"


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _check_cell(res: dict) -> str:
    bad = [f"{LETTER[i]}:{s}" for i, s in res["check"].items() if s not in ("OK", "skip")]
    return " ".join(bad) if bad else "OK"


def _time_cell(res: dict, impl: str) -> str:
    if impl not in res["time_us"]:
        return "-"
    if impl in res["errors"]:
        return "err"
    if impl in res["skipped"]:
        return "n/a"
    return common.fmt(res["time_us"][impl])


def results_table(results: Sequence[dict], impls: Sequence[str]) -> str:
    host_impls = [i for i in HOST_IMPLS if i in impls]
    headers = (["row", "floor"] + [f"{LETTER[i]} {i}" for i in impls]
               + ["%BW a", "cfg a bh/hs/nw"] + [f"host {LETTER[i]}" for i in host_impls]
               + ["check"])
    lines = []
    for r in results:
        cfg = r["triton_config"]
        pct = r["pct_copy_bw"].get("triton")
        lines.append(
            [r["name"], common.fmt(r["floor_us"], 2)]
            + [_time_cell(r, i) for i in impls]
            + [common.fmt(pct, 0) if pct is not None else "-",
               f"{cfg['block_h']}/{cfg['head_splits']}/{cfg['num_warps']}"]
            + [common.fmt(r["host_us"].get(i)) for i in host_impls]
            + [_check_cell(r)]
        )
    return common.markdown_table(headers, lines)


def sweep_table(entries: Sequence[dict]) -> str:
    headers = ["row", "floor", "heuristic bh/hs/nw", "µs", "best bh/hs/nw", "µs", "speedup",
               "%BW best", "check", "next best"]
    lines = []
    for e in entries:
        h = e["heuristic"]
        best = e.get("best")
        runners = ", ".join(f"{c['block_h']}/{c['head_splits']}/{c['num_warps']}:"
                            f"{common.fmt(c['us'], 2)}" for c in e["configs"][1:4])
        if best is None:
            lines.append([e["name"], common.fmt(e["floor_us"], 2),
                          f"{h['block_h']}/{h['head_splits']}/{h['num_warps']}",
                          common.fmt(e["heuristic_us"], 2), "-", "-", "-", "-", "-", "-"])
            continue
        lines.append([
            e["name"], common.fmt(e["floor_us"], 2),
            f"{h['block_h']}/{h['head_splits']}/{h['num_warps']}",
            common.fmt(e["heuristic_us"], 2),
            f"{best['block_h']}/{best['head_splits']}/{best['num_warps']}",
            common.fmt(best["us"], 2),
            f"{e['heuristic_us'] / best['us']:.2f}x",
            common.fmt(100 * e["floor_us"] / best["us"], 0) if e["floor_us"] else "-",
            e["best_check"], runners,
        ])
    return common.markdown_table(headers, lines)


def _meta_lines(meta: dict) -> list[str]:
    return [
        f"- device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"CUDA {meta['cuda']}, triton {meta['triton']}, flashinfer {meta['flashinfer'] or 'n/a'}",
        f"- copy bandwidth (read+write, D2D): {meta['copy_bw_gbs']:.0f} GB/s",
        f"- timer: {meta['timer']}",
    ]


def _legend(impls: Sequence[str]) -> str:
    names = {
        "triton": "launch_fused_qk_rope (Triton launcher)",
        "op": "torch.ops.rope_compile.fused_qk_rope_with_cos_sin_cache_inplace",
        "public": "rope_compile.fused_qk_rope_with_cos_sin_cache_inplace (eager fast path)",
        "eager": "RotaryEmbedding.forward_native (eager)",
        "compile": "torch.compile(forward_native), Inductor default mode",
        "flashinfer": "flashinfer.rope.apply_rope_with_cos_sin_cache_inplace",
    }
    parts = [f"{LETTER[i]} = {names[i]}" for i in impls]
    return ("µs per call. Rows are Hq/Hk/D/rot style T. floor = (2*T*(Hq+Hk)*rot*elem + "
            "T*rot*4 bytes) / copy bandwidth. %BW a = floor / time(a). cfg a = heuristic "
            "block_h/head_splits/num_warps. host = µs/call of back-to-back calls without "
            "graphs (CPU launch overhead), median of interleaved rounds. check: OK, or "
            "impl:FAIL/err. " + "; ".join(parts)
            + ".")


def write_plot(results: Sequence[dict], impls: Sequence[str], path: Path) -> bool:
    """Bar chart of time / floor per row and impl; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return False
    rows = [r for r in results if r["floor_us"] > 0]
    shown = [i for i in impls if any(r["time_us"].get(i) for r in rows)]
    if not rows or not shown:
        return False
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(rows) * len(shown) / 2), 5))
    for j, impl in enumerate(shown):
        xs, ys = [], []
        for k, r in enumerate(rows):
            t = r["time_us"].get(impl)
            if t:
                xs.append(k + (j - (len(shown) - 1) / 2) * width)
                ys.append(t / r["floor_us"])
        ax.bar(xs, ys, width, label=f"({LETTER[impl]}) {impl}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    _, top = ax.get_ylim()
    ax.set_ylim(top=top * 2.5)  # room for the legend
    ax.set_ylabel("time / floor (1 = copy bandwidth; lower is better)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.legend(fontsize=8, ncol=len(shown), loc="upper left")
    ax.set_title("rope_compile fused Q+K RoPE: GPU time normalised to the floor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _problems(results: Sequence[dict]) -> list[str]:
    lines = []
    for r in results:
        for impl, msg in r["errors"].items():
            lines.append(f"- {r['name']} ({LETTER[impl]}) {impl}: {msg}")
        for impl, status in r["check"].items():
            if status == "FAIL":
                lines.append(f"- {r['name']} ({LETTER[impl]}) {impl}: check FAILED, max abs err "
                             f"{r['max_err'][impl]:.3g} > tol {r['tol'][impl]:.3g}")
    return lines


def _skips(results: Sequence[dict]) -> list[str]:
    reasons: dict[tuple[str, str], int] = {}
    for r in results:
        for impl, why in r["skipped"].items():
            reasons[(impl, why)] = reasons.get((impl, why), 0) + 1
    return [f"- {impl} skipped on {n} row(s): {why}" for (impl, why), n in reasons.items()]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results", help="output directory")
    p.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    p.add_argument("--quick", action="store_true", help="the quick subset of rows")
    p.add_argument("--rows", default=None,
                   help="comma-separated regexes matched against row names, e.g. 'T=1024,gptj'")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated subset of {','.join(IMPLS)} (default: all on GPU, "
                        "triton,op,eager on CPU)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--sweep", action="store_true",
                   help="sweep launcher overrides (block_h, head_splits, num_warps) instead")
    p.add_argument("--repeats", type=int, default=10,
                   help="CUDA-graph replays per measurement (timed calls on CPU)")
    p.add_argument("--n-calls", type=int, default=20, help="calls captured per CUDA graph")
    p.add_argument("--host-iters", type=int, default=None,
                   help="calls per host-time loop (default 200 on GPU, 5 on CPU)")
    p.add_argument("--host-max-tokens", type=int, default=1,
                   help="measure host µs/call for rows with T <= this")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--list", action="store_true", help="print the selected rows and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    device = args.device or common.default_device()
    if torch.device(device).type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
    rows = select_rows(ROWS, args.quick, args.rows, args.sweep)
    if torch.device(device).type == "cpu" and not args.rows:
        rows = [r for r in rows if r.tokens <= 128]  # the interpreter is slow: tiny rows only
    if args.list or not rows:
        for r in rows:
            print(r.name)
        return 0 if rows else 1
    if args.impls:
        given = {i.strip() for i in args.impls.split(",") if i.strip()}
        impls = [i for i in IMPLS if i in given] + sorted(given - set(IMPLS))
    elif torch.device(device).type == "cpu":
        impls = ["triton", "op", "eager"]
    else:
        impls = list(IMPLS)
    if args.no_compile:
        impls = [i for i in impls if i != "compile"]
    host_iters = args.host_iters or (200 if torch.device(device).type == "cuda" else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    meta = common.env_info(device)
    copy_bw = common.measure_copy_bandwidth(device)
    if torch.device(device).type == "cuda":
        timer = (f"CUDA graph of {args.n_calls} calls rotating over input buffers, median of "
                 f"{args.repeats} replays")
    else:
        timer = "time.perf_counter per call (CPU, Triton interpreter)"
    meta.update(copy_bw_gbs=copy_bw / 1e9, argv=list(argv or sys.argv[1:]), timer=timer)
    print(f"{meta['device_name']}: copy bandwidth {copy_bw / 1e9:.0f} GB/s; torch "
          f"{meta['torch']}, triton {meta['triton']}, flashinfer {meta['flashinfer'] or 'n/a'}",
          flush=True)

    if args.sweep:
        entries = run_sweep(rows, device, args.repeats, copy_bw, n_calls=args.n_calls,
                            log=lambda s: print(s, flush=True))
        table = sweep_table(entries)
        (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": entries}, indent=1))
        (out / "sweep.md").write_text(
            "# rope_compile launcher sweep\n\n" + "\n".join(_meta_lines(meta))
            + "\n\nµs per call; configs are block_h/head_splits/num_warps.\n\n" + table + "\n")
        print(f"\nwrote {out / 'sweep.md'}, {out / 'sweep.json'}")
        unit = "GPU" if torch.device(device).type == "cuda" else "CPU"
        print(f"\n## launcher sweep ({unit} µs/call; bh/hs/nw); {meta['device_name']}\n")
        print(table)
        return 0

    results = run_benchmark(
        rows, device, args.repeats, impls, copy_bw=copy_bw, n_calls=args.n_calls,
        host_iters=host_iters, host_max_tokens=args.host_max_tokens, check=not args.no_check,
        log=lambda s: print(s, flush=True),
    )
    table = results_table(results, impls)
    problems, skips = _problems(results), _skips(results)
    md = ["# rope_compile fused Q+K RoPE benchmark", "", *_meta_lines(meta), "",
          _legend(impls), "", table, ""]
    if problems:
        md += ["## Errors and failed checks", "", *problems, ""]
    if skips:
        md += ["## Skipped", "", *skips, ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    plotted = write_plot(results, impls, out / "rope_bench.png")
    written = ["results.md", "results.json"] + (["rope_bench.png"] if plotted else [])
    print(f"\nwrote {', '.join(str(out / w) for w in written)}"
          + ("" if plotted else " (no plot: matplotlib not importable)"))
    for line in (problems + skips)[:20]:
        print(line[:240])
    unit = "GPU" if torch.device(device).type == "cuda" else "CPU"
    print(f"\n## {unit} µs/call; copy bw {copy_bw / 1e9:.0f} GB/s; {meta['device_name']}\n")
    print(table)
    failed = any(s == "FAIL" for r in results for s in r["check"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
