#!/usr/bin/env bash
# The snapshot-engine speed work of docs/benchmarks.md ("Host overhead"), one call on a single H200
# (device kind nvidia-h200), foreground, every step under its own time limit so that what finished comes back:
#
#   JOBS="sync bench" bash benchmarks/perf_session.sh      # carry .whl (benchmarks/gpu_env.sh; docs/benchmarks.md)
#
# Jobs (run in the order given):
#   sync       benchmarks/sync_sites.py: where the host-GPU synchronisations of one step come from
#   profile    benchmarks/profile_snapshot.py: phase times, kernel launches, syncs of one step
#   bench      benchmarks/bench_engines.py at L = 8192, G = 8 and 1, 4 and 1 documents: NTP, snapshot, snapshot_reuse (VARIANTS=...)
#   bench16k   the same at L = 16384
#   parity     pytest tests/gpu -m gpu
# Results (JSON, logs) and the Triton autotune results (autotune_cache.tgz: a later machine only compiles) go to
# $OUT; the summary table is printed last.
set -u
R=${R:-/tmp/perf}
mkdir -p "$R"
OUT=${OUT:-$R/out}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh > "$R/env.log" 2>&1 || { cat "$R/env.log"; exit 1; }
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
# the Triton autotune results of the last H200 run (committed, a few KB): a fresh machine then only compiles the chosen
# kernel configurations instead of benchmarking every one (a cold start spent the whole first 10-minute call)
tar xzf benchmarks/triton_autotune_h200.tgz -C "$TRITON_CACHE_DIR"
[ -f .tcache/autotune_cache.tgz ] && tar xzf .tcache/autotune_cache.tgz -C "$TRITON_CACHE_DIR"
cat "$R/env.log"

pack() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/autotune_cache.tgz" -T -)
  tar czf "$OUT/logs.tgz" -C "$R" --exclude=out . 2>/dev/null
}
step() {  # name limit_seconds command...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name start $(date +%T)" | tee -a "$R/progress.log"
  timeout -k 10 -s INT "$limit" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$R/progress.log"
  tail -n 25 "$R/$name.log" | cut -c1-400
  pack
}
B="python3 benchmarks/bench_engines.py"
for job in ${JOBS:-sync bench}; do
  case $job in
    sync) step sync "${SYNC_LIMIT:-360}" python3 benchmarks/sync_sites.py --out "$OUT/sync_sites.json" ;;
    profile) step profile "${PROFILE_LIMIT:-200}" python3 benchmarks/profile_snapshot.py ${PROFILE_ARGS:-} --out "$OUT/profile.json" ;;
    bench) step bench "${BENCH_LIMIT:-300}" $B --lengths 8192 --rollouts 8 1 --docs 4 1 \
      --variants ${VARIANTS:-ntp snapshot} --out "$OUT/bench_8k.json" ;;
    bench16k) step bench16k "${BENCH_LIMIT:-300}" $B --lengths 16384 --rollouts 8 1 --docs 4 1 \
      --variants ${VARIANTS:-ntp snapshot} --out "$OUT/bench_16k.json" ;;
    parity) step parity "${PARITY_LIMIT:-200}" env TRL_REFINE_GPU_RESULTS="$OUT/gpu_parity.json" \
      python3 -m pytest -q -p no:cacheprovider tests/gpu -m gpu ;;
    *) echo "unknown job $job" ;;
  esac
done
cat "$R/progress.log"
