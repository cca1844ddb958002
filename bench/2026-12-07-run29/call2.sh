#!/usr/bin/env bash
# call 2 (session 29): every GPU-marked test but the demo model's long streams (run in call 1) and its
# 96-pair paths (twenty-seventh session), on the tree of this session
set -uo pipefail
export GIT_COMMIT=acbb810
RES=$OUT . scripts/gpu_setup.sh >$OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site
timeout -k 5 300 python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs --durations=15 \
  --ignore=tests/demo/test_gpu.py >$OUT/tests_gpu.log 2>&1
echo "rc=$?" >>$OUT/tests_gpu.log
tail -n 40 $OUT/tests_gpu.log
