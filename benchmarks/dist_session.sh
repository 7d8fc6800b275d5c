#!/usr/bin/env bash
# The 2-GPU runs of docs/distributed.md (device kind nvidia-h200-x2), all in one call of under 10 minutes:
#   bash benchmarks/dist_session.sh /tmp/dist      (carry .whl, .whl_ds and .tcache; packs results into $OUT)
# 1. tests/dist_scripts/nsp_dist.py under DDP, FSDP2, ZeRO-2 and ZeRO-3 (2 processes each) and the two 1-process
#    references, all launched at once (separate ports; tiny models, so they share the GPUs). The records are checked
#    afterwards, anywhere, by tests/test_distributed.py with NSP_DIST_RECORDS / NSP_DIST_REFERENCE.
# 2. The user path at the same time (recipes/posttrain.py --quick under DDP and FSDP2, and): recipes/midtrain.py with a random fla DeltaNet (2 layers of the 1.3B width, bf16
#    autocast) under each backend for 3 steps with a checkpoint at step 2, then resumed from it to step 3.
set -u
R=${1:-/tmp/dist}
mkdir -p "$R"
source benchmarks/gpu_env.sh > "$R/env.log" 2>&1 || { cat "$R/env.log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages \
  .whl_ds/*.whl >> "$R/env.log" 2>&1
export TRITON_CACHE_DIR=/tmp/triton_cache NSP_DIST_DEVICE=cuda NSP_DIST_MODEL=fla
mkdir -p $TRITON_CACHE_DIR
[ -f .tcache/autotune_cache.tgz ] && tar xzf .tcache/autotune_cache.tgz -C $TRITON_CACHE_DIR
python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, torch.cuda.device_count(), 'GPUs')" \
  >> "$R/env.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$R/env.log" 2>&1

A=recipes/accelerate S=tests/dist_scripts/nsp_dist.py P=generic,snapshot,aligned,resume
G='{"gradient_accumulation_steps": 2}'
launch() {  # name port config num_processes script args...
  local name=$1 port=$2 cfg=$3 np=$4
  shift 4
  local t0=$(date +%s)
  timeout "${LIMIT:-330}" accelerate launch --config_file $A/$cfg --num_processes $np --main_process_port $port \
    "$@" > "$R/$name.log" 2>&1
  echo "=== $name rc=$? $(( $(date +%s) - t0 ))s" >> "$R/progress.log"
}
launch ddp 29501 multi_gpu.yaml 2 $S "$R/ddp" $P &
launch fsdp 29502 fsdp.yaml 2 $S "$R/fsdp" $P &
launch zero2 29503 deepspeed_zero2.yaml 2 $S "$R/zero2" $P &
NSP_DIST_ENGINE=generic launch zero3 29504 deepspeed_zero3.yaml 2 $S "$R/zero3" generic,aligned,resume &
NSP_DIST_OVERRIDES=$G launch one 29505 single_gpu.yaml 1 $S "$R/one" aligned &
NSP_DIST_ENGINE=generic NSP_DIST_OVERRIDES=$G launch one_generic 29506 single_gpu.yaml 1 $S "$R/one_generic" aligned &

user_path() {  # backend port extra-args...
  local c=$1 port=$2
  shift 2
  local M="recipes/midtrain.py --use_cpu false --tiny_model_type delta_net --tiny_hidden_size 2048 --tiny_heads 16
    --bf16 true --max_steps 3 --save_steps 2 --logging_steps 1 --seed 3"
  launch mt_$c $port $c.yaml 2 $M --output_dir /tmp/mt_$c "$@" \
  && launch mt_${c}_resume $port $c.yaml 2 $M --output_dir /tmp/mt_${c}_resume \
       --resume_from_checkpoint /tmp/mt_$c/checkpoint-2 "$@"
  mkdir -p "$R/user/$c"
  cp /tmp/mt_$c/checkpoint-*/trainer_state.json "$R/user/$c/" 2>/dev/null
  for d in /tmp/mt_$c/checkpoint-*; do [ -d "$d" ] && cp "$d/trainer_state.json" "$R/user/$c/$(basename $d).json"; done
  cp /tmp/mt_${c}_resume/checkpoint-3/trainer_state.json "$R/user/$c/resumed-checkpoint-3.json" 2>/dev/null
}
LIMIT=170 user_path multi_gpu 29511 &
LIMIT=170 user_path fsdp 29512 &
LIMIT=170 user_path deepspeed_zero2 29513 &
LIMIT=170 user_path deepspeed_zero3 29514 --nsp_engine generic &
PT="recipes/posttrain.py --quick --use_cpu false --tiny_model_type delta_net --tiny_hidden_size 2048 --tiny_heads 16
  --bf16 true"
post_train() {  # backend port
  LIMIT=330 launch pt_$1 $2 $1.yaml 2 $PT --output_dir /tmp/pt_$1
  mkdir -p "$R/user/pt_$1" && cp /tmp/pt_$1/posttrain_report.* "$R/user/pt_$1/" 2>/dev/null
}
post_train multi_gpu 29521 &
post_train fsdp 29522 &
wait
echo "=== done $(date +%T)" >> "$R/progress.log"
cat "$R/progress.log"
for f in "$R"/*.log; do echo "--- $f"; grep -E "Error|error:|Traceback" "$f" | grep -v Warning | head -5; done
tar czf "$OUT/dist_records.tgz" --exclude='checkpoint-*' -C "$R" .
ls -la "$OUT"
