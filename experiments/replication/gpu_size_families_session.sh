#!/usr/bin/env bash
# GPU size, run 5 (issue 13; pre-registered in docs/replication.md "GPU size, run 5"): fla GatedDeltaNet (~112M,
# through trl_refine's gated kernel) and LaCT (~110M, ours), as ONE background job on one H200 + 16 CPU cores, from a
# staged copy of the repository root (.whl, shared_data, autotune caches; docs/benchmarks.md):
#   0. beside step 1 (GATED_TEST=0 skips it): the gated kernel swap's GPU test (tests/gpu/test_gpu_fla_gated_patch.py,
#      a tiny model, never run before), capped at 150 s;
#   1. side by side, one process per family: pretraining from scratch (experiments/tiny_base/pretrain.py --sweep
#      gpu100m_gated / gpu100m_lact, run 3's recipe, bf16 autocast + fp32 weights), time-capped at PRETRAIN_MIN;
#      then each family's validation rule chooses its base;
#   2. side by side: each base scored on the held-out grid (replicate.py --phases pretrain);
#   3. the arms of every family whose base's held-out NIAH average is strictly inside (0, 100) (pre-registered; a
#      base at 0 or 100 leaves nothing to compare), one process per (phase, arm, seed): first every mid-training arm
#      (ntp, refine_cosine) of both families, then every post-training arm (sft, nested) once those are done (or
#      POST_AT seconds after the arms started), all cut at ARMS_S seconds after the arms started; then the reports.
# Planned wall time with the defaults: ~0.5 min env + ~8 min pretraining (6 capped + start, calibration, last check,
# save) + ~1.5 min scoring + 6.7 min arms (ARMS_S=400) + reports: ~17 min.
# Start it detached (the device ends a call's process group when the call returns) and poll:
#   setsid bash experiments/replication/gpu_size_families_session.sh /tmp/gsf > /dev/null 2>&1 < /dev/null &
#   BASE=0 bash experiments/replication/run2_poll.sh /tmp/gsf "all done" 540
# Knobs: RUN ("gated lact": the families), PRETRAIN_MIN (6), STEPS (0: calibrate the step budget to PRETRAIN_MIN;
# N: a fixed budget, e.g. from a timed step), BATCH (32), MICRO_GATED (0) / MICRO_LACT (16): backward in slices
# of that many rows, the same gradient (LaCT's activations at batch 32 x 1200, measured on CPU in fp32: ~11 GB a
# layer), WORKERS (3 data workers per process), EVAL_EVERY (250),
# GATED_CONFIGS / LACT_CONFIGS (the sweep entries, comma-separated; default the lr-1e-3 one), SEEDS ("0 1 2"),
# MID_ARMS ("ntp refine_cosine"), POST_ARMS ("sft nested"), ARMS_S (400), POST_AT (ARMS_S/2), PRETRAIN=0 (the bases
# exist under $W/tb_<family>/base: skip step 1), GATE=0 (arms whatever the base scores: the smoke), DEVICE (cuda; cpu for the CPU smoke, with TRITON_INTERPRET=1 and
# the smoke sweeps: SWEEP_GATED / SWEEP_LACT, CFG_GATED / CFG_LACT, PRETRAIN_ARGS, REPLICATE_ARGS).
set -u
if [ -z "${RELOCATED:-}" ]; then
  rm -rf /tmp/stage_gsf && cp -r "$PWD" /tmp/stage_gsf && cd /tmp/stage_gsf || exit 1
  RELOCATED=1 exec bash experiments/replication/gpu_size_families_session.sh "$@"
fi
W=${1:-/tmp/gsf}; PRETRAIN_MIN=${PRETRAIN_MIN:-6}; ARMS_S=${ARMS_S:-400}; POST_AT=${POST_AT:-$((ARMS_S / 2))}
RUN=${RUN:-gated lact}; DEVICE=${DEVICE:-cuda}
mkdir -p "$W"; P=$W/progress.log; T0=$(date +%s)
note() { echo "=== $* $(date +%T) +$(( $(date +%s) - T0 ))s" >> "$P"; }
note start
if [ "$DEVICE" = cuda ]; then
  . benchmarks/gpu_env.sh > "$W/env.log" 2>&1 || { note "env failed; all done"; exit 1; }
  export REPLICATION_DATA=$PWD/shared_data TRITON_CACHE_DIR=/tmp/triton_cache
  mkdir -p $TRITON_CACHE_DIR; for t in benchmarks/triton_autotune*.tgz triton_autotune*.tgz; do
    [ -f "$t" ] && tar xzf "$t" -C $TRITON_CACHE_DIR 2>/dev/null; done
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader >> "$W/env.log"
  PY="python3"
else  # the CPU smoke: fla's kernels under the Triton interpreter (one autotune configuration)
  PY="python3 experiments/replication/interpret.py"
fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
echo "cores $(nproc)" >> "$W/env.log"
note env

