#!/usr/bin/env bash
# The one prepared GPU check for a session that is lent the H200 (device tool; Python 3.12,
# torch 2.11 CUDA 13.0, nvcc 13.0, no network). Not runnable without a GPU; nothing here was run yet.
#
#     run(command="bash scripts/gpu_check.sh", timeout_s=540)
#
# 1. builds the CUDA extension through fxdrop's loader (ptxas report in $OUT/build.log),
# 2. checks every op on CUDA (compiled kernels, and the composite ones) against the float64 dense
#    reference: row/block/tile, dp 1-8, odd sizes, fp32/bf16/fp16, with/without bias, gradients,
# 3. training runs (bf16, AdamW, blocks of consecutive steps, ABBA) of the MLP 784 -> 8192x3 -> 10, batch 1024,
#    p = 0.5 and 0.7: fxdrop.convert (block; block + granularity="rows") vs standard dropout, eager and
#    torch.compile'd.
# Results: $OUT/gpu_check.json, $OUT/*.log (and benchmarks/results/gpu.json on the device copy).
set -uo pipefail
OUT="${OUT:-$(pwd)/benchmarks/results}"
mkdir -p "$OUT" benchmarks/results
PY="${PYTHON:-python3}"   # the device image's python3 is the one with torch (KINDS.md)
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}/usr/local/bin:$PATH"   # else cpp_extension finds nvcc on PATH
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FXDROP_NVCC_FLAGS="-Xptxas -v"
export FXDROP_CACHE="${FXDROP_CACHE:-/tmp/fxdrop-cache}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"   # the package from this checkout, no install

{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv; nvcc --version | tail -1;
  "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$OUT/machine.log"

start=$(date +%s)
if ! timeout 300 "$PY" -m fxdrop.build --variant cuda --verbose >"$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -30; tail -30 "$OUT/build.log"
  echo "CUDA BUILD FAILED after $(( $(date +%s) - start )) s: the checks below run on the composite kernels only"
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "Used [0-9]+ registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 > "$OUT/ptxas.txt" || true

timeout 420 "$PY" scripts/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
cp "$OUT/gpu_check.json" benchmarks/results/gpu.json 2>/dev/null || true
exit $status
