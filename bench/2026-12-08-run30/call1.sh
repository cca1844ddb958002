#!/usr/bin/env bash
# call 1 (session 30): the demo trainer's throughput, eager against compiled (scripts/train_throughput.py),
# for the shipped size on short videos and on streams and for a wider, deeper model; then every
# GPU-marked test but the demo model's scores (tests/demo/test_gpu.py) in the time left
set -uo pipefail
export GIT_COMMIT=4a5bc44
RES=$OUT . scripts/gpu_setup.sh >$OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site
S='--stream-prob 1 --stream-windows 9/3 --rollout-prob 0.75 --edge-weight 6'
{
  timeout 110 python3 scripts/train_throughput.py --steps 30 --warmup 8 --recipe "--batch 96" --out $OUT/tp_video.json
  timeout 110 python3 scripts/train_throughput.py --steps 30 --warmup 8 --recipe "--batch 96 --dim 256 --num-layers 6" --out $OUT/tp_video_d256_l6.json
  timeout 140 python3 scripts/train_throughput.py --steps 30 --warmup 12 --recipe "--batch 48 $S" --out $OUT/tp_stream.json
} >$OUT/throughput.log 2>&1
grep -v -i warn $OUT/throughput.log | tail -n 12
left=$((565 - SECONDS))
echo "tests get ${left} s"
timeout -k 5 $left python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs --durations=15 \
  --ignore=tests/demo/test_gpu.py >$OUT/tests_gpu.log 2>&1
echo "rc=$?" >>$OUT/tests_gpu.log
tail -n 40 $OUT/tests_gpu.log
