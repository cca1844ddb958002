#!/usr/bin/env bash
# call 1: the shipped weights on every GPU path (tests), and two training recipes beside them on the same GPU
set -uo pipefail
export GIT_COMMIT=66fd247
RES=/tmp/r40 DEADLINE=60 bash scripts/issue40_gpu.sh >$OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site
F='--adapter-rank 64 --stream-prob 1 --lr 3e-4 --warmup 100 --stream-windows 9/3,9/3,6/0,12/3 --switch-prob 0.15 --rollout-prob 0.75 --edge-weight 6 --step-weights 1,1,1,3'
mkdir -p $OUT/train
( OUT=$OUT/train RES=/tmp/r39 TRAIN_S=330 LONG_S=100 bash scripts/issue39_gpu.sh \
  "g --init ropesp/demo/weights --adapter-from 3 $F --motion-weights 1,3,1,1" \
  "h --init ropesp/demo/weights --adapter-from 3 $F --motion-weights 1,9,1,1" >$OUT/train/train_call.log 2>&1 ) &
{
  echo "=== adapted $(date +%T)"
  timeout 90 python3 -m pytest tests/plugins/test_fp8_gpu.py -k adapted -m gpu -q -p no:cacheprovider -rs 2>&1 | tail -15
  echo "=== demo gpu $(date +%T)"
  timeout 470 python3 -m pytest tests/demo/test_gpu.py -m gpu -q -s -p no:cacheprovider -rs -W ignore 2>&1 | grep -v "^\s*$" | tail -80
  echo "=== tests done $(date +%T)"
} >$OUT/tests.log 2>&1
wait
echo "=== all done $SECONDS s"
