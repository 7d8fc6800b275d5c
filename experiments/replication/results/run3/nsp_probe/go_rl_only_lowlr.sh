cd /work/wt/lead2
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt/lead2 OMP_NUM_THREADS=1
P="python3 experiments/replication/nsp_probe.py --config /tmp/probe_rl2/rl_only_lowlr.yaml --out /tmp/probe_rl2/cpu --arms refine_exact"
$P --seeds 0 > /tmp/probe_rl2/s0.log 2>&1 &
$P --seeds 1 > /tmp/probe_rl2/s1.log 2>&1 &
wait; echo done > /tmp/probe_rl2/done
