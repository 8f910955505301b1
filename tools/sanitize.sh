#!/usr/bin/env bash
# Builds vkern's extension with AddressSanitizer + UndefinedBehaviorSanitizer into its
# own virtual environment and build folder, runs the test suite under it, and exits
# non-zero on any sanitizer report (every report is fatal: the build uses
# -fno-sanitize-recover=all and the run sets halt_on_error / abort_on_error).
#
#   bash tools/sanitize.sh                 # the whole suite (CPU kernels; CUDA is not built)
#   bash tools/sanitize.sh tests/test_concurrency.py -x   # arguments go to pytest
#
# Why LD_PRELOAD holds both libasan and libstdc++: the python executable is not built
# with ASan, so the ASan runtime must be the first library loaded (else it refuses to
# start: "ASan runtime does not come first in initial library list"); and python does
# not link libstdc++, so without preloading it too, ASan's C++ interceptors
# (__cxa_throw and friends) find no real function to forward to and the first C++
# exception a kernel's argument check throws aborts the process.
# detect_leaks=0: the interpreter keeps objects alive at exit by design, which
# LeakSanitizer would report as leaks that are not the extension's.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VKERN_SAN_VENV:-.san-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q "torch==2.13.0" triton numpy pytest pytest-benchmark threadpoolctl hypothesis \
  scikit-build-core pybind11 ninja cmake
VKERN_CUDA=OFF VKERN_SANITIZE=address,undefined \
  python -m pip install -q --no-build-isolation --no-deps --force-reinstall -C build-dir=build/sanitize .

LIBASAN=$(g++ -print-file-name=libasan.so)
LIBSTDCXX=$(g++ -print-file-name=libstdc++.so)
[ -f "$LIBASAN" ] && [ -f "$LIBSTDCXX" ] || { echo "sanitize.sh: libasan/libstdc++ not found via g++" >&2; exit 2; }
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export VKERN_SANITIZED=1
LOG=$(mktemp -d)/sanitize.log
set +e
python -m pytest "${@:-tests}" -q -p no:cacheprovider 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: UndefinedBehaviorSanitizer" "$LOG"; then
  echo "sanitize.sh: sanitizer report(s) above" >&2
  exit 1
fi
exit "$rc"
