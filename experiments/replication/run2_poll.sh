#!/usr/bin/env bash
# Waits (at most $3 seconds) until run2_session.sh's progress log shows the marker $2, then packs what it wrote into
# $OUT: results.tgz (JSON, logs, reports; no weights), base.tgz (the chosen base and every configuration's result:
# reference DeltaNets of a few MB; BASE=0 leaves them, e.g. the GPU size) and autotune_cache.tgz (Triton autotune results, for the next machine).
W=${1:-/tmp/run2}; MARK=${2:-all done}; MAX=${3:-540}; t0=$(date +%s)
while ! grep -q "=== $MARK" "$W/progress.log" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$MAX" ]; do sleep 5; done
cat "$W/progress.log"
for f in "$W"/tb_*.log; do echo "--- $f"; grep -E " V |chosen|Error|error" "$f" | cut -c1-260 | tail -n 6; done
tail -n 3 "$W/parity.log" 2>/dev/null
ls "$W"/cpu/*/* -d 2>/dev/null | head -40
tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude=tmp --exclude='*.tmp' --exclude=fla_base \
  --exclude='paper_*/checkpoint-*' -C "$W" . 2>/dev/null
[ "${BASE:-1}" = 1 ] && [ -d "$W/tb/configs" ] && tar czf "$OUT/base.tgz" -C "$W/tb" base configs  # BASE=0: large bases stay
T=${TRITON_CACHE_DIR:-/tmp/triton_cache}
[ -d "$T" ] && (cd "$T" && find . -name '*.autotune.json' | tar czf "$OUT/autotune_cache.tgz" -T -)
du -sh "$OUT"/*; echo "poll waited $(( $(date +%s) - t0 )) s"
