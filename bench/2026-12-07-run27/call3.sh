#!/usr/bin/env bash
# call 3: TAEHV end to end at 480p and 720p, then the shipped weights (g) on the short GPU paths, 96 pairs
set -uo pipefail
export GIT_COMMIT=f252eef
RES=/tmp/r40c DEADLINE=230 bash scripts/issue40_gpu.sh e2e480taehv e2e720taehv >$OUT/bench.log 2>&1
export PYTHONPATH=/tmp/site
{ echo "=== demo gpu $(date +%T)"
  timeout $((500 - SECONDS)) python3 -m pytest tests/demo/test_gpu.py -m gpu -q -s -p no:cacheprovider -rs -W ignore     -k test_gpu_paths_keep_the_score 2>&1 | grep -v "^\s*$" | tail -40
  echo "=== tests done $(date +%T) $SECONDS s"; } >$OUT/tests.log 2>&1
