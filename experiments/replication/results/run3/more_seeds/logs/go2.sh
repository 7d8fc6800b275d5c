cd /work/wt/lead
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt/lead OMP_NUM_THREADS=1
while ! grep -q "^done" /tmp/run3x/progress.log; do sleep 5; done
mkdir -p /tmp/run3x_check/cpu/pretrain && cp -r /tmp/run3x/cpu/pretrain/base /tmp/run3x_check/cpu/pretrain/
C="nice -n 15 python3 experiments/replication/replicate.py --config experiments/replication/configs/cpu_stream.yaml"
echo "start check $(date +%T)" >> /tmp/run3x/progress2.log
$C --out /tmp/run3x_check/cpu --phases midtrain --arms ntp --seeds 0 > /tmp/run3x/check_ntp_0.log 2>&1
echo "end check rc=$? $(date +%T)" >> /tmp/run3x/progress2.log
for s in 3 4 5 6; do
  for arm in sft nested_sft nested; do
    $C --out /tmp/run3x/cpu --phases posttrain --arms $arm --seeds $s > /tmp/run3x/post_${arm}_$s.log 2>&1
    echo "end post $arm $s rc=$? $(date +%T)" >> /tmp/run3x/progress2.log
  done
done
for s in 7 8 9; do
  for arms in ntp refine_cosine,ntp_equal_time refine_exact; do
    $C --out /tmp/run3x/cpu --phases midtrain --arms $arms --seeds $s > /tmp/run3x/mid_${arms%%,*}_$s.log 2>&1
    echo "end mid $arms $s rc=$? $(date +%T)" >> /tmp/run3x/progress2.log
  done
done
echo done >> /tmp/run3x/progress2.log
