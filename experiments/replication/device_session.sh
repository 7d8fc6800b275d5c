#!/usr/bin/env bash
# One device call (H200 + 16 CPU cores), run from the staged repository root:
#   GPU: pretrain the CPU-size base (reference DeltaNet), the GPU-size DeltaNet / GatedDeltaNet / LaCT runs, and the
#        paper-setting recipe YAMLs on the GPU-size DeltaNet; CPU cores: every CPU-size arm and seed in parallel.
# Everything comes back as tarballs under $OUT (checkpoints of the GPU-size models stay there).
set -u
T0=$(date +%s); LIMIT=${LIMIT:-520}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
. benchmarks/gpu_env.sh || exit 1
export REPLICATION_DATA=$PWD/shared_data HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export TRITON_CACHE_DIR=/tmp/triton_cache; mkdir -p $TRITON_CACHE_DIR; tar xzf triton_autotune.tgz -C $TRITON_CACHE_DIR 2>/dev/null
W=/tmp/rep; mkdir -p $W; R="python3 experiments/replication/replicate.py"; C=experiments/replication/configs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
for c in delta_net gated_deltanet lact; do
  timeout $(( LIMIT - 40 )) $R --config $C/gpu_$c.yaml --out $W/gpu_$c --device cuda --threads 1 > $W/gpu_$c.log 2>&1 &
done
timeout 200 $R --config $C/cpu.yaml --out $W/cpu --phases pretrain --device cuda --threads 2 > $W/cpu_pretrain.log 2>&1
tar czf $OUT/cpu_base.tgz -C $W/cpu pretrain; tail -3 $W/cpu_pretrain.log
pids=()
$R --config $C/cpu.yaml --out $W/cpu --phases pretrain --device cpu > $W/cpu_base_eval.log 2>&1 & pids+=($!)
for s in 0 1 2; do
  for arms in ntp refine_cosine,ntp_equal_time refine_exact; do
    nice -n 10 $R --config $C/cpu.yaml --out $W/cpu --phases midtrain --arms $arms --seeds $s --device cpu > $W/cpu_mid_${arms%%,*}_$s.log 2>&1 & pids+=($!)
  done
  for arm in sft nested_sft nested; do
    nice -n 10 $R --config $C/cpu.yaml --out $W/cpu --phases posttrain --arms $arm --seeds $s --device cpu > $W/cpu_post_${arm}_$s.log 2>&1 & pids+=($!)
  done
  for arm in none sft refine; do
    nice -n 10 $R --config $C/cpu.yaml --out $W/cpu --phases testtime --arms $arm --seeds $s --device cpu > $W/cpu_tt_${arm}_$s.log 2>&1 & pids+=($!)
  done
done
# paper-setting YAMLs on the GPU-size DeltaNet as soon as its base exists
CK=$W/gpu_delta_net/pretrain/base
while [ ! -f $CK/result.json ] && [ $(left) -gt 200 ]; do sleep 5; done
if [ -f $CK/result.json ]; then
  D=$REPLICATION_DATA
  timeout 90 python3 recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml --model_name_or_path $CK \
    --dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --document_column prompt --max_steps 4 \
    --save_strategy no --output_dir $W/paper_mid > $W/paper_mid.log 2>&1
  python3 experiments/replication/weight_delta.py $CK $W/paper_mid > $W/paper_mid_delta.json 2>>$W/paper_mid.log
  timeout 90 python3 recipes/posttrain.py --config recipes/configs/posttrain_delta_net_1.3B.yaml --model_name_or_path $W/paper_mid \
    --dataset_name $D/ruler/ruler_hotpotqa_delta_net_4096_200_test.parquet \
    --eval_dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --eval_max_examples 8 --max_steps 4 \
    --max_train_examples 32 --long_examples truncate --save_strategy no --output_dir $W/paper_post > $W/paper_post.log 2>&1
  python3 experiments/replication/weight_delta.py $W/paper_mid $W/paper_post > $W/paper_post_delta.json 2>>$W/paper_post.log
  timeout 90 python3 recipes/testtime.py --config recipes/configs/testtime_delta_net_1.3B.yaml --model_name_or_path $W/paper_mid \
    --dataset_name $D/longbench/trec_16384.parquet,$D/longbench/samsum_16384.parquet --max_examples 8 \
    --output_dir $W/paper_tt > $W/paper_tt.log 2>&1
fi
# wait for the CPU arms, then the report (whatever finished)
while [ $(left) -gt 25 ] && [ -n "$(jobs -rp)" ]; do sleep 5; done
kill $(jobs -rp) 2>/dev/null
$R --config $C/cpu.yaml --out $W/cpu --phases report > $W/cpu_report.log 2>&1
for d in gpu_delta_net gpu_gated_deltanet gpu_lact; do $R --config $C/$d.yaml --out $W/$d --phases report > $W/${d}_report.log 2>&1; done
cd $W && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude=tmp --exclude='*/pretrain/base/*.json.tmp' \
  cpu gpu_delta_net gpu_gated_deltanet gpu_lact paper_mid paper_post paper_tt *.log *.json 2>/dev/null
ls -la $OUT; tail -5 $W/*report.log; echo "elapsed $(( $(date +%s) - T0 )) s"
