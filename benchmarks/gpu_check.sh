#!/usr/bin/env bash
# GPU check: CUDA build, GPU parity, GPU speed against llama-bench. Run on a machine with an
# NVIDIA GPU, nvcc and the test dependencies available (torch==2.13.0 for the reference):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # CUDA_ARCH=90 to pin the architecture
#
# Writes OUT_DIR (default gpu-check/): gpu.txt, build.log, system-info.json, parity.txt,
# bench-*.json, llama-bench-*.json. NOT YET RUN ON A GPU: no device was available while it was
# written; expect to fix small things the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
ARCH=${CUDA_ARCH:-native}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

t0=$(date +%s)
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
    $PY -m pip install --no-build-isolation ".[test]" >"$OUT/build.log" 2>&1
echo "package build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"
$PY -m pyllama_ernie system-info >"$OUT/system-info.json"
$PY - <<'EOF'
from pyllama_ernie import offload
assert offload.gpu_devices(), "the CUDA build found no GPU"
EOF

# parity: GPU logits against the CPU and transformers, expert offload, image features
$PY -m pytest tests/test_gpu.py tests/test_offload.py -q -rs 2>&1 | tee "$OUT/parity.txt"

# speed: the bench-shape models, all layers on the GPU, then experts kept in CPU memory
$PY benchmarks/make_models.py --types F16,Q4_K_M
M=benchmarks/models
for q in F16 Q4_K_M; do
    $PY -m pyllama_ernie bench "$M/ernie-vl-bench-$q.gguf" --mmproj "$M/mmproj-ernie-vl-bench-F16.gguf" \
        -ngl -1 -r 3 --json -q >"$OUT/bench-vl-$q.json"
    $PY -m pyllama_ernie bench "$M/ernie-vl-bench-$q.gguf" -ngl -1 --cpu-moe -r 3 --json -q \
        >"$OUT/bench-vl-$q-cpu-moe.json"
done
nvidia-smi --query-gpu=memory.used --format=csv | tee -a "$OUT/gpu.txt"

# llama.cpp's own llama-bench from the same patched tree, CUDA on
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
    $PY benchmarks/build_tools.py --which patched --work build/bench-tools-cuda --jobs "$(nproc)"
LB=build/bench-tools-cuda/build-patched/bin/llama-bench
for q in F16 Q4_K_M; do
    $LB -m "$M/ernie-vl-bench-$q.gguf" -ngl 99 -p 512 -n 128 -r 3 -o json >"$OUT/llama-bench-vl-$q.json"
done
echo "total: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"
