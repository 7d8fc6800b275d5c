cd /work/wt/lead2
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt/lead2 OMP_NUM_THREADS=1
P="nice -n 10 python3 experiments/replication/nsp_probe.py --config experiments/replication/configs/cpu_stream.yaml --out /tmp/probe/cpu --seeds 0,1,2,3,4"
$P --arms ntp > /tmp/probe/ntp.log 2>&1 &
$P --arms refine_cosine > /tmp/probe/refine_cosine.log 2>&1 &
wait
echo done > /tmp/probe/done
