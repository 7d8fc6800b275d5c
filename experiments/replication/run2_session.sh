#!/usr/bin/env bash
# Run 2 in one background job on a GPU host (H200 + 16 CPU cores), from a staged copy of the repository root:
#   1. GPU: the tiny-base sweep (experiments/tiny_base/pretrain.py, one process per configuration, all on the same
#      stream of fresh documents, 2 document workers each) beside the fla-vs-reference parity test; then the rule
#      picks the base (out/tb/base, the reference DeltaNet, converted from fla);
#   2. CPU cores: every run-2 arm and seed from that base in parallel (nice 10, one thread each);
#   3. GPU, beside 2: the paper-setting recipe YAMLs for a few steps on the base (as an fla checkpoint), with the
#      weight change of each.
#   setsid bash experiments/replication/run2_session.sh /tmp/run2 > /dev/null 2>&1 < /dev/null &
#   bash experiments/replication/run2_poll.sh /tmp/run2 "sweep done" 540     # then again with "all done"
set -u
W=${1:-/tmp/run2}; SWEEP_MIN=${SWEEP_MIN:-4.5}; ARMS_S=${ARMS_S:-420}
CONFIGS=${CONFIGS:-h128l2 h128l4 h192l4 h128l4_w1 h128l4_w10}
mkdir -p "$W"; P=$W/progress.log; T0=$(date +%s)
note() { echo "=== $* $(date +%T) +$(( $(date +%s) - T0 ))s" >> "$P"; }
note start
. benchmarks/gpu_env.sh > "$W/env.log" 2>&1 || { note "env failed"; exit 1; }
export REPLICATION_DATA=$PWD/shared_data HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton_cache OMP_NUM_THREADS=1
mkdir -p $TRITON_CACHE_DIR; for t in triton_autotune*.tgz; do tar xzf "$t" -C $TRITON_CACHE_DIR 2>/dev/null; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$W/env.log"; echo "cores $(nproc)" >> "$W/env.log"
note env
TRL_REFINE_GPU_RESULTS=$W/gpu_parity.json python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_parity.py \
  -m gpu -k reference_delta_net_matches_fla > "$W/parity.log" 2>&1 &
for c in $CONFIGS; do
  python3 experiments/tiny_base/pretrain.py --device cuda --only "$c" --no_choose --workers 2 \
    --max_minutes "$SWEEP_MIN" --steps 5000 --ramp 0.3 --eval_every 300 --out "$W/tb" > "$W/tb_$c.log" 2>&1 &
done
wait
python3 experiments/tiny_base/pretrain.py --choose_only --out "$W/tb" > "$W/tb_choose.log" 2>&1
note "sweep done"
[ -f "$W/tb/base/config.json" ] || { note "no base; all done"; exit 1; }

# 2. every arm and seed on the CPU cores (the protocol of README.md; run 2 = configs/cpu_stream.yaml + this base)
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
CK=$W/fla_base; D=$REPLICATION_DATA
python3 -m trl_refine.models.delta_net.convert to-fla "$W/tb/base" "$CK" > "$W/paper.log" 2>&1
timeout 120 python3 recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml --model_name_or_path $CK \
  --dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --document_column prompt --max_steps 4 \
  --nsp_min_length 2048 --nsp_max_length 8192 --save_strategy no --output_dir $W/paper_mid > $W/paper_mid.log 2>&1; rc=$?
python3 experiments/replication/weight_delta.py $CK $W/paper_mid > $W/paper_mid_delta.json 2>> $W/paper_mid.log
note "paper midtrain rc=$rc"
timeout 120 python3 recipes/posttrain.py --config recipes/configs/posttrain_delta_net_1.3B.yaml --model_name_or_path $CK \
  --dataset_name $D/ruler/ruler_hotpotqa_delta_net_4096_200_test.parquet \
  --eval_dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --eval_max_examples 8 --max_steps 4 \
  --max_train_examples 32 --long_examples truncate --save_strategy no --output_dir $W/paper_post > $W/paper_post.log 2>&1; rc=$?
python3 experiments/replication/weight_delta.py $CK $W/paper_post > $W/paper_post_delta.json 2>> $W/paper_post.log
note "paper posttrain rc=$rc"
timeout 120 python3 recipes/testtime.py --config recipes/configs/testtime_delta_net_1.3B.yaml --model_name_or_path $CK \
  --dataset_name $D/longbench/trec_16384.parquet,$D/longbench/samsum_16384.parquet --max_examples 8 \
  --output_dir $W/paper_tt > $W/paper_tt.log 2>&1
note "paper testtime rc=$?"

while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt $(( ARMS_S + 420 )) ]; do sleep 5; done
kill $(jobs -rp) 2>/dev/null
$R --phases report > "$W/cpu_report.log" 2>&1
note "all done"
