#!/usr/bin/env bash
# One device call: install, check kernels, measure. Results land in $OUT (the device tool fetches it).
# Usage: bash scripts/gpu_run.sh STEP [STEP ...]   steps: kernels rope stage parity bench1 bench2 bench4
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
NGPU=$(nvidia-smi -L | wc -l)
COMMON="--preset wan2.1-1.3b --height 480 --width 832 --frames 81 --dtype bfloat16 --device cuda"
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    kernels) python3 -m pytest tests/plugins -m gpu -q -x 2>&1 | tail -15 ;;
    rope) python3 scripts/bench_rope.py --json "$OUT/rope.json" 2>&1 | tail -15 ;;
    stage) python3 -m torch.distributed.run --nproc-per-node "$NGPU" scripts/sp_stage_bench.py --json "$OUT/stage_p$NGPU.json" 2>&1 | tail -25 ;;
    parity) python3 scripts/gpu_parity.py --world-size "$NGPU" --json "$OUT/parity_p$NGPU.json" 2>&1 | tail -20 ;;
    bench1) python3 -m ropesp.cli bench $COMMON --world-size 1 --configs reference,optimized --json "$OUT/bench_p1.json" --plot "$OUT/bench_p1.png" 2>&1 | tail -8 ;;
    bench2) python3 -m ropesp.cli bench $COMMON --world-size 2 --json "$OUT/bench_p2.json" --plot "$OUT/bench_p2.png" 2>&1 | tail -8 ;;
    bench4) python3 -m ropesp.cli bench $COMMON --world-size 4 --json "$OUT/bench_p4.json" --plot "$OUT/bench_p4.png" 2>&1 | tail -8 ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done $(date +%T)"
