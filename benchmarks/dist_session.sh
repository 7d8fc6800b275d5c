#!/usr/bin/env bash
# The 2-GPU runs of docs/distributed.md (device kind nvidia-h200-x2), in one call of under 10 minutes:
#   bash benchmarks/dist_session.sh /tmp/dist      (carry .whl, .whl_ds and .tcache; packs results into $OUT)
#   JOBS="fsdp one mt_multi_gpu" bash benchmarks/dist_session.sh /tmp/dist     (only these jobs)
# 1. tests/dist_scripts/nsp_dist.py under DDP (job ddp), FSDP2 (fsdp), ZeRO-2 (zero2) and ZeRO-3 (zero3), 2
#    processes each, and the two 1-process references (one, one_generic), all launched at once (separate ports; tiny
#    models, so they share the GPUs). The records are checked afterwards, anywhere, by tests/test_distributed.py with
#    NSP_DIST_RECORDS / NSP_DIST_REFERENCE.
# 2. The user path at the same time: recipes/midtrain.py with a random fla DeltaNet (2 layers of the 1.3B width, bf16
#    autocast) under each backend (mt_<config>) for 3 steps with a checkpoint at step 2, then resumed from it to
#    step 3; recipes/posttrain.py --quick with the same model (pt_<config>).
# A job still running at its limit gets SIGABRT first (PYTHONFAULTHANDLER=1: every process prints its Python stacks
# into the job's log), so a hang shows where it waits.
set -u
R=${1:-/tmp/dist}
mkdir -p "$R"
source benchmarks/gpu_env.sh > "$R/env.log" 2>&1 || { cat "$R/env.log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages \
  .whl_ds/*.whl >> "$R/env.log" 2>&1
export TRITON_CACHE_DIR=/tmp/triton_cache NSP_DIST_DEVICE=cuda NSP_DIST_MODEL=fla PYTHONFAULTHANDLER=1
ALL="ddp fsdp zero2 zero3 one one_generic mt_multi_gpu mt_fsdp mt_deepspeed_zero2 mt_deepspeed_zero3
  pt_multi_gpu pt_fsdp pt_deepspeed_zero2 pt_deepspeed_zero3"
JOBS=" ${JOBS:-$ALL} "
want() { [[ "$JOBS" == *" $1 "* ]]; }
mkdir -p $TRITON_CACHE_DIR
[ -f .tcache/autotune_cache.tgz ] && tar xzf .tcache/autotune_cache.tgz -C $TRITON_CACHE_DIR
python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, torch.cuda.device_count(), 'GPUs')" \
  >> "$R/env.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$R/env.log" 2>&1

A=recipes/accelerate S=tests/dist_scripts/nsp_dist.py P=generic,snapshot,aligned,resume
G='{"gradient_accumulation_steps": 2}'
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
launch() {  # name port config num_processes script args...
  local name=$1 port=$2 cfg=$3 np=$4 limit=${LIMIT:-330}
  shift 4
  local t0=$(date +%s)
  accelerate launch --config_file $A/$cfg --num_processes $np --main_process_port $port "$@" > "$R/$name.log" 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 2; done
  local rc
  if kill -0 $pid 2>/dev/null; then  # over the limit: stacks first, then stop
    kill -ABRT $(descendants $pid) 2>/dev/null
    sleep 5
    pkill -TERM -P $pid 2>/dev/null; kill $pid 2>/dev/null
    rc=124
  fi
  wait $pid; rc=${rc:-$?}
  echo "=== $name rc=$rc $(( $(date +%s) - t0 ))s" >> "$R/progress.log"
  return $rc
}
want ddp && launch ddp 29501 multi_gpu.yaml 2 $S "$R/ddp" $P &
want fsdp && launch fsdp 29502 fsdp.yaml 2 $S "$R/fsdp" $P &
want zero2 && launch zero2 29503 deepspeed_zero2.yaml 2 $S "$R/zero2" $P &
want zero3 && NSP_DIST_ENGINE=generic launch zero3 29504 deepspeed_zero3.yaml 2 $S "$R/zero3" generic,aligned,resume &
want one && NSP_DIST_OVERRIDES=$G launch one 29505 single_gpu.yaml 1 $S "$R/one" aligned &
want one_generic && NSP_DIST_ENGINE=generic NSP_DIST_OVERRIDES=$G \
  launch one_generic 29506 single_gpu.yaml 1 $S "$R/one_generic" aligned &

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
want mt_multi_gpu && LIMIT=${MT_LIMIT:-400} user_path multi_gpu 29511 &
want mt_fsdp && LIMIT=${MT_LIMIT:-400} user_path fsdp 29512 &
want mt_deepspeed_zero2 && LIMIT=${MT_LIMIT:-400} user_path deepspeed_zero2 29513 &
want mt_deepspeed_zero3 && LIMIT=${MT_LIMIT:-400} user_path deepspeed_zero3 29514 --nsp_engine generic &
PT="recipes/posttrain.py --quick --use_cpu false --tiny_model_type delta_net --tiny_hidden_size 2048 --tiny_heads 16
  --bf16 true"
post_train() {  # backend port extra-args...
  local c=$1 port=$2
  shift 2
  LIMIT=${PT_LIMIT:-400} launch pt_$c $port $c.yaml 2 $PT --output_dir /tmp/pt_$c "$@"
  mkdir -p "$R/user/pt_$c" && cp /tmp/pt_$c/posttrain_report.* "$R/user/pt_$c/" 2>/dev/null
}
want pt_multi_gpu && post_train multi_gpu 29521 &
want pt_fsdp && post_train fsdp 29522 &
want pt_deepspeed_zero2 && post_train deepspeed_zero2 29523 &
want pt_deepspeed_zero3 && post_train deepspeed_zero3 29524 --nsp_engine generic &
wait
echo "=== done $(date +%T)" >> "$R/progress.log"
cat "$R/progress.log"
for f in "$R"/*.log; do echo "--- $f"; grep -E "Error|error:|Traceback" "$f" | grep -v Warning | head -5; done
tar czf "$OUT/dist_records.tgz" --exclude='checkpoint-*' -C "$R" .
ls -la "$OUT"
