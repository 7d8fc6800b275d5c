#!/usr/bin/env bash
# Waits for benchmarks/gpu_session.sh (or up to $2 seconds), prints its progress, and packs what it wrote into $OUT:
# results.tgz (JSON + logs) and autotune_cache.tgz (Triton autotune results only: a few KB that spare the next
# machine the benchmarking of every kernel configuration; the kernels themselves recompile quickly).
R=${1:-/tmp/gpu}; MAX=${2:-550}; T=${TRITON_CACHE_DIR:-/tmp/triton_cache}
t0=$(date +%s)
while ! grep -q "=== done" "$R/progress.log" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$MAX" ]; do sleep 5; done
cat "$R/progress.log"
tail -n 4 "$R"/*.log | cut -c1-300
tar czf "$OUT/results.tgz" --exclude='checkpoint-*' --exclude='final' -C "$R" . 2>/dev/null
if [ -d "$T" ]; then
  (cd "$T" && find . -name '*.autotune.json' | tar czf "$OUT/autotune_cache.tgz" -T -)
  du -sh "$T" "$OUT"/*
fi
