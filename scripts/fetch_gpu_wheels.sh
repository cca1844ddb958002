#!/usr/bin/env bash
# Packages the GPU machines' image lacks (Python 3.12, x86-64), fetched here for the device tool to carry
# (64 MiB per call in all):
#   .whl/                    av (video writing: `generate`, the cold-start steps) and diffusers (Wan VAE),
#                            installed by scripts/gpu_run.sh for every step (40 MiB)
#   .whl_fp8/                torchao, fa3-fwd, sageattention, einops (the FP8 steps, `demotests`; 30 MiB)
#   .whl_vae/                .whl/'s diffusers without its pipelines and importlib_metadata (2 MiB, scripts/make_whl_vae.py):
#                            the decoder steps' carry beside .whl_conv and .whl_fp8
#   .whl_conv/               nvidia-cudnn-frontend (cuDNN's graph API: FP8 convolutions, fp8_conv_probe.py; 12 MiB)
#   .whl_serve/site.tar.xz   numpy<2 (the Triton backend stub's), tritonclient, python-rapidjson and
#                            nvidia-pytriton (tritonserver + python backend) installed for CPython 3.12 and
#                            packed with xz (47 MiB; the wheels alone are 71 MiB); gpu_run.sh unpacks it into
#                            the git-ignored .site/ for the `serve` step
# One call carries at most 64 MiB with the tree (~15 MiB): one of the three per call; on a warm machine
# what an earlier call installed into /tmp/site stays (gpu_run.sh installs there).
set -euo pipefail
PLATFORMS=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() {  # fetch DIR SPEC...
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dir" "$@"
}
fetch .whl av==19.0.2 diffusers==0.42.1 importlib_metadata==10.2.0
fetch .whl_fp8 torchao==0.18.0 fa3-fwd==0.0.3 sageattention==1.0.6 einops==0.8.2
fetch .whl_conv nvidia-cudnn-frontend==1.32.0
python3 scripts/make_whl_vae.py
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch "$tmp/wheels" numpy==1.26.4 tritonclient==2.73.0 python-rapidjson nvidia-pytriton==0.7.0
python3 -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" --python-version 3.12 \
  --implementation cp --abi cp312 --only-binary=:all: "${PLATFORMS[@]}" "$tmp"/wheels/*.whl
# the backend stubs for other Python versions are not needed on the 3.12 machines
find "$tmp/site/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
mkdir -p .whl_serve
tar cJf .whl_serve/site.tar.xz -C "$tmp/site" .
du -sh .whl .whl_serve
