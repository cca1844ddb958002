#!/usr/bin/env bash
# One device call: install, check kernels, measure. Results land in $OUT (the device tool fetches it).
# Usage: bash scripts/gpu_run.sh STEP [STEP ...]
#   steps: kernels rope stage parity bench1 bench2 bench4 compiled1 compiled2 compiled4 serve wan14b
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
NGPU=$(nvidia-smi -L | wc -l)
# the device copy has no .git: pass the commit in, e.g. GIT_COMMIT=$(git rev-parse --short HEAD)
COMMON="--commit ${GIT_COMMIT:-unknown} --preset wan2.1-1.3b --height 480 --width 832 --frames 81 --dtype bfloat16 --device cuda"
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
    compiled[124])  # AOTInductor engines for P GPUs, then every configuration side by side (+ Wan VAE decode)
      P=${step#compiled}
      ENG=$(mktemp -d)/aoti_p$P
      BUILD="--preset wan2.1-1.3b --latent-height 60 --latent-width 104 --max-frames 21 --dtype bfloat16 --device cuda"
      python3 -m ropesp.cli build $BUILD --world-size "$P" --backend aoti --out "$ENG" 2>&1 | tail -3
      cp "$ENG/build.log" "$OUT/build_p$P.log" 2>/dev/null
      python3 -m ropesp.cli bench $COMMON --world-size "$P" --configs reference,paper-sp,optimized,compiled \
        --engines "$ENG" --vae random --json "$OUT/bench_compiled_p$P.json" --plot "$OUT/bench_compiled_p$P.png" 2>&1 | tail -8 ;;
    serve)  # first-chunk latency through Triton vs in-process (2 ranks when the machine has them)
      P=$(( NGPU >= 2 ? 2 : 1 ))
      python3 scripts/serve_latency.py --preset wan2.1-1.3b --latent-height 60 --latent-width 104 --latent-frames 21 \
        --world-size "$P" --device cuda --requests 3 --json "$OUT/serve_p$P.json" 2>&1 | tail -12 ;;
    wan14b)  # Wan-14B shapes (40 heads): paper-SP vs optimized on every GPU of the machine
      python3 -m ropesp.cli bench --commit "${GIT_COMMIT:-unknown}" --preset wan2.1-14b --height 480 --width 832 --frames 81 --dtype bfloat16 \
        --device cuda --world-size "$NGPU" --configs paper-sp,optimized --json "$OUT/bench_14b_p$NGPU.json" 2>&1 | tail -6 ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done $(date +%T)"
