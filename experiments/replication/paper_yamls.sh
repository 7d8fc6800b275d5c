#!/usr/bin/env bash
# Issue 13 item 5: the paper-setting recipe YAMLs (recipes/configs/*_delta_net_1.3B.yaml) for a few steps on the
# small pretrained DeltaNet BASE (the run-3 base), lengths cut to the tiny model, on one GPU, the three recipes in
# parallel; the relative weight change of each training run (weight_delta.py). IMPL=fla converts BASE to fla's
# DeltaNet first (fla's Triton kernels: minutes of compile and autotune at new shapes); IMPL=reference runs our
# pure-PyTorch DeltaNet as saved. Needs benchmarks/gpu_env.sh sourced and $REPLICATION_DATA (the parquet samples).
#   IMPL=fla PAPER_LIMIT=1200 bash experiments/replication/paper_yamls.sh /tmp/paper/fla trl_refine/assets/tiny_retrieval_delta_net
set -u
W=${1:?work folder}; BASE=${2:?reference DeltaNet checkpoint}; LIMIT=${PAPER_LIMIT:-600}; IMPL=${IMPL:-fla}
mkdir -p "$W"; P=$W/progress.log; T0=${T0:-$(date +%s)}
note() { echo "=== $* $(date +%T) +$(( $(date +%s) - T0 ))s" >> "$P"; }
D=$REPLICATION_DATA
if [ "$IMPL" = fla ]; then
  CK=$W/fla_base; python3 -m trl_refine.models.delta_net.convert to-fla "$BASE" "$CK" > "$W/convert.log" 2>&1
else
  CK=$BASE
fi
note "start impl=$IMPL base=$CK"
run() {  # name, recipe, args...: SIGINT at the limit, so a stuck run leaves its Python stack in the log
  local name=$1 recipe=$2; shift 2
  timeout -k 30 -s INT "$LIMIT" python3 "recipes/$recipe.py" --config "recipes/configs/${recipe}_delta_net_1.3B.yaml" \
    --model_name_or_path "$CK" --output_dir "$W/$name" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  if [ "$recipe" != testtime ]; then
    python3 experiments/replication/weight_delta.py "$CK" "$W/$name" > "$W/${name}_delta.json" 2>> "$W/$name.log"
  fi
  note "$name rc=$rc"
}
run paper_mid midtrain --dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --document_column prompt \
  --max_steps 4 --nsp_min_length 2048 --nsp_max_length 8192 --save_strategy no &
run paper_post posttrain --dataset_name $D/ruler/ruler_hotpotqa_delta_net_4096_200_test.parquet \
  --eval_dataset_name $D/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --eval_max_examples 8 --max_steps 4 \
  --max_train_examples 32 --long_examples truncate --save_strategy no &
run paper_tt testtime --dataset_name $D/longbench/trec_16384.parquet,$D/longbench/samsum_16384.parquet \
  --max_examples 8 &
wait
note "paper yamls done"
