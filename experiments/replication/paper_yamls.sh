#!/usr/bin/env bash
# Issue 13 item 5: the paper-setting recipe YAMLs (recipes/configs/*_delta_net_1.3B.yaml) for a few steps on a small
# pretrained DeltaNet (the reference checkpoint BASE, converted to fla), lengths cut to the tiny model, on one GPU;
# the relative weight change of each run (weight_delta.py). Needs benchmarks/gpu_env.sh sourced and
# $REPLICATION_DATA (the parquet samples).
#   bash experiments/replication/paper_yamls.sh /tmp/paper /tmp/run3/tb/base
set -u
W=${1:?work folder}; BASE=${2:?reference DeltaNet checkpoint}; LIMIT=${PAPER_LIMIT:-200}
mkdir -p "$W"; P=$W/progress.log; T0=${T0:-$(date +%s)}
note() { echo "=== $* $(date +%T) +$(( $(date +%s) - T0 ))s" >> "$P"; }
CK=$W/fla_base; D=$REPLICATION_DATA
python3 -m trl_refine.models.delta_net.convert to-fla "$BASE" "$CK" > "$W/paper.log" 2>&1
timeout "$LIMIT" python3 recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml --model_name_or_path $CK \
  --dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --document_column prompt --max_steps 4 \
  --nsp_min_length 2048 --nsp_max_length 8192 --save_strategy no --output_dir $W/paper_mid > $W/paper_mid.log 2>&1; rc=$?
python3 experiments/replication/weight_delta.py $CK $W/paper_mid > $W/paper_mid_delta.json 2>> $W/paper_mid.log
note "paper midtrain rc=$rc"
timeout "$LIMIT" python3 recipes/posttrain.py --config recipes/configs/posttrain_delta_net_1.3B.yaml --model_name_or_path $CK \
  --dataset_name $D/ruler/ruler_hotpotqa_delta_net_4096_200_test.parquet \
  --eval_dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --eval_max_examples 8 --max_steps 4 \
  --max_train_examples 32 --long_examples truncate --save_strategy no --output_dir $W/paper_post > $W/paper_post.log 2>&1; rc=$?
python3 experiments/replication/weight_delta.py $CK $W/paper_post > $W/paper_post_delta.json 2>> $W/paper_post.log
note "paper posttrain rc=$rc"
timeout "$LIMIT" python3 recipes/testtime.py --config recipes/configs/testtime_delta_net_1.3B.yaml --model_name_or_path $CK \
  --dataset_name $D/longbench/trec_16384.parquet,$D/longbench/samsum_16384.parquet --max_examples 8 \
  --output_dir $W/paper_tt > $W/paper_tt.log 2>&1
note "paper testtime rc=$?"

