#!/usr/bin/env bash
# GPU check: CUDA build, op coverage, GPU parity, GPU speed against llama-bench from the same tree.
# On a machine with an NVIDIA GPU, from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Steps (each bounded by `timeout`, so a slow step leaves the others' results):
#   1. build: CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DPYLLAMA_ERNIE_TOOLS=ON"
#      pip install, then llama-bench from the same build tree (same libraries);
#   2. ops: benchmarks/gpu_ops.py, every node of the text, decode, image-embedding and vision graphs
#      must run on the GPU (the token-embedding lookup excepted, by llama.cpp's design);
#   3. parity: tests/gpu/test_gpu.py and tests/unit/test_offload.py (logits against the CPU and transformers,
#      expert offload, image features, greedy tokens);
#   4. speed: the ERNIE-4.5-VL-28B-A3B-shaped models of benchmarks/make_a3b.py at two depths (the
#      difference is one MoE layer; report.md extrapolates to 28 layers), and the bench-shape model
#      (benchmarks/make_models.py), each all on the GPU and with the experts in CPU memory
#      (--cpu-moe), through `python -m pyllama_ernie bench` and llama-bench on the same files;
#   5. report: benchmarks/gpu_report.py writes report.md from the results.
#
# Environment: CUDA_ARCH (default native), PYTHON (python3), JOBS (build jobs, nproc), THREADS (CPU
# threads for both benchmarks, nproc), REPS (3), A3B_LAYERS (2,4), BENCH_TYPES ("F16 Q4_K_M": the
# bench-shape model's types), MODELS (build/gpu-check-models),
# PREBUILT=DIR: skip step 1 and use a build made elsewhere: DIR holds the package's libraries,
# _build_info.py and llama-bench (benchmarks/gpu_bundle.sh writes such a folder from a build tree).
# Needs torch, transformers, sentencepiece and tokenizers (parity tests, bench-shape model).
#
# Writes OUT_DIR (default gpu-check/): gpu.txt (device, system info, step times), build.log, ops.txt,
# parity.txt, bench.jsonl (ours, one JSON object per run, with a "label"), llama-bench.jsonl, report.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
ARCH=${CUDA_ARCH:-native}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
THREADS=${THREADS:-$(nproc)}
REPS=${REPS:-3}
A3B_LAYERS=${A3B_LAYERS:-2,4}
BENCH_TYPES=${BENCH_TYPES:-F16 Q4_K_M}
M=${MODELS:-build/gpu-check-models}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import this checkout's package
mkdir -p "$OUT" "$M"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/gpu.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"

