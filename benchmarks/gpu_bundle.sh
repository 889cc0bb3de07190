#!/usr/bin/env bash
# Copy a CUDA build's package libraries, _build_info.py and llama-bench into one folder, for
# `PREBUILT=DIR bash benchmarks/gpu_check.sh` on a GPU machine (build here, measure there):
#
#   CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DPYLLAMA_ERNIE_TOOLS=ON" \
#       pip wheel . --no-build-isolation --no-deps -C build-dir=build/cuda-sm90 -w dist
#   cmake --build build/cuda-sm90 --target llama-bench
#   bash benchmarks/gpu_bundle.sh build/cuda-sm90 .gpu
#
# The libraries are stripped of symbols (smaller to carry). The cffi module is built for the
# building Python; gpu_check.sh renames it for any CPython 3 (cffi modules use the limited API).
set -euo pipefail
BUILD=${1:?usage: gpu_bundle.sh BUILD_DIR DEST}
DEST=${2:?usage: gpu_bundle.sh BUILD_DIR DEST}
mkdir -p "$DEST"
find "$BUILD" -name '*.so' -not -path '*/CMakeFiles/*' -exec cp {} "$DEST"/ \;
cp "$BUILD/_build_info.py" "$DEST"/
[ -x "$BUILD/bin/llama-bench" ] && cp "$BUILD/bin/llama-bench" "$DEST"/
strip --strip-unneeded "$DEST"/*.so "$DEST"/llama-bench 2>/dev/null || true
du -sh "$DEST"
ls -la "$DEST"
