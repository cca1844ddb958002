#!/usr/bin/env bash
# the FP8 GEMMs + FP8 attention long-stream test of the shipped weights, alone
set -uo pipefail
export GIT_COMMIT=8290548
RES=/tmp/r40 DEADLINE=60 bash scripts/issue40_gpu.sh >$OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site
timeout 230 python3 -m pytest tests/demo/test_gpu.py -m gpu -q -s -p no:cacheprovider -rs -W ignore -k "long and fp8-gemm-attention" 2>&1 | grep -v "^\s*$" | tail -30
echo "=== done $SECONDS s"
