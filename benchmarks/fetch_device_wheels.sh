#!/usr/bin/env bash
# Download, on a machine with pip and network, the wheels the GPU machines lack (their image has torch, triton,
# transformers, accelerate, peft, pandas, pyarrow, xxhash; not trl, fla, datasets, rouge, rapidfuzz: LongBench scoring, evaluate: the shipped metric module): into .whl/, which
# benchmarks/gpu_env.sh installs there. transformers: the image's 5.17 is below our 5.19 floor. Not huggingface_hub 2.x: it
# imports httpx2, which the image lacks (its hub 1.33 serves transformers 5.23). Carry `.whl` in the device call (about 3 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 flash-linear-attention==0.6.0 fla-core==0.6.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  rouge==1.0.1 evaluate==0.4.6 rapidfuzz==3.14.6 transformers==5.23.0 regex==2026.11.19
ls .whl
