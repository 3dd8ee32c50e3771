#!/usr/bin/env bash
# Download (here, with internet) the wheels that scripts/gpu_pretrain.sh installs offline on the GPU
# machine (Python 3.12, torch/transformers preinstalled, no diffusers, no internet).
# diffusers, peft and accelerate are pure Python; diffusers also needs requests, filelock and
# importlib_metadata at import time, which a torch + transformers 5 install may lack, so those
# come too (gpu_pretrain.sh installs each only where it is missing).
# Usage: scripts/fetch_wheels.sh [DEST]   (default: wheels/)
set -euo pipefail
dest="${1:-wheels}"
mkdir -p "$dest"
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$dest")
pip download "${common[@]}" \
    diffusers==0.42.1 peft==0.21.2 accelerate==1.15.0 \
    requests urllib3 idna certifi charset-normalizer filelock importlib_metadata zipp
ls -l "$dest"
