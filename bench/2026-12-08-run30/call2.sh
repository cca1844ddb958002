#!/usr/bin/env bash
# call 2 (session 30): is depth the lever for the diagonal scenes? The shipped weights' recipe (twenty-ninth
# session's `i`: the rank-64 adapter trained on) side by side with the same model grown to 6 and to 8
# blocks (--num-layers; the added blocks start as identities, trained through the adapter's deltas from
# frame 3 on like the rest), 200 s each, scored on the 32 pairs and the long streams of the page's window;
# beside them the compiled-forward GPU tests; then the trainer's throughput, eager against compiled
set -uo pipefail
export GIT_COMMIT=4a5bc44
F='--init ropesp/demo/weights --adapter-from 3 --adapter-rank 64 --stream-prob 1 --lr 3e-4 --edge-weight 6 --warmup 100 --stream-windows 9/3,9/3,6/0,12/3 --switch-prob 0.15 --rollout-prob 0.75 --step-weights 1,1,1,3 --motion-weights 1,3,1,1'
mkdir -p $OUT/train
( OUT=$OUT/train RES=/tmp/r30 TRAIN_S=200 LONG_S=90 bash scripts/issue39_gpu.sh \
  "a $F" "d6 $F --num-layers 6" "d8 $F --num-layers 8" >$OUT/train/train_call.log 2>&1 ) &
sleep 50
export PYTHONPATH=/tmp/site
timeout 200 python3 -m pytest tests/demo/test_train.py -m gpu -q -p no:cacheprovider -rs -W ignore -k compiled \
  >$OUT/tests_compiled.log 2>&1
echo "rc=$?" >>$OUT/tests_compiled.log
wait
tail -n 8 $OUT/tests_compiled.log
grep "^==" $OUT/train/train_call.log
left=$((480 - SECONDS))
echo "throughput gets ${left} s"
[ "$left" -gt 60 ] && timeout $left python3 scripts/train_throughput.py --steps 30 --warmup 8 --recipe "--batch 96" \
  --out $OUT/tp_video.json 2>&1 | grep -v -i warn | tail -n 3
