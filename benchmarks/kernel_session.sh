#!/usr/bin/env bash
# One background job on one H200 (issues 18, 13): first, alone (timings), the engines at 8K (NTP vs one-pass with the
# readout tokens vs with the fused boundary op, and the boundary op with the fused scan, nsp_fuse_scan: one document
# forward per step; fp32 master weights + bf16 autocast), for fla DeltaNet and then fla GatedDeltaNet (--model gated,
# every variant through our gated kernel); then the GPU tests of our kernels (the DeltaNet boundary
# kernel with the fused states_at op, the gated kernel swap inside fla's GatedDeltaNet, the gated boundary kernel:
# their fp32 cases check the one-stage launch of 2026-12-03), the boundary kernel's profile and the pretraining step
# of ~100M models (benchmarks/train_step_probe.py). Each step under its own limit; cold Triton compiles of new shapes
# cost 1-4 min each (2026-12-03: most of the device time). From a staged copy (docs/benchmarks.md: .whl, autotune):
#   setsid bash benchmarks/kernel_session.sh /tmp/k > /dev/null 2>&1 < /dev/null & bash benchmarks/gpu_poll.sh /tmp/k 520
# Poll later calls from the relocated copy (/tmp/stage_k/benchmarks/gpu_poll.sh): a call without carry removes the stage.
set -u
if [ -z "${RELOCATED:-}" ]; then
  rm -rf /tmp/stage_k && cp -r "$PWD" /tmp/stage_k && cd /tmp/stage_k || exit 1
  RELOCATED=1 exec bash benchmarks/kernel_session.sh "$@"
fi
R=${1:-/tmp/k}; mkdir -p "$R"
source benchmarks/gpu_env.sh > "$R/env.log" 2>&1 || { cat "$R/env.log" >> "$R/progress.log"; echo "=== done" >> "$R/progress.log"; exit 1; }
export TRITON_CACHE_DIR=/tmp/triton_cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; mkdir -p $TRITON_CACHE_DIR
for t in benchmarks/triton_autotune*.tgz triton_autotune*.tgz; do [ -f "$t" ] && tar xzf "$t" -C $TRITON_CACHE_DIR 2>/dev/null; done
nvidia-smi --query-gpu=name,memory.used,utilization.gpu,driver_version --format=csv >> "$R/env.log" 2>&1
step() { local name=$1 limit=$2; shift 2; local t0=$(date +%s); echo "=== $name start $(date +%T)" >> "$R/progress.log"
  timeout -k 10 -s INT "$limit" "$@" > "$R/$name.log" 2>&1; echo "=== $name rc=$? $(( $(date +%s) - t0 ))s" >> "$R/progress.log"; }
gpu_test() { local name=$1 limit=$2 file=$3; step "$name" "$limit" env TRL_REFINE_GPU_RESULTS="$R/$name.json" \
  python3 -m pytest -q -p no:cacheprovider "$file" -m gpu -rA --durations=0; }
step bench "${BENCH_LIMIT:-420}" python3 benchmarks/bench_engines.py --lengths 8192 --rollouts ${ROLLOUTS:-1 8} \
  --docs ${DOCS:-4 1} --precisions amp --variants ntp onepass_reuse onepass_boundary_reuse onepass_boundary_fused \
  --skip-generic-above 65536 --out "$R/bench_fla_8k_boundary.json"
step bench_gated "${BENCH_GATED_LIMIT:-360}" python3 benchmarks/bench_engines.py --model gated --lengths 8192 \
  --rollouts 8 --docs 4 1 --precisions amp --variants ntp onepass_reuse onepass_boundary_reuse onepass_boundary_fused \
  --skip-generic-above 65536 --out "$R/bench_gated_8k_boundary.json"
gpu_test boundary_kernel "${KERNEL_LIMIT:-300}" tests/gpu/test_gpu_boundary_kernel.py
gpu_test gated_patch "${PATCH_LIMIT:-300}" tests/gpu/test_gpu_fla_gated_patch.py
gpu_test gated_kernel "${GATED_LIMIT:-240}" tests/gpu/test_gpu_gated_boundary_kernel.py
step profile "${PROFILE_LIMIT:-150}" python3 benchmarks/profile_boundary_kernel.py --out "$R/profile_boundary.json"
step probe "${PROBE_LIMIT:-400}" python3 benchmarks/train_step_probe.py --out "$R/train_step_probe.json"
echo "=== done $(date +%T)" >> "$R/progress.log"
