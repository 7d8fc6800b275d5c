#!/usr/bin/env bash
# One background job on one H200 (issue 18 / 12 / 17): NTP vs the snapshot engine vs the one-pass engine (both with the
# reused sampling pass) on fla DeltaNet 1.3B at 8K, fp32 master weights + bf16 autocast ("amp") and bf16 weights; the
# GPU parity suite; the families' GPU tests. Each step under its own time limit. Carry .whl (fetch_device_wheels.sh plus
# transformers 5.23 and regex) in the call. Autotune results: benchmarks/triton_autotune_h200.tgz (the union of every
# session's, 282 entries after run 3 on 2026-12-02).
#   run: setsid bash benchmarks/onepass_session.sh /tmp/w1 > /dev/null 2>&1 < /dev/null & bash benchmarks/gpu_poll.sh /tmp/w1 530
set -u
R=${1:-/tmp/w1}; mkdir -p "$R"
source benchmarks/gpu_env.sh > "$R/env.log" 2>&1 || { cat "$R/env.log" >> "$R/progress.log"; echo "=== done" >> "$R/progress.log"; exit 1; }
export TRITON_CACHE_DIR=/tmp/triton_cache; mkdir -p $TRITON_CACHE_DIR
tar xzf benchmarks/triton_autotune_h200.tgz -C $TRITON_CACHE_DIR
nvidia-smi --query-gpu=name,memory.used,utilization.gpu,driver_version --format=csv >> "$R/env.log" 2>&1
step() { local name=$1 limit=$2; shift 2; local t0=$(date +%s); echo "=== $name start $(date +%T)" >> "$R/progress.log"
  timeout -k 10 -s INT "$limit" "$@" > "$R/$name.log" 2>&1; echo "=== $name rc=$? $(( $(date +%s) - t0 ))s" >> "$R/progress.log"; }
step bench "${BENCH_LIMIT:-330}" python3 benchmarks/bench_engines.py --lengths 8192 --rollouts ${ROLLOUTS:-1 8} \
  --docs ${DOCS:-4 1} --precisions ${PRECISIONS:-amp weights} --variants ntp snapshot_reuse onepass_reuse \
  --skip-generic-above 65536 --out "$R/bench_fla_8k_onepass.json"
step parity "${PARITY_LIMIT:-200}" env TRL_REFINE_GPU_RESULTS="$R/gpu_parity.json" \
  python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_parity.py -m gpu -rA --durations=0
step families "${FAMILIES_LIMIT:-170}" env TRL_REFINE_GPU_RESULTS="$R/gpu_families.json" \
  python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_families.py -m gpu -rA --durations=0
echo "=== done $(date +%T)" >> "$R/progress.log"
