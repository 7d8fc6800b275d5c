#!/usr/bin/env bash
# One device call (H200 + 16 CPU cores), run from a staged copy of the repository root (docs/replication.md):
#   1. GPU: pretrain the CPU-size base (CPU_CFG, streamed documents from 10 worker processes, PRETRAIN_S seconds)
#      beside the GPU-size DeltaNet and LaCT runs (and GatedDeltaNet when Triton >= 3.7.1 is importable: fla 0.6.0
#      refuses gated backward passes on Hopper with older Triton);
#   2. CPU cores: every CPU-size arm and seed in parallel (nice 10, one thread each), while the GPU finishes;
#   3. GPU: the paper-setting recipe YAMLs on the GPU-size DeltaNet base, with their weight change.
# Everything comes back as tarballs under $OUT (no weights but the CPU-size base).
# Run 1 (2026-12-02) used CPU_CFG=configs/cpu.yaml and an earlier version of this script (git history).
set -u
T0=$(date +%s); LIMIT=${LIMIT:-540}; PRETRAIN_S=${PRETRAIN_S:-200}
C=experiments/replication/configs; CPU_CFG=${CPU_CFG:-$C/cpu_stream.yaml}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
. benchmarks/gpu_env.sh || exit 1
export REPLICATION_DATA=$PWD/shared_data HF_HUB_OFFLINE=1
export TRITON_CACHE_DIR=/tmp/triton_cache; mkdir -p $TRITON_CACHE_DIR; tar xzf triton_autotune.tgz -C $TRITON_CACHE_DIR 2>/dev/null
W=/tmp/rep; mkdir -p $W; R="python3 experiments/replication/replicate.py"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "cores: $(getconf _NPROCESSORS_ONLN)"
GPU_RUNS="delta_net lact"
python3 -c "import triton, sys; sys.exit(tuple(map(int, triton.__version__.split('.')[:3])) < (3, 7, 1))" && GPU_RUNS="$GPU_RUNS gated_deltanet"
for c in $GPU_RUNS; do
  OMP_NUM_THREADS=1 timeout $(( LIMIT - 60 )) $R --config $C/gpu_$c.yaml --out $W/gpu_$c --device cuda > $W/gpu_$c.log 2>&1 &
done
OMP_NUM_THREADS=2 timeout $(( PRETRAIN_S + 90 )) $R --config $CPU_CFG --out $W/cpu --phases pretrain --device cuda \
  --threads 2 --pretrain_workers 10 --pretrain_seconds $PRETRAIN_S > $W/cpu_pretrain.log 2>&1
tar czf $OUT/cpu_base.tgz -C $W/cpu pretrain; grep -v Warn $W/cpu_pretrain.log | tail -4
export OMP_NUM_THREADS=1
nice -n 10 $R --config $CPU_CFG --out $W/cpu --phases pretrain --device cpu > $W/cpu_base_eval.log 2>&1 &
for s in 0 1 2; do
  for arms in ntp refine_cosine,ntp_equal_time refine_exact; do
    nice -n 10 $R --config $CPU_CFG --out $W/cpu --phases midtrain --arms $arms --seeds $s > $W/cpu_mid_${arms%%,*}_$s.log 2>&1 &
  done
  for arm in sft nested_sft nested; do
    nice -n 10 $R --config $CPU_CFG --out $W/cpu --phases posttrain --arms $arm --seeds $s > $W/cpu_post_${arm}_$s.log 2>&1 &
  done
  for arm in none sft refine; do
    nice -n 10 $R --config $CPU_CFG --out $W/cpu --phases testtime --arms $arm --seeds $s > $W/cpu_tt_${arm}_$s.log 2>&1 &
  done
done
# the paper-setting YAMLs on the GPU-size DeltaNet as soon as its base exists (a few steps each; logs + weight change)
CK=$W/gpu_delta_net/pretrain/base
while [ ! -f $CK/result.json ] && [ $(left) -gt 150 ]; do sleep 5; done
if [ -f $CK/result.json ]; then
  D=$REPLICATION_DATA
  timeout 60 python3 recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml --model_name_or_path $CK \
    --dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --document_column prompt --max_steps 4 \
    --save_strategy no --output_dir $W/paper_mid > $W/paper_mid.log 2>&1
  python3 experiments/replication/weight_delta.py $CK $W/paper_mid > $W/paper_mid_delta.json 2>>$W/paper_mid.log
  timeout 60 python3 recipes/posttrain.py --config recipes/configs/posttrain_delta_net_1.3B.yaml --model_name_or_path $W/paper_mid \
    --dataset_name $D/ruler/ruler_hotpotqa_delta_net_4096_200_test.parquet \
    --eval_dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --eval_max_examples 8 --max_steps 4 \
    --max_train_examples 32 --long_examples truncate --save_strategy no --output_dir $W/paper_post > $W/paper_post.log 2>&1
  python3 experiments/replication/weight_delta.py $W/paper_mid $W/paper_post > $W/paper_post_delta.json 2>>$W/paper_post.log
  timeout 60 python3 recipes/testtime.py --config recipes/configs/testtime_delta_net_1.3B.yaml --model_name_or_path $W/paper_mid \
    --dataset_name $D/longbench/trec_16384.parquet,$D/longbench/samsum_16384.parquet --max_examples 8 \
    --output_dir $W/paper_tt > $W/paper_tt.log 2>&1
fi
while [ $(left) -gt 25 ] && [ -n "$(jobs -rp)" ]; do sleep 5; done
kill $(jobs -rp) 2>/dev/null
$R --config $CPU_CFG --out $W/cpu --phases report > $W/cpu_report.log 2>&1
for c in $GPU_RUNS; do $R --config $C/gpu_$c.yaml --out $W/gpu_$c --phases report > $W/gpu_${c}_report.log 2>&1; done
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude=tmp --exclude='*.json.tmp' \
  cpu $(for c in $GPU_RUNS; do echo gpu_$c; done) paper_mid paper_post paper_tt *.log *.json 2>/dev/null
ls -la $OUT; tail -n 5 $W/*report.log; echo "elapsed $(( $(date +%s) - T0 )) s"
