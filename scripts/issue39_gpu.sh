#!/usr/bin/env bash
# One device call for issue 39 (the demo model over long streams): several training recipes side by side on
# the one GPU (the demo model is a few MB: one run leaves most of an H100 idle), each then exported and
# scored on the 32 short pairs and, if time is left, on the long streams of the page's window.
# Every result lands in $RES and is packed after each stage, one archive per recipe ($OUT/NAME.tgz: its
# logs, scores and exported weights, not its optimizer state) and $OUT/results.tgz (the rest): the device
# tool returns at most 8 files of at most 16 MiB. A later call starts from exported weights with --init, or
# (STATE=1, or STATE=NAME,NAME for those recipes only: the training state comes back too, as
# $OUT/NAME_model.tgz and $OUT/NAME_adam.tgz) resumes with '--resume DIR' in the recipe; RES=/tmp/r39 keeps
# it on a warm machine for the next call.
#
# Usage (from the repository root): TRAIN_S=330 bash scripts/issue39_gpu.sh 'NAME ARGS...' 'NAME ARGS...'
#   each recipe: a name and the extra `python -m ropesp.demo.train` flags of that run, e.g.
#   'a --init ropesp/demo/weights --lr 8e-5 --stream-prob 0.5'
set -uo pipefail
TRAIN_S=${TRAIN_S:-330}
LONG=${LONG:-1}
DEVICE=${DEVICE:-cuda}
# shellcheck source=scripts/gpu_setup.sh
. scripts/gpu_setup.sh
pack() {
  local name
  for name in "${names[@]}"; do
    tar czf "$OUT/$name.tgz" -C "$RES" --exclude='state/*.safetensors' "$name"
  done
  tar czf "$OUT/results.tgz" -C "$RES" --exclude='./*/*' .
  if [ -n "${STATE:-}" ]; then
    for name in "${names[@]}"; do
      [ -f "$RES/$name/state/train.json" ] || continue
      [ "$STATE" = 1 ] || [[ ",$STATE," == *",$name,"* ]] || continue
      tar czf "$OUT/${name}_model.tgz" -C "$RES/$name" state/train.json state/state_model.safetensors state/state_ema.safetensors
      tar czf "$OUT/${name}_adam.tgz" -C "$RES/$name" state/state_adam_m.safetensors state/state_adam_v.safetensors
    done
  fi
}
trap pack EXIT
threads=$(( $(nproc) / $# )); [ "$threads" -lt 1 ] && threads=1
names=()
for recipe in "$@"; do read -r name _ <<<"$recipe"; names+=("$name"); done

for recipe in "$@"; do
  read -r name args <<<"$recipe"
  mkdir -p "$RES/$name"
  echo "$args" >"$RES/$name/recipe.txt"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$threads timeout -k 10 $((TRAIN_S + 60)) $PY -m ropesp.demo.train --out "$RES/$name/state" \
    --device "$DEVICE" --time-limit "$TRAIN_S" --log-every 100 $args >"$RES/$name/train.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  echo "== $name: $(grep -c '"step"' "$RES/$name/train.log") log lines; $(tail -n 1 "$RES/$name/train.log" | cut -c1-200)"
  $PY -m ropesp.demo.train --resume "$RES/$name/state" --export "$RES/$name/weights" >>"$RES/$name/train.log" 2>&1
done
pack
for name in "${names[@]}"; do
  [ -f "$RES/$name/weights/config.json" ] || continue
  OMP_NUM_THREADS=$threads $PY -m ropesp.demo.evaluate --checkpoint "$RES/$name/weights" --device "$DEVICE" \
    --json "$RES/$name/short.json" >"$RES/$name/short.log" 2>&1 &
done
wait
for name in "${names[@]}"; do echo "== $name short: $(tail -n 2 "$RES/$name/short.log" | tr '\n' ' ')"; done
pack
if [ "$LONG" = 1 ]; then
  for name in "${names[@]}"; do
    [ -f "$RES/$name/weights/config.json" ] || continue
    OMP_NUM_THREADS=$threads timeout -k 5 "${LONG_S:-200}" $PY -m ropesp.demo.long_stream --checkpoint "$RES/$name/weights" \
      --device "$DEVICE" --windows 9/3 --json "$RES/$name/long93.json" >"$RES/$name/long.log" 2>&1 &
  done
  wait
  for name in "${names[@]}"; do echo "== $name long 9/3: $(tail -n 1 "$RES/$name/long.log" | cut -c1-220)"; done
fi