# 1. build -------------------------------------------------------------------------------------------
if [ -n "${PREBUILT:-}" ]; then
    step "using the build in $PREBUILT"
    cp "$PREBUILT"/*.so "$PREBUILT"/_build_info.py pyllama_ernie/
    for f in pyllama_ernie/_cffi.cpython-*.so; do
        # cffi's modules use Python's limited API: any CPython 3 loads one under the abi3 name
        [ -e "$f" ] && mv "$f" pyllama_ernie/_cffi.abi3.so
    done
    LB=$PREBUILT/llama-bench
else
    step "building (CMAKE_CUDA_ARCHITECTURES=$ARCH, $JOBS jobs)"
    BUILD=build/gpu-check
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DPYLLAMA_ERNIE_TOOLS=ON" \
        $PY -m pip install --no-build-isolation --no-deps -C build-dir=$BUILD . >"$OUT/build.log" 2>&1 \
        || { step "build failed: see build.log"; tail -30 "$OUT/build.log"; exit 1; }
    cmake --build $BUILD --target llama-bench -j "$JOBS" >>"$OUT/build.log" 2>&1 || step "llama-bench build failed"
    LB=$BUILD/bin/llama-bench
    step "built"
fi
# the CUDA runtime libraries the GPU backend needs, where the loader does not find them by itself
for f in pyllama_ernie/libggml-cuda.so "$LB"; do
    for need in $(ldd "$f" 2>/dev/null | awk '/not found/ {print $1}'); do
        p=$(find /usr /opt -name "$need" 2>/dev/null | head -1)
        [ -n "$p" ] && export LD_LIBRARY_PATH="$(dirname "$p")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
            && step "found $need in $(dirname "$p")"
    done
done
$PY -m pyllama_ernie system-info >>"$OUT/gpu.txt" 2>&1
$PY - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt" || exit 1
import sys
from pyllama_ernie import offload
from pyllama_ernie._lib import c_str, lib
gpus = offload.gpu_devices()
if not gpus:
    sys.exit(f"the build found no GPU: {offload.no_gpu_reason()}")
print("GPUs:", [c_str(lib.ggml_backend_dev_description(d)) for d in gpus])
EOF

# 2. op coverage -------------------------------------------------------------------------------------
step "op coverage"
$PY - "$M" <<'EOF'
import sys
from pyllama_ernie.convert import synthetic
synthetic.write_tiny_gguf("ernie4_5-vl-moe", f"{sys.argv[1]}/tiny-vl.gguf")
synthetic.write_tiny_mmproj(f"{sys.argv[1]}/tiny-mmproj.gguf", n_embd_text=64)
EOF
timeout 120 $PY benchmarks/gpu_ops.py "$M/tiny-vl.gguf" --mmproj "$M/tiny-mmproj.gguf" >"$OUT/ops.txt" 2>&1
step "op coverage: exit $? ($(tail -1 "$OUT/ops.txt"))"

# 3. parity ------------------------------------------------------------------------------------------
step "parity"
timeout 300 $PY -m pytest tests/gpu/test_gpu.py tests/unit/test_offload.py -q -rs -p no:cacheprovider >"$OUT/parity.txt" 2>&1
step "parity: exit $? ($(tail -1 "$OUT/parity.txt"))"

# 4. speed -------------------------------------------------------------------------------------------
bench() {  # label, model, bench arguments...
    local label=$1 model=$2
    shift 2
    timeout 240 $PY -m pyllama_ernie bench "$model" -t "$THREADS" -r "$REPS" --json -q "$@" >"$OUT/.bench.json" 2>"$OUT/.bench.err" \
        && $PY -c 'import json, sys; print(json.dumps(dict(json.load(open(sys.argv[1])), label=sys.argv[2])))' \
            "$OUT/.bench.json" "$label" >>"$OUT/bench.jsonl" \
        || { step "bench $label failed:"; tail -5 "$OUT/.bench.err" | tee -a "$OUT/gpu.txt"; }
}
lbench() {  # llama-bench on the same file: all layers on the GPU, then the experts in CPU memory
    [ -x "$LB" ] || return
    local ncmoe
    for ncmoe in 0 99; do
        LD_LIBRARY_PATH="$(dirname "$LB")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 180 "$LB" -m "$1" -ngl 99 \
            -ncmoe $ncmoe -t "$THREADS" -p 512 -n 128 -r "$REPS" -o jsonl >>"$OUT/llama-bench.jsonl" 2>>"$OUT/gpu.txt" \
            || step "llama-bench $1 -ncmoe $ncmoe failed"
    done
}
bench_file() {  # LABEL GGUF MMPROJ: all layers on the GPU (with images), then experts in CPU memory, then llama-bench
    [ -e "$2" ] || return 0
    step "bench $1"
    bench "$1" "$2" -ngl -1 --mmproj "$3"
    bench "$1-cpu-moe" "$2" -ngl -1 --cpu-moe
    lbench "$2"
}
step "28B-A3B-shaped models (layers $A3B_LAYERS)"
timeout 300 $PY benchmarks/make_a3b.py --out "$M" --layers "$A3B_LAYERS" --types Q4_K_M -t "$JOBS" >>"$OUT/gpu.txt" 2>&1
for n in ${A3B_LAYERS//,/ }; do
    bench_file "a3b-L$n-Q4_K_M" "$M/ernie-vl-a3b-L$n-Q4_K_M.gguf" "$M/mmproj-ernie-vl-a3b-F16.gguf"
done
step "bench-shape model"
timeout 300 $PY benchmarks/make_models.py --out "$M" --kinds vl --types Q4_K_M -t "$JOBS" >>"$OUT/gpu.txt" 2>&1
for q in $BENCH_TYPES; do
    bench_file "vl-bench-$q" "$M/ernie-vl-bench-$q.gguf" "$M/mmproj-ernie-vl-bench-F16.gguf"
done

# 5. report ------------------------------------------------------------------------------------------
$PY benchmarks/gpu_report.py "$OUT" >"$OUT/report.md" 2>>"$OUT/gpu.txt"
rm -f "$OUT/.bench.json" "$OUT/.bench.err"
step "done"
cat "$OUT/report.md"
