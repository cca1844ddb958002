#!/usr/bin/env bash
# call 1 (session 29): three training recipes from the shipped g, beside the FP8 GEMMs + FP8 attention long-stream test
set -uo pipefail
export GIT_COMMIT=f28d5ca
F='--stream-prob 1 --lr 3e-4 --edge-weight 6 --warmup 100 --stream-windows 9/3,9/3,6/0,12/3 --switch-prob 0.15 --rollout-prob 0.75 --step-weights 1,1,1,3 --motion-weights 1,3,1,1'
mkdir -p $OUT/train
( OUT=$OUT/train RES=/tmp/r39 TRAIN_S=260 LONG_S=70 bash scripts/issue39_gpu.sh \
  "i --init ropesp/demo/weights --adapter-from 3 $F --adapter-rank 64" \
  "j --init ropesp/demo/weights --adapter-from 3 $F --adapter-rank 128" \
  "k --init ropesp/demo/weights --adapter-from 3 $F --adapter-rank 256" >$OUT/train/train_call.log 2>&1 ) &
sleep 45
export PYTHONPATH=/tmp/site
{
  echo "=== long fp8 gemm+attention $(date +%T)"
  timeout 330 python3 -m pytest tests/demo/test_gpu.py -m gpu -q -s -p no:cacheprovider -rs -W ignore -k "long and fp8-gemm-attention" 2>&1 | grep -v "^\s*$" | tail -30
  echo "=== tests done $(date +%T)"
} >$OUT/tests.log 2>&1
wait
echo "=== all done $SECONDS s"
