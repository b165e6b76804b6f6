#!/usr/bin/env bash
# The GPU check: one short run on a fresh GPU machine that proves and measures the CUDA
# kernels, with everything it writes under $OUT (8 files, no folders):
#
#   summary.txt        the machine, then one line per step (exit code, seconds)
#   build.log          building rwkv_lib's extension with its CUDA kernels
#   rwkv_lm_build.log  building RWKV-LM's v4 kernel from the checkout (beside the above)
#   pytest.log         python -m pytest -m cuda (the CUDA tests, every kernel choice)
#   wkv_bench.log      benchmarks/wkv_gpu_bench.py, beside RWKV-LM's kernel
#   train_bench.log    benchmarks/train_bench.py, beside RWKV-LM's model
#   sanitizer.log      compute-sanitizer memcheck, racecheck and synccheck, if time is left
#   <device>.json      the results of both benchmarks (copy it to benchmarks/results/)
#
# Usage, from the repository root:  bash benchmarks/gpu_check.sh
# Environment: OUT (default ./gpu-check-out), RWKV_LM (default .peers/RWKV-LM, a folder
# holding RWKV-v4/), PYTHON (default python3), GPU_CHECK_SECONDS (default 450: every step
# gets what is left of it, so the whole run ends inside about 7.5 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=${GPU_CHECK_SECONDS:-450}
OUT=${OUT:-$PWD/gpu-check-out}
RWKV_LM=${RWKV_LM:-.peers/RWKV-LM}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# builds outside the repository; the benchmarks reuse what the first step builds
export RWKV_EXT_DIR=${RWKV_EXT_DIR:-/tmp/rwkv-gpu-check/ext}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/rwkv-gpu-check/torch-ext}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

left() { echo $(( DEADLINE - (SECONDS - START) )); }

# step NAME MAX_SECONDS LOG COMMAND...: run with the smaller of MAX_SECONDS and the time left
step() {
    local name=$1 max=$2 log=$3
    shift 3
    local budget
    budget=$(left)
    (( budget > max )) && budget=$max
    if (( budget < 20 )); then
        echo "$name: skipped, no time left" >> "$SUMMARY"
        return 0
    fi
    local t0=$SECONDS
    timeout -k 10 "$budget" "$@" >> "$log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $budget s)" >> "$SUMMARY"
    return 0
}

# --- the machine ---
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
    # torch finds the toolkit from CUDA_HOME or nvcc's folder; nvcc may be a wrapper
    # script elsewhere, so take the toolkit's root from nvcc itself (its TOP)
    top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    if [ -n "$top" ]; then
        CUDA_HOME=$(cd "$top" && pwd)
        export CUDA_HOME
    fi
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    echo "CUDA_HOME=${CUDA_HOME:-} nvcc: $(nvcc --version 2>&1 | grep release)"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
    echo "RWKV-LM checkout: $RWKV_LM ($(cat "$RWKV_LM/COMMIT" 2>/dev/null || echo 'no COMMIT file'))"
} >> "$SUMMARY" 2>&1
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))" 2>/dev/null)}
export TORCH_CUDA_ARCH_LIST
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" >> "$SUMMARY"

# --- 1. builds: RWKV-LM's kernel in the background, ours in the foreground ---
RWKV_BUILD_PID=
if [ -d "$RWKV_LM" ]; then
    timeout -k 10 240 "$PY" benchmarks/rwkv_lm.py --build "$RWKV_LM" > "$OUT/rwkv_lm_build.log" 2>&1 &
    RWKV_BUILD_PID=$!
else
    echo "no RWKV-LM checkout at $RWKV_LM: the benchmarks run without it" | tee "$OUT/rwkv_lm_build.log" >> "$SUMMARY"
fi
step "build" 240 "$OUT/build.log" "$PY" -c "
from rwkv_lib import extension
m = extension.load_wkv_extension(verbose=True)
print('has_cuda', m.has_cuda, extension._cuda_build_error or '')
raise SystemExit(0 if m.has_cuda else 1)"

# --- 2. the CUDA tests ---
PYTEST_TIMEOUT=
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_TIMEOUT="--timeout=90"
step "pytest -m cuda" 170 "$OUT/pytest.log" "$PY" -m pytest -m cuda -q -o addopts= \
    -p no:cacheprovider -rfEs --durations=15 $PYTEST_TIMEOUT tests/

# --- 3. the WKV benchmark, beside RWKV-LM's kernel ---
if [ -n "$RWKV_BUILD_PID" ]; then
    wait "$RWKV_BUILD_PID"
    echo "RWKV-LM kernel build: exit $?" >> "$SUMMARY"
fi
RWKV_ARGS=()
[ -d "$RWKV_LM" ] && RWKV_ARGS=(--rwkv-lm "$RWKV_LM")
step "wkv benchmark" 130 "$OUT/wkv_bench.log" "$PY" benchmarks/wkv_gpu_bench.py \
    "${RWKV_ARGS[@]}" --results-dir "$OUT"

# --- 4. the training-step benchmark, beside RWKV-LM's model ---
step "training benchmark" 100 "$OUT/train_bench.log" "$PY" benchmarks/train_bench.py \
    "${RWKV_ARGS[@]}" --results-dir "$OUT"

# --- 5. compute-sanitizer on every kernel (needs a runtime where it works) ---
if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck synccheck; do
        echo "=== $tool" >> "$OUT/sanitizer.log"
        step "compute-sanitizer $tool" 60 "$OUT/sanitizer.log" compute-sanitizer --tool "$tool" \
            --error-exitcode 1 "$PY" benchmarks/wkv_sanitize.py
    done
else
    echo "compute-sanitizer: not installed" >> "$SUMMARY"
fi

echo "total: $((SECONDS - START)) s" >> "$SUMMARY"
cat "$SUMMARY"
tail -n 30 "$OUT/pytest.log" 2> /dev/null
grep -A 40 '^| implementation' "$OUT/wkv_bench.log" 2> /dev/null | head -45
grep -A 6 '^| model' "$OUT/train_bench.log" 2> /dev/null
