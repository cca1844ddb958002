#!/usr/bin/env bash
# Wheels the GPU machines' image lacks (Python 3.12, x86-64), fetched here for the device tool to carry.
#   .whl/          diffusers (Wan VAE): installed by scripts/gpu_run.sh for every step
#   .whl_serve_a/  numpy<2 (the Triton backend stub's), tritonclient, python-rapidjson   } the `serve` step;
#   .whl_serve_b/  nvidia-pytriton (tritonserver + python backend, 52 MiB)               } over 64 MiB together,
# so they travel in two calls on one warm machine, each installed into the git-ignored .site/:
#   call 1 (carry .whl_serve_a): python3 -m pip install -q --no-index --no-deps --target .site .whl_serve_a/*.whl
#   call 2 (carry .whl_serve_b): python3 -m pip install -q --no-index --no-deps --target .site --upgrade \
#                                .whl_serve_b/*.whl && bash scripts/gpu_run.sh serve
set -euo pipefail
fetch() {  # fetch DIR SPEC...
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}
fetch .whl diffusers==0.42.1 importlib_metadata==10.2.0
fetch .whl_serve_a numpy==1.26.4 tritonclient==2.73.0 python-rapidjson
fetch .whl_serve_b nvidia-pytriton==0.7.0
du -sh .whl .whl_serve_a .whl_serve_b
