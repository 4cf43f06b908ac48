"""Run one of the soundness fuzzers in several processes with disjoint seeds, and merge their
statistics (for a many-core host: the GPU host's CPUs, or several processes sharing one GPU).

    python tools/parallel_fuzz.py prologue --device cpu --procs 12 --programs 400 \
        --seed 300000 --time-limit 420 --out results/prologue_cpu.json

Process ``i`` runs ``tests/fuzz_<name>.py --seed SEED + i * PROGRAMS --programs PROGRAMS``
(so seeds never overlap). Numbers in the per-process JSON are summed, dicts of numbers summed
key by key, lists concatenated. Exit status 1 if any process reports a failed program.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def merge(into: dict, part: dict) -> dict:
    for key, value in part.items():
        if isinstance(value, bool) or key in ("seed", "requested_programs"):
            into.setdefault(key, value)
        elif isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            merge(into.setdefault(key, {}), value)
        elif isinstance(value, list):
            if key in into and into[key] == value:
                continue  # the same constant list in every part (oracle rules)
            into.setdefault(key, []).extend(value)
        else:
            into.setdefault(key, value)
    return into


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fuzzer", choices=("prologue", "layouts"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--procs", type=int, default=os.cpu_count())
    parser.add_argument("--programs", type=int, default=200, help="per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    script = ROOT / "tests" / f"fuzz_{args.fuzzer}.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(args.procs):
            cmd = [sys.executable, str(script), "--device", args.device, "--programs",
                   str(args.programs), "--seed", str(args.seed + i * args.programs),
                   "--out", f"{tmp}/{i}.json"]
            if args.time_limit:
                cmd += ["--time-limit", str(args.time_limit)]
            log = open(f"{tmp}/{i}.log", "w")  # noqa: SIM115 (closed below)
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           env=env, cwd=ROOT), log))
        codes = []
        for proc, log in procs:
            codes.append(proc.wait())
            log.close()
        merged: dict = {"processes": args.procs, "exit_codes": codes}
        for i in range(args.procs):
            path = Path(f"{tmp}/{i}.json")
            if path.exists():
                merge(merged, json.loads(path.read_text()))
            else:
                print(f"process {i} wrote no statistics; its log ends:\n"
                      + Path(f"{tmp}/{i}.log").read_text()[-3000:])
        failed_logs = [Path(f"{tmp}/{i}.log").read_text()[-4000:]
                       for i, code in enumerate(codes) if code not in (0,)]
        merged["failed_process_log_tails"] = failed_logs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(merged, indent=1, default=str))
    keys = [k for k in ("programs", "failed_programs", "inductor_only_programs",
                                               "oracle_misses") if k in merged]
    print(f"{args.fuzzer} on {args.device}, {args.procs} processes: "
          + ", ".join(f"{k} {merged[k]}" for k in keys) + f"; exit codes {codes}")
    return 1 if merged.get("failed_programs") or any(c not in (0,) for c in codes) else 0


if __name__ == "__main__":
    sys.exit(main())
