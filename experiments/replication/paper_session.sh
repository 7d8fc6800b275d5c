#!/usr/bin/env bash
# One background job on a GPU host for issue 13 item 5: the paper-setting YAMLs on the shipped run-3 base, once on
# fla's DeltaNet (converted) and once on our reference DeltaNet, all six runs at once (tiny models: the time is
# Triton compile, on the CPU cores); beside them (FAMILIES=1) issue 17's GPU families test (its 11 families did not
# finish within 1100 s in one process on 2026-12-02; run the hybrids as a call of their own, -k hybrid: 203 s).
# Ran on 2026-12-02 (results/paper_yamls_h200/). From a staged copy of the repository root with .whl/ and
# shared_data/ (the device ends a call's process group: start the job with setsid):
#   setsid bash experiments/replication/paper_session.sh /tmp/paper > /dev/null 2>&1 < /dev/null &
#   bash benchmarks/gpu_poll.sh /tmp/paper 550     # prints the top progress.log; each impl has its own
set -u
W=${1:-/tmp/paper}; mkdir -p "$W"; P=$W/progress.log; export T0=$(date +%s)
note() { echo "=== $* $(date +%T) +$(( $(date +%s) - T0 ))s" >> "$P"; }
note start
. benchmarks/gpu_env.sh > "$W/env.log" 2>&1 || { note "env failed"; note done; exit 1; }
export REPLICATION_DATA=$PWD/shared_data HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton_cache OMP_NUM_THREADS=2
mkdir -p $TRITON_CACHE_DIR; for t in benchmarks/triton_autotune*.tgz; do tar xzf "$t" -C $TRITON_CACHE_DIR 2>/dev/null; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$W/env.log"
note env
BASE=trl_refine/assets/tiny_retrieval_delta_net
IMPL=fla bash experiments/replication/paper_yamls.sh "$W/fla" $BASE &
IMPL=reference bash experiments/replication/paper_yamls.sh "$W/reference" $BASE &
if [ "${FAMILIES:-0}" = 1 ]; then
  (export TRL_REFINE_GPU_RESULTS=$W/gpu_families.json
   timeout -k 30 -s INT "${FAMILIES_LIMIT:-1100}" python3 -m pytest -q -m gpu tests/gpu/test_gpu_families.py \
     -p no:cacheprovider -rA --durations=0 > "$W/families_pytest.log" 2>&1
   echo "=== families rc=$? $(date +%T)" >> "$P") &
fi
wait
note "all done"
note done
