#!/usr/bin/env bash
# Every single-GPU measurement of docs/benchmarks.md in one background job (device kind nvidia-h200), in order of
# what matters most: LaCT-760M ReFINE step (issue 5), DeltaNet-1.3B engine benchmark (issue 3), GPU parity tests,
# then 1-GPU runs of the distributed scenarios (their results seed the Triton autotune cache carried to the 2-GPU
# machine). fla's Triton kernels autotune on first use; TRITON_CACHE_DIR keeps the results for every later process.
#
#   setsid bash benchmarks/gpu_session.sh /tmp/gpu > /dev/null 2>&1 < /dev/null &
#   bash benchmarks/gpu_poll.sh /tmp/gpu 550        # waits, prints progress, packs results into $OUT
set -u
R=${1:-/tmp/gpu}
mkdir -p "$R"
source benchmarks/gpu_env.sh > "$R/env.log" 2>&1 || { echo "env failed" >> "$R/progress.log"; exit 1; }
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache} NSP_DIST_DEVICE=cuda NSP_DIST_MODEL=fla
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$R/env.log" 2>&1
python3 -c "import pandas" 2>> "$R/env.log" && echo "pandas in image" >> "$R/env.log"

step() {
  local name=$1; shift
  echo "=== $name start $(date +%T)" >> "$R/progress.log"
  local t0=$(date +%s)
  "$@" > "$R/$name.log" 2>&1
  echo "=== $name rc=$? $(( $(date +%s) - t0 ))s" >> "$R/progress.log"
}
B=benchmarks/bench_engines.py
step lact python3 $B --model lact --lengths 8192 --rollouts 1 8 --docs 1 \
  --variants ntp snapshot snapshot_ckpt generic --skip-generic-above 65536 --out "$R/bench_lact_760M.json"
step delta_1p3b python3 $B --lengths 8192 16384 --rollouts 8 1 --docs 4 1 --skip-generic-above 524288 \
  --out "$R/bench_delta_net_1.3B.json"
step parity env TRL_REFINE_GPU_RESULTS="$R/gpu_parity.json" python3 -m pytest -q -p no:cacheprovider tests/gpu -m gpu
S=tests/dist_scripts/nsp_dist.py
G='{"gradient_accumulation_steps": 2}'
step dist_one env NSP_DIST_OVERRIDES="$G" accelerate launch --config_file recipes/accelerate/single_gpu.yaml \
  $S "$R/dist/one" aligned
step dist_one_generic env NSP_DIST_ENGINE=generic NSP_DIST_OVERRIDES="$G" accelerate launch \
  --config_file recipes/accelerate/single_gpu.yaml $S "$R/dist/one_generic" aligned
step midtrain_1gpu accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/midtrain.py \
  --use_cpu false --tiny_model_type delta_net --tiny_hidden_size 2048 --tiny_heads 16 --bf16 true --max_steps 2 \
  --logging_steps 1 --save_strategy no --output_dir /tmp/mt_1gpu
echo "=== done $(date +%T)" >> "$R/progress.log"
