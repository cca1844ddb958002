#!/usr/bin/env bash
# One device call for issue 40 (the fast Wan VAE decoder, FP8 attention's drift): install, then the named
# steps in order, each under its own time limit and all under DEADLINE seconds; every result lands in
# $RES and is packed into $OUT/results.tgz after each step (the device tool returns at most 8 files).
#
# Usage (from the repository root, wheels in .whl/): DEADLINE=320 bash scripts/issue40_gpu.sh STEP...
#   ceilings  copy bandwidth and bf16 GEMM rate (scripts/gpu_ceilings.py)
#   tests     the fast decoder's and the fp8 attention's GPU tests
#   vae480 / vae720     fast, fast-eager and eager channels-last decoders, fp32 reference, profiles, convs
#   vaecompile480       today's --vae-compile decoder and the fast one in one process
#   fp8conv   e4m3 convolutions through cuDNN's graph API at the decoder's shapes (carry .whl_conv)
#   fp8acc480 / fp8acc720  FA3 e4m3 attention's error and time over growing windows
#   drift480 / drift720    per-chunk latents of Wan-1.3B (random weights) per FP8 attention fix
#   e2e480fast / e2e480compile  `ropesp bench --vae random`, DiT only and DiT + decoder, bf16 compile and
#              FP8 + FP8 attention, with the fast decoder (--vae-fast) / today's compiled one (--vae-compile,
#              FP8 + FP8 attention only: the baseline of the same call)
#   e2e720fast / e2e720compile  the same at 1280x720, FP8 + FP8 attention
#   e2e480taehv / e2e720taehv  the same as e2e480fast / e2e720fast with TAEHV's tiny decoder (`--taehv random`,
#              ropesp/decode/taehv.py) instead of --vae-fast: 480p bf16 compile and FP8 + FP8 attention,
#              720p FP8 + FP8 attention
#   e2e480early  480p FP8 + FP8 attention, --vae-fast, the first frame handed over apart (--early-first-frame):
#              the first frame and the whole first chunk's frames of the same run
#   rot480     480p FP8 + FP8 attention DiT only with the e4m3 cache's keys rotated (E4M3KVCache.rotate_keys)
#   demorot    the demo model's score: fp32, FP8 attention, FP8 attention with the keys rotated
#   cudnntests the fast decoder's GPU tests, its cuDNN-graph convolutions included (carry .whl_conv, and
#              diffusers: .whl_vae = .whl's diffusers and importlib_metadata wheels)
#   vaecudnn480 / vaecudnn720  fast vs fast-cudnn decoder (cuDNN graph convolutions), profiles, the plans
#              chosen; 480p against an fp32 reference too
#   e2e480cudnn / e2e720cudnn  `ropesp bench --vae random --vae-fast --vae-cudnn` (480p: bf16 compile and
#              FP8 + FP8 attention; 720p: FP8 + FP8 attention), then the same with --vae-fast alone (the
#              baseline of the same call; run only where the cuDNN run gave numbers). Both are skipped
#              where this call's vaecudnn480 ran and its fast-cudnn variant failed (carry .whl_fp8 too, or
#              E2E480_CONFIGS=compile for the bf16 rows alone)
set -uo pipefail
DEADLINE=${DEADLINE:-540}
DRIFT_VARIANTS=${DRIFT_VARIANTS:-sdpa,gemm,fp8:base,fp8:v,fp8:split,fp8:v+split}
# shellcheck source=scripts/gpu_setup.sh
. scripts/gpu_setup.sh
pack() { tar czf "$OUT/results.tgz" -C "$RES" . ; }
trap pack EXIT
step() {  # step NAME LIMIT CMD...: at most LIMIT seconds and never past DEADLINE
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "=== $name skipped (deadline)"; return; fi
  echo "=== $name $(date +%T) (limit ${limit} s)"
  timeout -k 5 "$limit" "$@" >"$RES/$name.log" 2>&1
  echo "--- $name rc=$? after $((SECONDS)) s"
  grep -v -E "Warning|warn\(|torchao|_pytree|register_constant|^\s*$" "$RES/$name.log" | tail -n "${TAIL:-30}" | cut -c1-240
  pack
}
VAE=(scripts/vae_bench.py --latent-frames 21 --repeat 2)
DRIFT=(scripts/fp8_attention_drift.py --preset wan2.1-1.3b --latent-frames 21 --device cuda --dtype bfloat16
  --backend "${DRIFT_BACKEND:-eager}" --variants "$DRIFT_VARIANTS")
