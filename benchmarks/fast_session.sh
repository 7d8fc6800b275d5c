#!/usr/bin/env bash
# Issue 18's GPU call (one H200, foreground; carry the stage folder with .whl and the fla autotune cache):
# NTP vs the official procedure vs the snapshot engine (reused pass), bf16 weights and fp32 master + bf16 autocast,
# fla DeltaNet 1.3B at 8K; the one-pass engine vs the snapshot engine on the reference DeltaNet (the model that
# declares supports_state_positions); the one-pass GPU parity tests. Every step runs under its own time limit.
# VARIANTS / PRECISIONS override the fla step's variants (default: ntp snapshot_reuse official) and precisions.
set -u
R=${R:-/tmp/fast}
OUT=${OUT:-$R/out}
mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv > "$OUT/nvidia_smi_before.csv" 2>&1
nvidia-smi --query-compute-apps=pid,used_memory --format=csv >> "$OUT/nvidia_smi_before.csv" 2>&1
cat "$OUT/nvidia_smi_before.csv"
source benchmarks/gpu_env.sh > "$R/env.log" 2>&1 || { cat "$R/env.log"; exit 1; }
cat "$R/env.log"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
for t in triton_autotune_h200_fla060.tgz benchmarks/triton_autotune_h200.tgz; do [ -f "$t" ] && tar xzf "$t" -C "$TRITON_CACHE_DIR"; done
step() {  # name limit command...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name start $(date +%T)" | tee -a "$OUT/progress.log"
  timeout -k 10 -s INT "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$OUT/progress.log"
  grep -v Warning "$OUT/$name.log" | grep -E "^\||^phases|passed|failed|ERROR|Error" | cut -c1-600
}
B="python3 benchmarks/bench_engines.py"
step fla "${FLA_LIMIT:-330}" $B --lengths 8192 --rollouts 1 8 --docs 1 4 --precisions ${PRECISIONS:-weights amp} \
  --variants ${VARIANTS:-ntp snapshot_reuse official} --skip-generic-above 65536 --out "$OUT/bench_fla_8k.json"
step reference "${REF_LIMIT:-100}" $B --model reference --lengths 8192 --rollouts 8 --docs 1 --precisions weights \
  --variants ntp snapshot_reuse onepass_reuse --repeats 1 --out "$OUT/bench_reference_8k.json"
step parity "${PARITY_LIMIT:-60}" env TRL_REFINE_GPU_RESULTS="$OUT/gpu_parity_onepass.json" \
  python3 -m pytest -q -p no:cacheprovider tests/gpu -m gpu -k onepass
nvidia-smi --query-compute-apps=pid,used_memory --format=csv > "$OUT/nvidia_smi_after.csv" 2>&1
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/autotune_cache.tgz" -T -)
cat "$OUT/progress.log"
