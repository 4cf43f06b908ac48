#!/usr/bin/env bash
# The XPU lane (docs/xpu.md): every launch configuration the planners emit for Intel GPUs,
# compiled by Intel's Triton backend to SPIR-V (no OpCapability Float64), to PVC and DG2 machine
# code by ocloc (no spill on PVC), and run on Intel's OpenCL CPU runtime, bit-exact against the
# reference. Sets up its own venv (.xpu/venv) and, where missing, Debian's intel-opencl-icd.
# Ends on "N passed, M failed"; exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -m tools.xpu_lane.run "$@"
