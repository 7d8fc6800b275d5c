cd /work/wt/lead
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt/lead OMP_NUM_THREADS=1
R="nice -n 15 python3 experiments/replication/replicate.py --config experiments/replication/configs/cpu_stream.yaml --out /tmp/run3x/cpu --base trl_refine/assets/tiny_retrieval_delta_net --phases midtrain"
for s in 3 4 5 6; do
  for arms in ntp refine_cosine,ntp_equal_time refine_exact; do
    echo "start $arms $s $(date +%T)" >> /tmp/run3x/progress.log
    $R --arms $arms --seeds $s > /tmp/run3x/mid_${arms%%,*}_$s.log 2>&1
    echo "end $arms $s rc=$? $(date +%T)" >> /tmp/run3x/progress.log
  done
done
echo done >> /tmp/run3x/progress.log
