#!/usr/bin/env bash
# GPU size, run 2 (issue 13 item 2) plus two other issues' GPU rows, as ONE background job on one H200 + 16 CPU
# cores, from a staged copy of the repository root (.whl, shared_data, autotune caches; docs/benchmarks.md):
#   0. the boundary-state kernel's GPU test (issue 18; KERNEL=0 skips it);
#   1. alone (host-bound timings): LaCT-760M, NTP vs snapshot vs one-pass at 8K (issue 18);
#   2. side by side: the fla families' GPU test for rwkv7, hgrn2, kda and gated_deltaproduct with gradients
#      (issue 17), and the pretraining of two ~104M DeltaNets (experiments/tiny_base/pretrain.py --sweep gpu100m,
#      reference kernels in fp32 + TF32: no Triton compile), the validation rule choosing the base;
#   3. every arm of configs/gpu_size_delta_net.yaml from that base, one process per (phase, arm, seed), on the GPU.
# Start it detached (the device ends a call's process group when the call returns) and poll:
#   setsid bash experiments/replication/gpu_size_session.sh /tmp/gs > /dev/null 2>&1 < /dev/null &
#   BASE=0 bash experiments/replication/run2_poll.sh /tmp/gs "all done" 540
# A later device call replaces the staged folder (carry), which breaks a job running from it: the job first copies
# the stage to /tmp and runs from there. PRETRAIN=0 resumes a job whose pretraining processes are still running
# (waits for them, then chooses the base and runs the arms); SEEDS and POST_ARMS narrow the arms.
set -u
if [ -z "${RELOCATED:-}" ]; then
  rm -rf /tmp/stage_gs && cp -r "$PWD" /tmp/stage_gs && cd /tmp/stage_gs || exit 1
  RELOCATED=1 exec bash experiments/replication/gpu_size_session.sh "$@"
fi
W=${1:-/tmp/gs}; PRETRAIN_MIN=${PRETRAIN_MIN:-6}; ARMS_S=${ARMS_S:-480}
CFG=experiments/replication/configs/gpu_size_delta_net.yaml
mkdir -p "$W"; P=$W/progress.log; T0=$(date +%s)
note() { echo "=== $* $(date +%T) +$(( $(date +%s) - T0 ))s" >> "$P"; }
note start
. benchmarks/gpu_env.sh > "$W/env.log" 2>&1 || { note "env failed; all done"; exit 1; }
export REPLICATION_DATA=$PWD/shared_data HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton_cache OMP_NUM_THREADS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p $TRITON_CACHE_DIR; for t in benchmarks/triton_autotune*.tgz triton_autotune*.tgz; do
  [ -f "$t" ] && tar xzf "$t" -C $TRITON_CACHE_DIR 2>/dev/null; done
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader >> "$W/env.log"; echo "cores $(nproc)" >> "$W/env.log"
note env

if [ "${KERNEL:-1}" = 1 ]; then  # issue 18: the boundary-state kernel's GPU parity and timing
  timeout -k 10 -s INT "${KERNEL_LIMIT:-240}" env TRL_REFINE_GPU_RESULTS="$W/gpu_boundary_kernel.json" \
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_boundary_kernel.py -m gpu -rA --durations=0 \
    > "$W/boundary_kernel.log" 2>&1
  note "boundary kernel rc=$?"
fi

if [ "${LACT:-1}" = 1 ]; then
  timeout -k 10 -s INT "${LACT_LIMIT:-200}" python3 benchmarks/bench_engines.py --model lact --lengths 8192 \
    --rollouts 1 8 --docs 1 --precisions amp --variants ntp snapshot_reuse onepass_reuse \
    --out "$W/bench_lact_onepass.json" > "$W/bench_lact.log" 2>&1
  note "lact bench rc=$?"
fi

if [ "${FAMILIES:-1}" = 1 ]; then
  ( timeout -k 10 -s INT "${FAMILIES_LIMIT:-900}" env TRL_REFINE_GPU_RESULTS="$W/gpu_families_fla.json" \
      python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_families.py -m gpu -rA --durations=0 \
      -k "fla_family and (rwkv7 or hgrn2 or kda or gated_deltaproduct)" > "$W/families.log" 2>&1
    note "families rc=$?" ) &
fi

PIDS=""
[ "${PRETRAIN:-1}" = 1 ] || CONFIGS=" "
for c in ${CONFIGS:-h1024l8 h1024l8_lr5e-4}; do
  python3 experiments/tiny_base/pretrain.py --device cuda --impl reference --tf32 --sweep gpu100m --only "$c" \
    --no_choose --workers 3 --mix staged --stage_a 0.25 --steps 0 --ramp 0.4 --max_minutes "$PRETRAIN_MIN" \
    --eval_every 500 --out "$W/tb" > "$W/tb_$c.log" 2>&1 &
  PIDS="$PIDS $!"
done
wait $PIDS
while pgrep -f "tiny_base/pretrain.py" > /dev/null; do sleep 5; done  # PRETRAIN=0: an earlier job's
python3 experiments/tiny_base/pretrain.py --choose_only --out "$W/tb" > "$W/tb_choose.log" 2>&1
note "sweep done"
[ -f "$W/tb/base/config.json" ] || { note "no base; all done"; exit 1; }

R="python3 experiments/replication/replicate.py --config $CFG --out $W/gs --device cuda --base $W/tb/base"
$R --phases pretrain > "$W/gs_base.log" 2>&1
note "base scored rc=$?"
ARM_PIDS=""
for s in ${SEEDS:-0 1 2 3 4}; do
  for arm in ntp refine_cosine; do
    $R --phases midtrain --arms $arm --seeds $s > "$W/gs_mid_${arm}_$s.log" 2>&1 & ARM_PIDS="$ARM_PIDS $!"
  done
  for arm in ${POST_ARMS-sft nested}; do
    $R --phases posttrain --arms $arm --seeds $s > "$W/gs_post_${arm}_$s.log" 2>&1 & ARM_PIDS="$ARM_PIDS $!"
  done
done
note "arms started"
t1=$(date +%s)
alive() { for p in $ARM_PIDS; do kill -0 "$p" 2>/dev/null && echo "$p"; done; }
while [ -n "$(alive)" ] && [ $(( $(date +%s) - t1 )) -lt "$ARMS_S" ]; do sleep 5; done
kill $ARM_PIDS 2>/dev/null
$R --phases report > "$W/gs_report.log" 2>&1
note "arms done"
wait
note "all done"
