#!/usr/bin/env bash
# The one command to run on a GPU node (no package registry there; it has
# torch, triton, pybind11, scikit-build-core, cmake, ninja and nvcc):
#   build with the CUDA kernels required, run the test suite on the GPU
#   (CUDA and Triton for real; tests/test_maxsim_grad.py checks MaxSim's fused backward kernels,
#   kernels/maxsim_grad.py and csrc/cuda/maxsim_grad.cu, against the reference and float64),
#   benchmarks/gpu_checks.py (CUDA-graph capture of a decode step, > 2**31-element tensors,
#   grids past 65,535, tensors on a second GPU, MaxSim gradients at the training shape and the
#   training-step benchmark's GPU shape: vkern cuda/triton vs PyLate's torch path, time and
#   torch.cuda.max_memory_allocated, BENCH lines), int8 MaxSim and MUVERA encodings against the
#   reference / cpu backend with timing lines, then the bench, writing everything to $OUT.
# Budget: under 10 minutes (one device call): the bench runs --quick (every op,
# CUDA/Triton rows included). `benchmarks/gpu_check.sh full` also runs the
# full-size bench afterwards (a second call on the same warm machine, where the
# build is already installed: `SKIP_BUILD=1 SKIP_TESTS=1 benchmarks/gpu_check.sh full`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
status=0
{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
head -15 "$OUT/nvidia-smi.txt"

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "== build (VKERN_CUDA=ON)"
  start=$(date +%s)
  if ! VKERN_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python -m pip install --no-build-isolation --no-deps \
        --force-reinstall -v . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  echo "built in $(( $(date +%s) - start )) s"
fi
python -m vkern info | tee "$OUT/info.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests"
  timeout 270 python -m pytest tests -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" \
    --deselect tests/test_cli.py::test_bench_quick_writes_ratios 2>&1 | tee "$OUT/tests.txt" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== GPU-only checks: CUDA-graph decode, > 2**31-element tensors, big grids, multi-GPU guards, MaxSim backward + training step, int8 / MUVERA"
timeout 240 python benchmarks/gpu_checks.py 2>&1 | tee "$OUT/gpu_checks.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== bench --quick (every op)"
timeout 150 python -m vkern bench --quick --threads 16 --json "$OUT/bench_quick.json" 2>&1 \
  | tee "$OUT/bench_quick.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "${1:-}" = "full" ]; then
  echo "== bench (full size)"
  timeout 420 python -m vkern bench --threads 16 --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 \
    | tee "$OUT/bench.txt" | tail -60
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
