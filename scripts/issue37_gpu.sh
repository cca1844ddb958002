#!/usr/bin/env bash
# One device call for the engine core and issue 37 (many streams on one GPU): install, then the named steps
# in order, each under its own limit and all under DEADLINE seconds; results in $RES, packed into
# $OUT/results.tgz after each step (the device tool returns at most 8 files).
#
# Usage (from the repository root, wheels in .whl/): DEADLINE=540 bash scripts/issue37_gpu.sh STEP...
#   gputests   the engine's GPU tests (per-slot CUDA graphs) and the fast decoder's
#   loadfp8    scripts/load_bench.py through the demo's WebSocket: Wan-1.3B 480p, compile + FP8 GEMMs + FP8
#              attention, window 9/3, 1..4 clients
#   loadbf16   the same with bf16 compile, 1..3 clients
#   admit      FP8 with admission at 16 FPS: 5 clients, how many are admitted
#   stagger    FP8, 3 and 4 clients that join one per second: the first frame of a viewer joining the load
#   batchfp8 / batchbf16  scripts/batch_bench.py: B = 1..4 (bf16: 1..3) streams' chunks as one batched forward
#              against one stream at a time, FP8 + FP8 attention / bf16, compile + CUDA graphs, window 9/3
#   burst / burstwhole  FP8, 1 and 3 clients at once, a new viewer's first frame handed over apart (the served
#              default, burst; its round of 1 profiled into trace_fp8_n1.json.gz) / the whole first chunk
#              at once (--no-early-first-frame, burstwhole): the baseline of the same call
#   triton / tritonfp8  scripts/load_bench.py through Triton's gRPC: bf16 1..2 clients / FP8 1..3 (needs
#              .whl_serve/site.tar.xz carried, unpacked into .site/; FP8 also torchao and fa3 in /tmp/site)
#   slotmem    scripts/slot_memory.py: a KV cache slot's measured device memory (1 and 3 slots) against the
#              stated size, bf16 and FP8 attention's e4m3 cache
set -uo pipefail
DEADLINE=${DEADLINE:-540}
CHUNKS=${CHUNKS:-12}
# shellcheck source=scripts/gpu_setup.sh
. scripts/gpu_setup.sh
pack() { tar czf "$OUT/results.tgz" -C "$RES" . ; }
trap pack EXIT
WAN="--preset wan2.1-1.3b --height 480 --width 832 --local-attn-frames 9 --sink-frames 3 --backend compile"
for s in "$@"; do
  limit=$((DEADLINE - SECONDS))
  [ "$limit" -le 10 ] && { echo "=== $s skipped (deadline)"; continue; }
  echo "=== $s $(date +%T) (limit ${limit} s)"
  case $s in
    gputests) cmd="$PY -m pytest -q -m gpu tests/runtime/test_streams_gpu.py tests/decode/test_wan_fast.py -p no:cacheprovider" ;;
    loadfp8) cmd="$PY scripts/load_bench.py $WAN --precision fp8 --attention fp8 --clients 1,2,3,4 --chunks $CHUNKS --json $RES/load_fp8.json" ;;
    loadbf16) cmd="$PY scripts/load_bench.py $WAN --clients 1,2,3 --chunks $CHUNKS --json $RES/load_bf16.json" ;;
    admit) cmd="$PY scripts/load_bench.py $WAN --precision fp8 --attention fp8 --realtime-fps 16 --max-streams 5 --clients 5 --chunks 6 --json $RES/load_admit.json" ;;
    stagger) cmd="$PY scripts/load_bench.py $WAN --precision fp8 --attention fp8 --clients 3,4 --stagger 1 --chunks $CHUNKS --json $RES/load_stagger.json" ;;
    batchfp8) cmd="$PY scripts/batch_bench.py $WAN --precision fp8 --attention fp8 --batches 1,2,3,4 --chunks 6 --json $RES/batch_fp8.json" ;;
    batchbf16) cmd="$PY scripts/batch_bench.py $WAN --batches 1,2,3 --chunks 6 --json $RES/batch_bf16.json" ;;
    burst) cmd="$PY scripts/load_bench.py $WAN --precision fp8 --attention fp8 --clients 1,3 --chunks $CHUNKS --trace $RES/trace_fp8_n1.json.gz --json $RES/load_burst.json" ;;
    burstwhole) cmd="$PY scripts/load_bench.py $WAN --precision fp8 --attention fp8 --no-early-first-frame --clients 1,3 --chunks $CHUNKS --json $RES/load_burst_whole.json" ;;
    triton|tritonfp8)
      if [ -f .whl_serve/site.tar.xz ] && [ ! -d .site/pytriton ]; then mkdir -p .site && tar xJf .whl_serve/site.tar.xz -C .site; fi
      # the server's numpy < 2 first for this step only (the image's other packages need its numpy 2)
      serve="PYTHONPATH=$PWD/.site:${PYTHONPATH:-} ROPESP_TRITON_HOME=$PWD/.site $PY scripts/load_bench.py --front triton $WAN"
      if [ "$s" = triton ]; then cmd="$serve --clients 1,2 --chunks $CHUNKS --json $RES/load_triton_bf16.json"
      else cmd="$serve --precision fp8 --attention fp8 --clients 1,3 --chunks $CHUNKS --json $RES/load_triton_fp8.json"; fi ;;
    slotmem) cmd="$PY scripts/slot_memory.py --slots 1,3 --json $RES/slotmem_bf16.json && $PY scripts/slot_memory.py --precision fp8 --attention fp8 --slots 1,3 --json $RES/slotmem_fp8.json" ;;
    *) echo "unknown step $s"; continue ;;
  esac
  timeout -k 5 "$limit" bash -c "$cmd" >"$RES/$s.log" 2>&1
  echo "--- $s rc=$? after $SECONDS s"
  grep -v -E "Warning|warn\(|torchao|_pytree|^\s*$" "$RES/$s.log" | tail -n 12 | cut -c1-240
  pack
done
