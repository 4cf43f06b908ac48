"""The pass and Inductor's FX graph cache, across processes.

A small script compiles QKVRope (pass_helpers) with ``backend="rope_compile"`` in a fresh
interpreter, with ``TORCHINDUCTOR_CACHE_DIR`` pointing at a temporary directory shared by the
runs, and prints the cache and rope_compile counters, how often the fused op's CPU kernel ran and
whether the output equals eager:

1. first process: cache miss, the pass runs and rewrites; then, same model with other pass
   options: their uuid differs, so the cache key does: miss again, the pass runs again;
2. second process, first options: cache hit, the pass does not run, yet the loaded code still
   calls the fused op (its kernel runs once) and computes the same; the backend reports the
   pass's recorded decisions (``rope_compile.decision_cache``), so the counters are the same as
   on the first run, plus ``graphs_from_cache``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent

SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests_dir!r})
import torch
from torch._dynamo.utils import counters
import rope_compile.ops
from pass_helpers import QKVRope, positions_for, tokens

kernel_calls = []
real_kernel = rope_compile.ops.rope_reference_


def counting_kernel(*args, **kwargs):
    kernel_calls.append(1)
    return real_kernel(*args, **kwargs)


rope_compile.ops.rope_reference_ = counting_kernel  # the fused op's CPU kernel
model = QKVRope()
inputs = (positions_for(5), tokens(5))
with torch.no_grad():
    expected = model(*inputs)
for options in {option_sets!r}:
    torch._dynamo.reset()
    counters.clear()
    kernel_calls.clear()
    with torch.no_grad():
        out = torch.compile(model, backend="rope_compile", options=options)(*inputs)
    ok = all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(out, expected))
    print("RESULT " + json.dumps({{
        "hit": counters["inductor"]["fxgraph_cache_hit"],
        "miss": counters["inductor"]["fxgraph_cache_miss"],
        "bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "rope": dict(counters["rope_compile"]),
        "kernel_calls": len(kernel_calls),
        "equal_to_eager": ok,
    }}))
"""

OPTIONS = {"devices": ("cpu",)}
# Other pass options (one more head size): another uuid, so another cache key.
OTHER_OPTIONS = {"devices": ("cpu",), "head_sizes": (128, 256)}


def _run(cache_dir: Path, option_sets: list[dict]) -> list[dict]:
    """Run the script in a fresh interpreter; one result per compile (one per option set)."""
    env = dict(os.environ)  # keeps TRITON_INTERPRET (set by conftest) and the like
    for key in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        env.pop(key, None)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    script = SCRIPT.format(tests_dir=str(TESTS_DIR), option_sets=option_sets)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(ln.removeprefix("RESULT ")) for ln in proc.stdout.splitlines()
               if ln.startswith("RESULT ")]
    assert len(results) == len(option_sets), proc.stdout
    return results


def test_fx_graph_cache_across_processes(tmp_path):
    first, other = _run(tmp_path, [OPTIONS, OTHER_OPTIONS])
    assert (first["miss"], first["hit"], first["bypass"]) == (1, 0, 0), first
    assert first["rope"] == {"pairs_found": 1, "rewritten": 1}, first
    assert first["kernel_calls"] == 1 and first["equal_to_eager"], first
    # Same graph, other pass options: not served the first entry.
    assert (other["miss"], other["hit"], other["bypass"]) == (1, 0, 0), other
    assert other["rope"] == {"pairs_found": 1, "rewritten": 1}, other
    assert other["kernel_calls"] == 1 and other["equal_to_eager"], other

    (second,) = _run(tmp_path, [OPTIONS])
    assert (second["miss"], second["hit"], second["bypass"]) == (0, 1, 0), second
    # The pass did not run again; its recorded decisions are reported, marked as from the cache.
    assert second["rope"] == {"pairs_found": 1, "rewritten": 1, "graphs_from_cache": 1}, second
    # ... but the cached code is the rewritten one: it calls the fused op, once.
    assert second["kernel_calls"] == 1 and second["equal_to_eager"], second


def test_demo_twice_prints_the_same_counts(tmp_path):
    """The demo run twice (the second served by the FX graph cache) reports the same pairs and
    fused calls; on the CPU it shows progress and says what its numbers mean."""
    env = dict(os.environ)
    for key in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        env.pop(key, None)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "rope_compile.demo", "--device", "cpu",
                               "--layers", "2", "--tokens", "8", "--repeats", "1"], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # Progress while compiling (stderr), and the CPU numbers explained in the table.
        assert "compiling it with backend='rope_compile'" in proc.stderr, proc.stderr[-2000:]
        assert "<- below 1 is expected on a CPU" in proc.stdout, proc.stdout
        assert proc.stdout.rstrip().endswith("demo)."), proc.stdout
        fields = dict(line.split(None, 1) for line in proc.stdout.splitlines()
                      if line.split(None, 1)[:1] and line.split()[0] in (
                          "pairs_found", "pairs_rewritten", "fused_calls_in_code",
                          "graphs_from_cache"))
        runs.append(fields)
    first, second = runs
    assert first["pairs_found"] == second["pairs_found"] == "2", runs
    assert first["pairs_rewritten"] == second["pairs_rewritten"] == "2", runs
    assert first["fused_calls_in_code"] == second["fused_calls_in_code"] == "2", runs
    assert first["graphs_from_cache"] == "0" and second["graphs_from_cache"] == "1", runs