E2E_DIT=(bench --preset wan2.1-1.3b --frames 81 --repeat "${E2E_REPEAT:-2}" --dtype bfloat16 --device cuda
  --commit "${GIT_COMMIT:-unknown}")
E2E=("${E2E_DIT[@]}" --vae random)
cudnn_ok() {  # false where this call's vaecudnn480 ran and its fast-cudnn variant gave no video time
  [ ! -f "$RES/vaecudnn480.log" ] && return 0
  [ -f "$RES/vaecudnn480.json" ] && $PY -c "import json,sys
sys.exit('video_ms' not in json.load(open(sys.argv[1]))['results'].get('fast-cudnn', {}))" "$RES/vaecudnn480.json"
}
has_fps() {  # the bench JSON $1 holds a row with an end-to-end FPS
  [ -f "$1" ] && $PY -c "import json,sys; r=json.load(open(sys.argv[1]))['results']
sys.exit(not any((v or {}).get('fps_with_decode') for v in r.values()))" "$1"
}
e2e_cudnn() {  # e2e_cudnn NAME LIMIT BENCH-ARGS...: --vae-fast --vae-cudnn, then --vae-fast alone
  local name=$1 limit=$2; shift 2
  if ! cudnn_ok; then echo "=== $name skipped: fast-cudnn failed in vaecudnn480"; return; fi
  step "$name" "$limit" $PY -m ropesp.cli "${E2E[@]}" "$@" --vae-fast --vae-cudnn --json "$RES/$name.json"
  if has_fps "$RES/$name.json"; then
    step "${name}_base" "$limit" $PY -m ropesp.cli "${E2E[@]}" "$@" --vae-fast --json "$RES/${name}_base.json"
  else
    echo "=== ${name}_base skipped: no numbers from $name"
  fi
}
ROTATED="import sys
from ropesp.plugins.e4m3_cache import E4M3KVCache
E4M3KVCache.rotate_keys = True
from ropesp.cli import main
sys.exit(main(sys.argv[1:]))"
for s in "$@"; do
  case $s in
    ceilings) step ceilings 40 $PY scripts/gpu_ceilings.py --json "$RES/ceilings.json" ;;
    tests) step tests 120 $PY -m pytest tests/decode/test_wan_fast.py tests/plugins/test_fp8_attention_gpu.py \
      -m gpu -q -p no:cacheprovider -rs ;;
    vae480) TAIL=60 step vae480 150 $PY "${VAE[@]}" --latent-height 60 --latent-width 104 \
      --variants channels-last,fast,fast-eager --fp32-reference --profile --conv-bench --json "$RES/vae480.json" ;;
    vae720) TAIL=60 step vae720 150 $PY "${VAE[@]}" --latent-height 90 --latent-width 160 \
      --variants channels-last,fast --profile --conv-bench --json "$RES/vae720.json" ;;
    vaecompile480) TAIL=60 step vaecompile480 300 $PY "${VAE[@]}" --latent-height 60 --latent-width 104 \
      --variants "${VAE_VARIANTS:-channels-last,fast,compile-channels-last}" --fp32-reference --profile --conv-bench \
      --json "$RES/vaecompile480.json" ;;
    fp8conv) step fp8conv 240 $PY scripts/fp8_conv_probe.py --json "$RES/fp8conv.json" ;;
    fp8acc480) step fp8acc480 60 $PY scripts/fp8_attention_accuracy.py --json "$RES/fp8acc480.json" ;;
    fp8acc720) step fp8acc720 90 $PY scripts/fp8_attention_accuracy.py --queries 10800 \
      --windows 10800,43200,75600 --json "$RES/fp8acc720.json" ;;
    drift480) step drift480 150 $PY "${DRIFT[@]}" --latent-height 60 --latent-width 104 --json "$RES/drift480.json" ;;
    drift720) step drift720 200 $PY "${DRIFT[@]}" --latent-height 90 --latent-width 160 --json "$RES/drift720.json" ;;
    e2e480fast) step e2e480fast 220 $PY -m ropesp.cli "${E2E[@]}" --height 480 --width 832 \
      --configs compile,compile-fp8attn --vae-fast --json "$RES/e2e480fast.json" ;;
    e2e480compile) step e2e480compile 200 $PY -m ropesp.cli "${E2E[@]}" --height 480 --width 832 \
      --configs compile-fp8attn --vae-compile --json "$RES/e2e480compile.json" ;;
    e2e720fast) step e2e720fast 200 $PY -m ropesp.cli "${E2E[@]}" --height 720 --width 1280 \
      --configs compile-fp8attn --vae-fast --json "$RES/e2e720fast.json" ;;
    e2e720compile) step e2e720compile 240 $PY -m ropesp.cli "${E2E[@]}" --height 720 --width 1280 \
      --configs compile-fp8attn --vae-compile --json "$RES/e2e720compile.json" ;;
    e2e480taehv) step e2e480taehv 220 $PY -m ropesp.cli "${E2E_DIT[@]}" --height 480 --width 832 \
      --configs compile,compile-fp8attn --taehv random --json "$RES/e2e480taehv.json" ;;
    e2e720taehv) step e2e720taehv 200 $PY -m ropesp.cli "${E2E_DIT[@]}" --height 720 --width 1280 \
      --configs compile-fp8attn --taehv random --json "$RES/e2e720taehv.json" ;;
    e2e480early) step e2e480early 220 $PY -m ropesp.cli "${E2E[@]}" --height 480 --width 832 \
      --configs compile-fp8attn --vae-fast --early-first-frame --json "$RES/e2e480early.json" ;;
    rot480) step rot480 150 $PY -c "$ROTATED" bench --preset wan2.1-1.3b --frames 81 --height 480 --width 832 \
      --configs compile-fp8attn --no-decode --repeat "${E2E_REPEAT:-2}" --commit "${GIT_COMMIT:-unknown}" \
      --json "$RES/rot480.json" ;;
    demorot) step demorot 200 $PY -m pytest tests/demo/test_gpu.py -m gpu -q -s -p no:cacheprovider -rs \
      -k "fp8-attention] or rotated" ;;
    cudnntests) TAIL=40 step cudnntests 180 $PY -m pytest \
      tests/decode/test_wan_fast.py -m gpu -q -p no:cacheprovider -rs ;;
    vaecudnn480) TAIL=60 step vaecudnn480 240 $PY "${VAE[@]}" --latent-height 60 --latent-width 104 \
      --variants fast,fast-cudnn --fp32-reference --profile --json "$RES/vaecudnn480.json" ;;
    vaecudnn720) TAIL=60 step vaecudnn720 240 $PY "${VAE[@]}" --latent-height 90 --latent-width 160 \
      --variants fast,fast-cudnn --profile --json "$RES/vaecudnn720.json" ;;
    e2e480cudnn) e2e_cudnn e2e480cudnn 240 --height 480 --width 832 --configs "${E2E480_CONFIGS:-compile,compile-fp8attn}" ;;
    e2e720cudnn) e2e_cudnn e2e720cudnn 240 --height 720 --width 1280 --configs compile-fp8attn ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "=== done after $SECONDS s"
