#!/usr/bin/env bash
# One device call for issue 17: every fast-weight family on the snapshot engine vs the generic engine, and one step
# against an NTP step (tests/gpu/test_gpu_families.py). Writes $OUT/gpu_families.json (committed as
# benchmarks/results/gpu_families.json). Stage: this tree without .git, .whl/ from benchmarks/fetch_device_wheels.sh
# plus transformers 5.23 and regex wheels (the image has transformers 5.17, before the layered linear-attention
# cache). Triton autotune results: benchmarks/triton_autotune_h200_families.tgz (/work/shared/gpu's fla 0.6.0 set plus
# what the first run of this script tuned: GLA's forward kernels). Usage: bash benchmarks/families_gpu.sh [seconds]
set -u
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export TRITON_CACHE_DIR=/tmp/triton_cache TRL_REFINE_GPU_RESULTS=$OUT/gpu_families.json
mkdir -p "$TRITON_CACHE_DIR" && tar xzf benchmarks/triton_autotune_h200_families.tgz -C "$TRITON_CACHE_DIR"
timeout "${1:-300}" python3 -m pytest -q -m gpu tests/gpu/test_gpu_families.py -p no:cacheprovider -rA \
  --durations=0 >"$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
tail -40 "$OUT/pytest.log"
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/autotune_families.tgz" -T -)
python3 -c "import json,sys; d=json.load(open('$OUT/gpu_families.json')); [print(k, {a: (round(b,4) if isinstance(b,float) else b) for a,b in v.items()}) for k,v in d.items()]" 2>&1 | tail -20
