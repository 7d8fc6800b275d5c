#!/usr/bin/env bash
# Run 3 in one background job on a GPU host (H200 + 16 CPU cores), from a staged copy of the repository root:
#   1. GPU: the tiny-base sweep (experiments/tiny_base/pretrain.py --sweep run3: the reference DeltaNet in fp32 on
#      CUDA, so no Triton compile or autotune; one process per configuration, all on the same stream of fresh
#      documents with the staged mix, 3 document workers each; the step budget calibrated to SWEEP_MIN), then the
#      validation rule picks the base (out/tb/base);
#   2. CPU cores: every run-3 arm and seed from that base in parallel (nice 10, one thread each);
#   3. GPU, beside 2: the paper-setting recipe YAMLs for a few steps on the base (converted to fla), with the
#      weight change of each.
#   4. GPU, alone at the end (BENCH=1): issue 18's benchmark rows.
#   setsid bash experiments/replication/run3_session.sh /tmp/run3 > /dev/null 2>&1 < /dev/null &
#   bash experiments/replication/run2_poll.sh /tmp/run3 "sweep done" 540     # then again with "all done"
set -u
W=${1:-/tmp/run3}; SWEEP_MIN=${SWEEP_MIN:-7}; ARMS_S=${ARMS_S:-420}
CONFIGS=${CONFIGS:-h64l2 h96l2 h128l2 h128l4}
mkdir -p "$W"; P=$W/progress.log; T0=$(date +%s)
note() { echo "=== $* $(date +%T) +$(( $(date +%s) - T0 ))s" >> "$P"; }
note start
. benchmarks/gpu_env.sh > "$W/env.log" 2>&1 || { note "env failed"; exit 1; }
export REPLICATION_DATA=$PWD/shared_data HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton_cache OMP_NUM_THREADS=1
mkdir -p $TRITON_CACHE_DIR; for t in triton_autotune*.tgz; do tar xzf "$t" -C $TRITON_CACHE_DIR 2>/dev/null; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$W/env.log"; echo "cores $(nproc)" >> "$W/env.log"
note env
for c in $CONFIGS; do
  python3 experiments/tiny_base/pretrain.py --device cuda --impl reference --sweep run3 --only "$c" --no_choose \
    --workers 3 --mix staged --stage_a 0.25 --steps 0 --ramp 0.4 --max_minutes "$SWEEP_MIN" --eval_every 500 \
    --out "$W/tb" > "$W/tb_$c.log" 2>&1 &
done
wait
python3 experiments/tiny_base/pretrain.py --choose_only --out "$W/tb" > "$W/tb_choose.log" 2>&1
note "sweep done"
[ -f "$W/tb/base/config.json" ] || { note "no base; all done"; exit 1; }

# 2. every arm and seed on the CPU cores (the protocol of README.md; run 2 = configs/cpu_stream.yaml + this base, as run 2 planned)
CFG=experiments/replication/configs/cpu_stream.yaml; R="python3 experiments/replication/replicate.py --config $CFG --out $W/cpu"
mkdir -p "$W/cpu/pretrain"; cp -r "$W/tb/base" "$W/cpu/pretrain/base"
nice -n 10 $R --phases pretrain --base "$W/tb/base" > "$W/cpu_base_eval.log" 2>&1 &
for s in 0 1 2; do
  for arms in ntp refine_cosine,ntp_equal_time refine_exact; do
    nice -n 10 $R --phases midtrain --arms $arms --seeds $s > "$W/cpu_mid_${arms%%,*}_$s.log" 2>&1 &
  done
  for arm in sft nested_sft nested; do
    nice -n 10 $R --phases posttrain --arms $arm --seeds $s > "$W/cpu_post_${arm}_$s.log" 2>&1 &
  done
  for arm in none sft refine; do
    nice -n 10 $R --phases testtime --arms $arm --seeds $s > "$W/cpu_tt_${arm}_$s.log" 2>&1 &
  done
done
note "arms started"

# 3. the paper-setting YAMLs on the GPU, a few steps each, lengths cut to the tiny model (issue 13 item 5)
bash experiments/replication/paper_yamls.sh "$W" "$W/tb/base"
note "paper yamls done"

while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt $(( ARMS_S + 420 )) ]; do sleep 5; done
kill $(jobs -rp) 2>/dev/null
$R --phases report > "$W/cpu_report.log" 2>&1
note "arms done"

# 4. issue 18's remaining benchmark rows, alone on the machine (host-bound timings): NTP vs snapshot vs one-pass
if [ "${BENCH:-1}" = 1 ]; then
  tar xzf benchmarks/triton_autotune_h200.tgz -C $TRITON_CACHE_DIR 2>/dev/null
  timeout -k 10 -s INT "${BENCH_LIMIT:-330}" python3 benchmarks/bench_engines.py --lengths 8192 16384 \
    --rollouts 1 8 --docs 4 1 --precisions amp --variants ntp snapshot_reuse onepass_reuse \
    --skip-generic-above 65536 --out "$W/bench_onepass_rows.json" > "$W/bench.log" 2>&1
  note "bench rc=$?"
fi
note "all done"
