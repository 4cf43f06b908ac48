#!/usr/bin/env bash
# The GPU host's run, from an uninstalled checkout (rope_compile/_checkout.py maps passes/).
#
#   tools/gpu_run.sh check OUT   # GPU tests (-m gpu) beside the fuzzers: CUDA with the default
#                                # options, and the CPU fuzzer on the host's other cores
#   tools/gpu_run.sh all OUT     # both, the timings after the tests and fuzzers
#   tools/gpu_run.sh bench OUT   # op rows of bench_op and bench_prologue_op, this tree against
#                                # the baseline tree in .base/ (git archive of a commit),
#                                # interleaved in rounds
#   tools/gpu_run.sh train OUT   # benchmarks/bench_train.py (HF Llama, HF Qwen3, the sglang
#                                # stack; Inductor, rope_compile and Liger, whose wheel is in
#                                # .whl/ too), then the training gradient tests on CUDA
#
# Needs the expecttest wheel in .whl/ (copied from the shared wheels). Time limits keep each
# mode under 9 minutes. Every result lands in OUT (tar it: the device tool brings back 8 files).
set -uo pipefail
mode=$1
out=$2
mkdir -p "$out"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/device.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$out/device.txt"
git_rev=$(cat .rev 2>/dev/null || echo unknown)
echo "commit $git_rev" | tee -a "$out/device.txt"

check() {
  limit=${FUZZ_SECONDS:-400}
  python3 tools/parallel_fuzz.py prologue --device cuda --procs 4 --programs 400 \
    --seed 500000 --time-limit "$limit" --out "$out/fuzz_prologue_cuda.json" \
    > "$out/fuzz_prologue_cuda.log" 2>&1 &
  python3 tools/parallel_fuzz.py layouts --device cuda --procs 1 --programs 400 \
    --seed 600000 --time-limit "$limit" --out "$out/fuzz_layouts_cuda.json" \
    > "$out/fuzz_layouts_cuda.log" 2>&1 &
  python3 tools/parallel_fuzz.py prologue --device cpu --procs 6 --programs 1000 \
    --seed 700000 --time-limit "$limit" --out "$out/fuzz_prologue_cpu.json" \
    > "$out/fuzz_prologue_cpu.log" 2>&1 &
  timeout $((limit + 60)) python3 -m pytest -q -m gpu -p no:cacheprovider -n ${GPU_TEST_PROCS:-2} ${GPU_TESTS:-tests} \
    > "$out/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"
  tail -n 30 "$out/gpu_tests.log"
  wait
  tail -n 3 "$out"/fuzz_*.log
}

bench() {
  for round in $(seq 1 ${BENCH_ROUNDS:-2}); do
    for tree in .base .; do
      tag=$([ "$tree" = . ] && echo new || echo base)
      (cd "$tree" && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_op.py --quick \
        --impls triton,op --no-compile --no-check --out "$out/op_${tag}_$round" \
        > "$out/op_${tag}_$round.log" 2>&1)
      [ -n "${PROLOGUE_KINDS-x}" ] && (cd "$tree" && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_prologue_op.py \
        --kinds ${PROLOGUE_KINDS:-rope_kv,norm_rope_kv} --tokens ${PROLOGUE_TOKENS:-64,4096} --rounds 2 \
        --out "$out/prologue_${tag}_$round" > "$out/prologue_${tag}_$round.log" 2>&1)
      echo "$tag round $round done"
    done
  done
}

train() {
  timeout ${TRAIN_SECONDS:-420} python3 benchmarks/bench_train.py --rounds ${BENCH_ROUNDS:-5} \
    --json "$out/train.json" > "$out/train.md" 2> "$out/train.log"
  echo "bench_train exit $?"
  cat "$out/train.md"
}

case $mode in
check) check ;;
train) train ;;
bench) bench ;;
all) check; bench ;;  # one call: the timings start once the tests and fuzzers are done
esac
