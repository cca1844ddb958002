#!/usr/bin/env bash
# One device call: install, check, build, measure. Every result lands in $RES and is packed after each
# step into $OUT/results.tgz (the device tool returns at most 8 files; a step cut by the time limit
# still leaves the earlier ones).
#
# Usage: GIT_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_run.sh STEP [STEP ...]
#   steps: tests quick enginetests demotests weights coldstart coldab coldtimeline coldserve fp8 fp8gemm profilefp8 fp8quality benchengines decodetests overlaptests alone profilealone build480 bench1 bench1opt bench2 bench4 parity hybrid profile profilesp profilevae vae vaeown vaedec build720 bench720 wan14b
#          serve kernels rope stage (Triton latency; the single-kernel and SP-stage micro-benchmarks)
# Dry run on a CPU (tiny model): DEVICE=cpu PRESET=tiny LH=8 LW=8 LF=6 DTYPE=float32 bash scripts/gpu_run.sh ...
# BENCH_TIMEOUT caps each bench/parity run (s); ROPESP_HANG_DUMP_S makes every rank dump its stacks.
# Engines are built into $ENG_ROOT (git-ignored: a warm device machine keeps them between calls).
set -uo pipefail
OUT=${OUT:-out}
RES=${RES:-$(mktemp -d)}
ENG_ROOT=${ENG_ROOT:-.eng}
PRESET=${PRESET:-wan2.1-1.3b}
LH=${LH:-60}            # 480p latents
LW=${LW:-104}
LH720=${LH720:-90}      # 720p latents
LW720=${LW720:-160}
LF=${LF:-21}            # 81 video frames
DTYPE=${DTYPE:-bfloat16}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$RES" "$ENG_ROOT"
export PYTHONUNBUFFERED=1
# packages the GPU image lacks: .whl (av, diffusers for the Wan VAE), .whl_fp8 (torchao, fa3-fwd, sageattention)
wheels=$(ls .whl/*.whl .whl_fp8/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$RES/install.log" 2>&1 || { cat "$RES/install.log"; exit 1; }
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpus.csv"
  NGPU=$(nvidia-smi -L | wc -l)
else
  NGPU=${NGPU:-2}
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$RES/versions.txt"

pack() { tar czf "$OUT/results.tgz" -C "$RES" . ; }
trap pack EXIT
bench() {  # bench NAME P [args...]: ropesp bench on P ranks, results as $RES/NAME.json/.png/.log
  local name=$1 p=$2; shift 2
  timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 -m ropesp.cli bench --commit "${GIT_COMMIT:-unknown}" --dtype "$DTYPE" --device "$DEVICE" \
    --world-size "$p" --json "$RES/$name.json" --plot "$RES/$name.png" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && { echo "!! $name: timed out after $BENCH_TIMEOUT s"; pkill -9 -f multiprocessing.spawn; sleep 2; }
  tail -n 8 "$RES/$name.log"
  return $rc
}
engines() {  # engines TAG P LH LW: build once (AOTInductor), print the directory
  local dir=$ENG_ROOT/$1
  if [ ! -f "$dir/manifest.json" ]; then
    local t0=$SECONDS
    python3 -m ropesp.cli build --preset "$PRESET" --latent-height "$3" --latent-width "$4" --max-frames "$LF" \
      --dtype "$DTYPE" --device "$DEVICE" --world-size "$2" --backend aoti --out "$dir" >"$RES/build_$1.log" 2>&1
    echo "build $1: rc=$? wall=$((SECONDS - t0)) s" >>"$RES/build_times.txt"
    cp "$dir/build.log" "$RES/build_$1.segments.log" 2>/dev/null
  fi
  echo "$dir"
}
build_all() {  # build_all RES_TAG LH LW: the engines for P = 1, 2, 4 (as the machine has GPUs), in parallel
  local tag=$1 lh=$2 lw=$3 i=0
  for p in 1 2 4; do
    [ "$p" -le "$NGPU" ] || continue
    if [ "$DEVICE" = cuda ]; then
      CUDA_VISIBLE_DEVICES=$i engines "${tag}_p$p" "$p" "$lh" "$lw" >/dev/null &
    else
      engines "${tag}_p$p" "$p" "$lh" "$lw" >/dev/null &
    fi
    i=$((i + 1))
  done
  wait
  cat "$RES/build_times.txt"
}
# bench_cmp NAME P TAG LH LW CONFIGS [args...]: the engine configurations run where engines TAG_pP were built;
# if the run fails, the eager configurations alone (so the baselines still land)
only() { echo "$1" | tr , '\n' | grep -v -- "$2" | paste -sd, ; }
bench_cmp() {
  local name=$1 p=$2 tag=$3 lh=$4 lw=$5 configs=$6; shift 6
  local eng=$ENG_ROOT/${tag}_p$p engines=()
  local size=(--preset "$PRESET" --latent-height "$lh" --latent-width "$lw" --latent-frames "$LF")
  if [ -f "$eng/manifest.json" ]; then engines=(--engines "$eng"); else configs=$(only "$configs" '^compiled'); fi
  bench "$name" "$p" "${size[@]}" "${engines[@]}" --configs "$configs" "$@" && return 0
  local eager
  eager=$(only "$configs" '^compile')
  [ "$eager" != "$configs" ] || return 1
  echo "!! $name failed; eager configurations only"
  bench "$name" "$p" "${size[@]}" --configs "$eager" "$@"
}

# bytecode [DIR...]: what `pip install` leaves (it compiles every module it installs), for the image's
# site-packages, the carried wheels, ropesp and DIRs, into a writable cache: the image holds no .pyc, so
# without it every cold-start process compiles ~2000 modules (~5 s); writing must be on
# (PYTHONDONTWRITEBYTECODE unset), and the flags the processes see are logged
bytecode() {
  export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/ropesp-pyc}
  unset PYTHONDONTWRITEBYTECODE
  python3 -c "import sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'pycache_prefix', sys.pycache_prefix)" \
    | tee -a "$RES/bytecode.txt"
  local t0=$SECONDS
  python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    ${PYTHONPATH:+"$PYTHONPATH"} ropesp runtime export plugins "$@" >/dev/null 2>&1
  echo "compileall into $PYTHONPYCACHEPREFIX: $((SECONDS - t0)) s" | tee -a "$RES/bytecode.txt"
}

ENGINE_CFGS=compiled-nograph,compiled
for step in "$@"; do
  echo "=== $step $(date +%T)"
  t_step=$SECONDS
  case $step in
    tests)  # every GPU-marked test (kernels, compile + CUDA graphs, engines, no host sync); in the foreground
      # (compilation in the background would steal the host from the benchmarks that follow)
      timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 -m pytest tests -m gpu -q -p no:cacheprovider >"$RES/tests.log" 2>&1
      tail -n 8 "$RES/tests.log" ;;
    build480) build_all 480 "$LH" "$LW" ;;
    build720) build_all 720 "$LH720" "$LW720" ;;
    bench1opt) bench_cmp bench480_p1opt 1 480 "$LH" "$LW" optimized,optimized-graphs,compile,$ENGINE_CFGS --no-decode ;;
    bench1) bench_cmp bench480_p1 1 480 "$LH" "$LW" reference,optimized,optimized-graphs,compile,$ENGINE_CFGS --no-decode ;;
    bench2) bench_cmp bench480_p2 2 480 "$LH" "$LW" paper-sp,optimized,optimized-graphs,compile,$ENGINE_CFGS --no-decode ;;
    bench4) [ "$NGPU" -ge 4 ] && bench_cmp bench480_p4 4 480 "$LH" "$LW" paper-sp,optimized,optimized-graphs,compile,$ENGINE_CFGS --no-decode ;;
    alone)  # one GPU: rank 0 of P = 2 and 4 by itself (collectives move nothing) against P = 1, compile backend:
      # the scaling free communication would give; ALONE_P picks P (default "2 4"), ALONE_TAG names the files,
      # ALONE_RES=720 runs 1280x720 (default 480), ALONE_ARGS adds bench options (e.g. --repeat 1)
      if [ "${ALONE_RES:-480}" = 720 ]; then ares=(720 "$LH720" "$LW720"); else ares=(480 "$LH" "$LW"); fi
      # shellcheck disable=SC2086
      bench_cmp "alone${ares[0]}_p1${ALONE_TAG:-}" 1 "${ares[@]}" compile --no-decode ${ALONE_ARGS:-}
      for p in ${ALONE_P:-2 4}; do
        # shellcheck disable=SC2086
        bench_cmp "alone${ares[0]}_p$p${ALONE_TAG:-}" "$p" "${ares[@]}" compile --no-decode --alone ${ALONE_ARGS:-}
      done ;;
    profilealone)  # one GPU, compile: one video at P = 1 and rank 0 of P = 4 by itself, under the profiler
      for p in 1 4; do
        python3 scripts/profile_chunk.py --preset "$PRESET" --backend compile --world-size "$p" --alone \
          --latent-height "$LH" --latent-width "$LW" --latent-frames "$LF" --dtype "$DTYPE" --device "$DEVICE" \
          --json "$RES/profile_alone_p$p.json" >"$RES/profile_alone_p$p.log" 2>&1; tail -n 14 "$RES/profile_alone_p$p.log"; done ;;
    overlaptests)  # the session's GPU tests: decode overlap (the own-GPU one needs two), run-ahead of the clean pass
      timeout -k 5 300 python3 -m pytest tests/runtime/test_session_overlap.py tests/runtime/test_session.py -m gpu -q -p no:cacheprovider \
        >"$RES/tests_overlap.log" 2>&1; tail -n 4 "$RES/tests_overlap.log" ;;
    hybrid)  # U=1 x R=2 (ring attention over cache shards) against U=2 x R=1 (bench2), same engines
      bench_cmp hybrid480_u1r2 2 480 "$LH" "$LW" optimized,compile,compiled --no-decode --ulysses-degree 1 --ring-degree 2 ;;
    parity)  # compile + CUDA graphs, engines and the hybrid layout against eager on one GPU
      par() { local name=$1; shift
        timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 scripts/gpu_parity.py --preset "$PRESET" --latent-height "$LH" --latent-width "$LW" \
          --latent-frames "$LF" --dtype "$DTYPE" --device "$DEVICE" --json "$RES/$name.json" "$@" \
          >"$RES/$name.log" 2>&1; grep -E "max_abs|seconds" "$RES/$name.log"; }
      par parity_compile_p1 --world-size 1 --backend compile
      par parity_compile_p2 --world-size 2 --backend compile
      [ -f "$ENG_ROOT/480_p1/manifest.json" ] && par parity_aoti_p1 --world-size 1 --engines "$ENG_ROOT/480_p1"
      [ -f "$ENG_ROOT/480_p2/manifest.json" ] && par parity_aoti_p2 --world-size 2 --engines "$ENG_ROOT/480_p2"
      par parity_u1r2 --world-size 2 --ulysses-degree 1 --ring-degree 2 ;;
    profile)  # where the time goes, one GPU: eager, regional torch.compile + CUDA graphs, engines
      python3 scripts/profile_chunk.py --preset "$PRESET" --latent-height "$LH" --latent-width "$LW" \
        --latent-frames "$LF" --dtype "$DTYPE" --device "$DEVICE" --json "$RES/profile_eager.json" \
        >"$RES/profile_eager.log" 2>&1; tail -n 14 "$RES/profile_eager.log"
      python3 scripts/profile_chunk.py --preset "$PRESET" --backend compile --latent-height "$LH" --latent-width "$LW" \
        --latent-frames "$LF" --dtype "$DTYPE" --device "$DEVICE" --json "$RES/profile_compile.json" \
        --trace "$RES/trace_compile.json.gz" >"$RES/profile_compile.log" 2>&1; tail -n 14 "$RES/profile_compile.log"
      [ -f "$ENG_ROOT/480_p1/manifest.json" ] && { python3 scripts/profile_chunk.py --engines "$ENG_ROOT/480_p1" \
        --backend aoti --latent-height "$LH" --latent-width "$LW" --latent-frames "$LF" --dtype "$DTYPE" \
        --device "$DEVICE" --json "$RES/profile_compiled.json" --trace "$RES/trace_compiled.json.gz" \
        >"$RES/profile_compiled.log" 2>&1; tail -n 14 "$RES/profile_compiled.log"; } ;;
    profilesp)  # where multi-GPU time goes: rank 0 of P = 2 and 4 profiled (compile), NCCL waits included
      for p in 2 4; do [ "$p" -le "$NGPU" ] || continue
        timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 scripts/profile_chunk.py --preset "$PRESET" --backend compile \
          --world-size "$p" --latent-height "$LH" --latent-width "$LW" --latent-frames "$LF" --dtype "$DTYPE" \
          --device "$DEVICE" --json "$RES/profile_compile_p$p.json" --trace "$RES/trace_compile_p$p.json.gz" \
          >"$RES/profile_compile_p$p.log" 2>&1; tail -n 14 "$RES/profile_compile_p$p.log"; done ;;
    profilevae)  # one video with the full-size Wan VAE decoding overlapped (its own stream), under the profiler
      python3 scripts/profile_chunk.py --preset "$PRESET" --backend compile --latent-height "$LH" --latent-width "$LW" \
        --latent-frames "$LF" --dtype "$DTYPE" --device "$DEVICE" --vae random --json "$RES/profile_vae.json" \
        --trace "$RES/trace_vae_overlap.json.gz" >"$RES/profile_vae.log" 2>&1; tail -n 14 "$RES/profile_vae.log" ;;
    vae)  # full-size Wan VAE (random weights): decode alone, serial and overlapped with the DiT (VAE_ARGS=--vae-compile)
      bench_cmp vae480_p1 1 480 "$LH" "$LW" compile --vae random --repeat 1 ${VAE_ARGS:-}
      [ "$NGPU" -ge 2 ] && bench_cmp vae480_p2 2 480 "$LH" "$LW" compile --vae random --repeat 1 ${VAE_ARGS:-} ;;
    vaedec)  # the Wan VAE decoder alone: cuDNN autotuning, channels-last, torch.compile (scripts/vae_bench.py)
      timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 scripts/vae_bench.py --device "$DEVICE" --dtype "$DTYPE" \
        --latent-height "$LH" --latent-width "$LW" --latent-frames "$LF" ${VAEDEC_ARGS:-} --json "$RES/vae_decode.json" \
        >"$RES/vae_decode.log" 2>&1; tail -n 7 "$RES/vae_decode.log" ;;
    vaeown)  # the Wan VAE on a GPU of its own: P DiT ranks on cuda:0..P-1, rank 0 decoding on cuda:P;
      # VAEOWN_ARGS: decoder options (default --vae-compile; set empty for the eager channels-last decoder)
      # shellcheck disable=SC2086
      [ "$NGPU" -ge 2 ] && bench_cmp vae480_p1_own 1 480 "$LH" "$LW" compile --vae random ${VAEOWN_ARGS---vae-compile} \
        --repeat 1 --decode-device cuda:1
      # shellcheck disable=SC2086
      [ "$NGPU" -ge 3 ] && bench_cmp vae480_p2_own 2 480 "$LH" "$LW" compile --vae random ${VAEOWN_ARGS---vae-compile} \
        --repeat 1 --decode-device cuda:2 ;;
    bench720)  # 1280x720: engines vs the paper baseline for P = 1, 2, 4
      bench_cmp bench720_p1 1 720 "$LH720" "$LW720" optimized,optimized-graphs,compile,$ENGINE_CFGS --no-decode --repeat 1
      for p in 2 4; do [ "$p" -le "$NGPU" ] && bench_cmp "bench720_p$p" "$p" 720 "$LH720" "$LW720" \
        paper-sp,optimized,compile,$ENGINE_CFGS --no-decode --repeat 1; done ;;
    wan14b)  # Wan-14B shapes (40 heads), 480p: P = 1 (against the reference) for the scaling baseline, then the
      # paper baseline vs optimized on P = 2 and 4; WAN14B_P picks the world sizes (default "1 2 4")
      for p in ${WAN14B_P:-1 2 4}; do [ "$p" -le "$NGPU" ] || continue
        base=paper-sp; [ "$p" -eq 1 ] && base=reference
        PRESET=wan2.1-14b bench_cmp "bench14b_p$p" "$p" none "$LH" "$LW" $base,optimized,compile --no-decode --repeat 1
      done ;;
    serve)  # first-chunk latency through Triton vs in-process, 2 ranks, compile backend. Needs nvidia-pytriton,
      # tritonclient and numpy<2 (the backend stub's): scripts/fetch_gpu_wheels.sh packs them into
      # .whl_serve/site.tar.xz, unpacked here into the git-ignored .site/
      if [ -f .whl_serve/site.tar.xz ] && [ ! -d .site/pytriton ]; then mkdir -p .site && tar xJf .whl_serve/site.tar.xz -C .site; fi
      P=$(( NGPU >= 2 ? 2 : 1 ))
      (  # numpy<2 of .site only for this step (the image's scipy/transformers need its numpy 2)
        [ -d .site ] && export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
        timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 scripts/serve_latency.py --preset "$PRESET" --latent-height "$LH" \
          --latent-width "$LW" --latent-frames "$LF" --world-size "$P" --device "$DEVICE" --dtype "$DTYPE" \
          --backend compile --requests "${SERVE_REQUESTS:-5}" --json "$RES/serve_p$P.json" --server-log "$RES/tritonserver_p$P.log" \
          --trace "$RES/serve_trace_p$P" \
          >"$RES/serve_p$P.log" 2>&1
      )
      tail -n 14 "$RES/serve_p$P.log" ;;
    kernels) python3 -m pytest tests/plugins -m gpu -q -x -p no:cacheprovider >"$RES/tests_kernels.log" 2>&1
      tail -n 15 "$RES/tests_kernels.log" ;;
    enginetests)  # the export tests marked gpu (AOTInductor CUDA packages load, replay equals the uncaptured run)
      timeout -k 5 300 python3 -m pytest tests/export -m gpu -q -p no:cacheprovider >"$RES/tests_export.log" 2>&1
      tail -n 4 "$RES/tests_export.log" ;;
    demotests)  # the shipped demo model on every GPU path (bf16, compile, CUDA engines, fp8): its score (carry torchao,
      # fa3); DEMO_K selects tests (pytest -k)
      timeout -k 5 400 python3 -m pytest tests/demo -m gpu -q -s -p no:cacheprovider -rs ${DEMO_K:+-k "$DEMO_K"} >"$RES/tests_demo.log" 2>&1
      tail -n 12 "$RES/tests_demo.log" ;;
    weights)  # engines built from the preset hold exactly the parameters the runtime draws on this GPU
      eng=$(engines 480_p1 1 "$LH" "$LW")
      python3 - "$eng" "$DTYPE" <<'PY' 2>&1 | tee "$RES/weights_check.txt"
import sys, torch
from safetensors.torch import load_file
from ropesp.runtime.pipeline import load_model, resolve
from ropesp.settings import RunConfig
eng, dtype = sys.argv[1], sys.argv[2]
built = load_file(f"{eng}/weights.safetensors")
res = resolve(RunConfig.of(preset="wan2.1-1.3b", device="cuda", dtype=dtype))
run = {k: v.cpu() for k, v in load_model(res, torch.device("cuda")).state_dict().items()}
bad = [k for k in run if not torch.equal(run[k], built.get(k, torch.empty(0)))]
print(f"tensors {len(run)}, differing {len(bad)}: {bad[:8]}")
PY
      ;;
    coldstart)  # fresh `ropesp generate` processes to their first chunk: the engines (built before), then compile
      eng=$(engines 480_p1 1 "$LH" "$LW")
      bytecode
      gen=(--latent-height "$LH" --latent-width "$LW" --latent-frames "$LF" --dtype "$DTYPE" --device "$DEVICE" --output /tmp/cold.mp4 --overwrite)
      timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 scripts/cold_start.py --runs "${COLD_RUNS:-2}" --json "$RES/cold_engines.json" \
        --profile "$RES/cold_engines.prof" -- --engines "$eng" "${gen[@]}" >"$RES/cold_engines.log" 2>&1
      head -n 70 "$RES/cold_engines.log"
      python3 -X importtime scripts/first_importers.py --json "$RES/first_imports_engines.json" -- generate --engines "$eng" \
        "${gen[@]}" >"$RES/first_imports_engines.log" 2>"$RES/importtime_engines.txt"
      cat "$RES/first_imports_engines.log"
      timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 scripts/cold_start.py --json "$RES/cold_compile.json" \
        -- --backend compile --preset "$PRESET" "${gen[@]}" >"$RES/cold_compile.log" 2>&1
      head -n 3 "$RES/cold_compile.log" ;;
    coldab)  # cold start side by side: the tree ("new") against variants, each a set of files in .carry/ab/NAME/
      # (paths from the repository root) copied over the tree before each of its runs; COLD_PAIRS rounds,
      # the order rotating each round; bytecode for every variant's files is written by its first run
      eng=$(engines 480_p1 1 "$LH" "$LW")
      bytecode
      gen=(--latent-height "$LH" --latent-width "$LW" --latent-frames "$LF" --dtype "$DTYPE" --device "$DEVICE" --output /tmp/cold.mp4 --overwrite)
      variants=(new $(ls .carry/ab 2>/dev/null))
      files=$(cd .carry/ab 2>/dev/null && find . -type f -name '*.py' | sed 's|^\./[^/]*/||' | sort -u)
      mkdir -p /tmp/ab_new
      for f in $files; do mkdir -p "/tmp/ab_new/$(dirname "$f")"; cp "$f" "/tmp/ab_new/$f"; done
      for v in "${variants[@]}"; do  # a first process per variant: its bytecode, not measured
        for f in $files; do cp /tmp/ab_new/"$f" "$f"; [ -f ".carry/ab/$v/$f" ] && cp ".carry/ab/$v/$f" "$f"; done
        python3 scripts/cold_start.py --runs 1 --json "$RES/ab_warm_$v.json" -- --engines "$eng" "${gen[@]}" >>"$RES/coldab.log" 2>&1
      done
      n=${#variants[@]}
      for i in $(seq 0 $(( ${COLD_PAIRS:-5} - 1 ))); do
        for j in $(seq 0 $((n - 1))); do
          v=${variants[$(( (i + j) % n ))]}
          for f in $files; do cp /tmp/ab_new/"$f" "$f"; [ -f ".carry/ab/$v/$f" ] && cp ".carry/ab/$v/$f" "$f"; done
          python3 scripts/cold_start.py --runs 1 --json "$RES/ab_${v}_$i.json" -- --engines "$eng" "${gen[@]}" >>"$RES/coldab.log" 2>&1
        done
      done
      for f in $files; do cp /tmp/ab_new/"$f" "$f"; done
      python3 - "$RES" "${variants[@]}" <<'PY' | tee "$RES/coldab_summary.txt"
import glob, json, statistics, sys
res, variants = sys.argv[1], sys.argv[2:]
for v in variants:
    runs = [r for f in sorted(glob.glob(f"{res}/ab_{v}_[0-9]*.json")) for r in json.load(open(f))["runs"]]
    ok = [r for r in runs if r["exit_code"] == 0]
    total = [r["process_to_first_chunk_s"] for r in ok]
    if not total:
        print(f"{v}: no successful run of {len(runs)}"); continue
    setup = [r["setup_s"] for r in ok]
    chunk = [r["first_chunk_in_stream_ms"] for r in ok]
    print(f"{v:>8}: to first chunk median {statistics.median(total):.2f} s (min {min(total):.2f}, n={len(total)}) "
          f"setup {statistics.median(setup):.2f} s, first chunk in stream {statistics.median(chunk):.0f} ms; "
          + " ".join(f"{t:.2f}" for t in total))
PY
      ;;
    coldtimeline)  # fresh engines processes phase by phase (scripts/cold_timeline.py), COLD_PAIRS of them, then
      # one with the first chunk's trace
      eng=$(engines 480_p1 1 "$LH" "$LW")
      bytecode
      for i in $(seq 0 $(( ${COLD_PAIRS:-3} - 1 ))); do
        python3 scripts/cold_timeline.py --engines "$eng" --latent-frames "$LF" --device "$DEVICE" \
          --json "$RES/timeline_$i.json" >"$RES/timeline_$i.log" 2>&1
        head -n 16 "$RES/timeline_$i.log" | tr -d '\n' | cut -c1-400; echo
      done
      python3 scripts/cold_timeline.py --engines "$eng" --latent-frames "$LF" --device "$DEVICE" \
        --json "$RES/timeline_traced.json" --trace "$RES/timeline_first_chunk.json.gz" >"$RES/timeline_traced.log" 2>&1
      tail -n 22 "$RES/timeline_traced.log" ;;
    coldserve)  # Triton cold start with the engines: serve-repo --engines, tritonserver start to ready, first chunk
      if [ -f .whl_serve/site.tar.xz ] && [ ! -d .site/pytriton ]; then mkdir -p .site && tar xJf .whl_serve/site.tar.xz -C .site; fi
      eng=$(engines 480_p1 1 "$LH" "$LW")
      bytecode .site
      (
        [ -d .site ] && export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
        timeout -k 5 "${BENCH_TIMEOUT:-3000}" python3 scripts/serve_latency.py --engines "$eng" --latent-frames "$LF" \
          --requests "${SERVE_REQUESTS:-2}" --skip-in-process --json "$RES/coldserve.json" \
          --server-log "$RES/tritonserver_cold.log" >"$RES/coldserve.log" 2>&1
      )
      tail -n 30 "$RES/coldserve.log" ;;
    benchengines)  # one GPU: eager, compile, engines without and with CUDA graphs in one run
      bench_cmp bench480_p1eng 1 480 "$LH" "$LW" optimized,compile,$ENGINE_CFGS --no-decode ${BENCHENG_ARGS:-} ;;
    decodetests)  # the decoders' GPU tests: compiled channels-last VAE, the VAE on a GPU of its own (2 GPUs)
      timeout -k 5 600 python3 -m pytest tests/decode tests/runtime/test_session_overlap.py -m gpu -q -p no:cacheprovider \
        >"$RES/tests_decode.log" 2>&1; tail -n 4 "$RES/tests_decode.log" ;;
    quick)  # the fast GPU tests (model kernels, no host sync in the chunk loop), before timing anything; `tests` has all
      timeout -k 5 300 python3 -m pytest tests/model tests/runtime/test_no_host_sync.py tests/test_preview_decoder.py -m gpu -q -p no:cacheprovider \
        >"$RES/tests_quick.log" 2>&1; tail -n 4 "$RES/tests_quick.log" ;;
    fp8)  # FP8 on one GPU (carry .whl_fp8): the attention kernels at the real shapes, then bf16 / FP8 GEMMs /
      # FP8 GEMMs + FP8 attention in one bench run (FP8_ATTENTION_PROBE=0 skips the kernels)
      if [ "${FP8_ATTENTION_PROBE:-1}" = 1 ]; then
        timeout -k 5 200 python3 scripts/fp8_probe.py --parts attention --json "$RES/fp8_probe_attention.json" \
          >"$RES/fp8_probe_attention.log" 2>&1; grep -E '"candidate"' "$RES/fp8_probe_attention.log" | cut -c1-220
      fi
      bench_cmp bench480_p1fp8 1 480 "$LH" "$LW" "${FP8_CONFIGS:-compile,compile-fp8,compile-fp8attn}" --no-decode ${FP8_ARGS:-} ;;
    fp8gemm)  # the block's GEMMs alone and with their producers: bf16 against torchao float8 rowwise / tensorwise
      timeout -k 5 300 python3 scripts/fp8_probe.py --parts gemm --json "$RES/fp8_probe_gemm.json" \
        >"$RES/fp8_probe_gemm.log" 2>&1; grep -E '"variant"' "$RES/fp8_probe_gemm.log" | cut -c1-200 ;;
    profilefp8)  # one video under the profiler per precision (compile backend): bf16, FP8 GEMMs, + FP8 attention;
      # PROFILE_FP8 picks them as precision:attention pairs, PROFILE_TAG suffixes the files
      for pa in ${PROFILE_FP8:-bf16:sdpa fp8:sdpa fp8:fp8}; do
        tag=${pa/:/_}${PROFILE_TAG:-}
        timeout -k 5 400 python3 scripts/profile_chunk.py --preset "$PRESET" --backend compile --precision "${pa%%:*}" \
          --attention "${pa##*:}" --latent-height "$LH" --latent-width "$LW" --latent-frames "$LF" --dtype "$DTYPE" \
          --device "$DEVICE" --json "$RES/profile_$tag.json" --trace "$RES/trace_$tag.json.gz" \
          >"$RES/profile_$tag.log" 2>&1; tail -n 30 "$RES/profile_$tag.log"; done ;;
    fp8quality)  # final latents of one 81-frame video per mode against bf16 and fp32 (same seed and weights)
      timeout -k 5 400 python3 scripts/fp8_quality.py --preset "$PRESET" --frames 81 --modes "${FP8_MODES:-bf16,fp8,fp8attn,fp32}" \
        --json "$RES/fp8_quality.json" >"$RES/fp8_quality.log" 2>&1; tail -n 12 "$RES/fp8_quality.log" ;;
    rope) python3 scripts/bench_rope.py --json "$RES/rope.json" 2>&1 | tail -15 ;;
    stage) python3 -m torch.distributed.run --nproc-per-node "$NGPU" scripts/sp_stage_bench.py \
      --json "$RES/stage_p$NGPU.json" 2>&1 | tail -25 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "--- $step took $((SECONDS - t_step)) s"
  pack
done
echo "=== done $(date +%T)"