sweep() { case $1 in gated) echo "${SWEEP_GATED:-gpu100m_gated}";; lact) echo "${SWEEP_LACT:-gpu100m_lact}";; esac; }
micro() { case $1 in gated) echo "${MICRO_GATED:-0}";; lact) echo "${MICRO_LACT:-16}";; esac; }
only() { case $1 in gated) echo "${GATED_CONFIGS:-gdn_h1024l8}";; lact) echo "${LACT_CONFIGS:-lact_h1024l8}";; esac; }
cfg() { case $1 in
  gated) echo "${CFG_GATED:-experiments/replication/configs/gpu_size_gated_deltanet.yaml}";;
  lact) echo "${CFG_LACT:-experiments/replication/configs/gpu_size_lact.yaml}";; esac; }
R() { $PY experiments/replication/replicate.py --config "$(cfg "$1")" --out "$W/gs_$1" --device "$DEVICE" \
  --base "$W/tb_$1/base" ${REPLICATE_ARGS:-} "${@:2}"; }

if [ "$DEVICE" = cuda ] && [ "${GATED_TEST:-1}" = 1 ]; then  # beside the pretraining: the swap's GPU check (tiny)
  ( timeout -k 10 -s INT "${GATED_TEST_LIMIT:-150}" env TRL_REFINE_GPU_RESULTS="$W/gpu_fla_gated_patch.json" \
      python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_fla_gated_patch.py -m gpu -rA --durations=0 \
      > "$W/gated_patch_test.log" 2>&1
    note "gated patch GPU test rc=$?" ) &
fi
if [ "${PRETRAIN:-1}" = 1 ]; then
  PIDS=""
  for f in $RUN; do
    # shellcheck disable=SC2086
    $PY experiments/tiny_base/pretrain.py --device "$DEVICE" --sweep "$(sweep $f)" --only "$(only $f)" --no_choose \
      --workers "${WORKERS:-3}" --batch "${BATCH:-32}" \
      --micro_batch "$(micro $f)" --mix staged --stage_a 0.25 --steps "${STEPS:-0}" --ramp 0.4 \
      --max_minutes "$PRETRAIN_MIN" --eval_every "${EVAL_EVERY:-250}" ${PRETRAIN_ARGS:-} --out "$W/tb_$f" \
      > "$W/tb_$f.log" 2>&1 &
    PIDS="$PIDS $!"
  done
  for p in $PIDS; do wait "$p"; done
  note "pretraining done"
fi
OK=""
for f in $RUN; do
  $PY experiments/tiny_base/pretrain.py --choose_only --out "$W/tb_$f" > "$W/tb_choose_$f.log" 2>&1
  if [ -f "$W/tb_$f/base/config.json" ]; then OK="$OK $f"; note "$f base chosen: $(grep -o '"chosen": "[^"]*"' "$W/tb_$f/choice.json")"
  else note "$f: no base (tb_$f.log)"; fi
done
[ -n "$OK" ] || { note "no base; all done"; exit 1; }

PIDS=""
for f in $OK; do R $f --phases pretrain > "$W/gs_${f}_base.log" 2>&1 & PIDS="$PIDS $!"; done
for p in $PIDS; do wait "$p"; done
ARMS=""
for f in $OK; do  # the pre-registered gate: the base's held-out NIAH average strictly inside (0, 100)
  v=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['eval']['niah_avg'])" \
      "$W/gs_$f/pretrain/base/result.json" 2>/dev/null)
  if [ "${GATE:-1}" = 0 ] || python3 -c "import sys; sys.exit(0 if 0 < float(sys.argv[1]) < 100 else 1)" "${v:-nan}"; then
    ARMS="$ARMS $f"; note "$f base scored: held-out NIAH $v: arms run"
  else note "$f base scored: held-out NIAH ${v:-missing}: no arms (gs_${f}_base.log)"; fi
done

t1=$(date +%s)
alive() { for p in $1; do kill -0 "$p" 2>/dev/null && echo "$p"; done; }
MID=""
for f in $ARMS; do for s in ${SEEDS:-0 1 2}; do for arm in ${MID_ARMS:-ntp refine_cosine}; do
  R $f --phases midtrain --arms $arm --seeds $s > "$W/gs_${f}_mid_${arm}_$s.log" 2>&1 & MID="$MID $!"
done; done; done
[ -n "$ARMS" ] && note "midtrain arms started"
while [ -n "$(alive "$MID")" ] && [ $(( $(date +%s) - t1 )) -lt "$POST_AT" ]; do sleep 5; done
POST=""
for f in $ARMS; do for s in ${SEEDS:-0 1 2}; do for arm in ${POST_ARMS-sft nested}; do
  R $f --phases posttrain --arms $arm --seeds $s > "$W/gs_${f}_post_${arm}_$s.log" 2>&1 & POST="$POST $!"
done; done; done
[ -n "$POST" ] && note "posttrain arms started ($(alive "$MID" | wc -l) midtrain still running)"
while [ -n "$(alive "$MID $POST")" ] && [ $(( $(date +%s) - t1 )) -lt "$ARMS_S" ]; do sleep 5; done
left=$(alive "$MID $POST" | wc -l)
# shellcheck disable=SC2086
[ "$left" -gt 0 ] && kill $(alive "$MID $POST") 2>/dev/null
note "arms done ($left cut at ${ARMS_S}s)"
for f in $OK; do R $f --phases report > "$W/gs_${f}_report.log" 2>&1; note "$f report rc=$?"; done
wait
note "all done"
