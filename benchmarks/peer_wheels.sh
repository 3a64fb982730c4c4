#!/usr/bin/env bash
# The wheels the GPU machine lacks to run llm-compressor 0.14 beside lowbit (gpu_run_all.sh's `peer`
# step), downloaded here for Python 3.12 on x86-64, to carry there and install into their own folder:
#   bash benchmarks/peer_wheels.sh .whl_peer
#   (there) python3 -m pip install --no-index --no-deps --target /tmp/llmc .whl_peer/*.whl
#   PEER_PATH=/tmp/llmc STEPS=peer bash benchmarks/gpu_run_all.sh
# Only packages missing from a CUDA image that already has torch, transformers <= 5.17, accelerate,
# pyarrow, pandas, xxhash, fsspec and huggingface-hub; --no-deps keeps that image's own copies.
set -euo pipefail
dest=${1:-.whl_peer}
mkdir -p "$dest"
for spec in llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19 \
            auto-round==0.15.1 loguru==0.7.3 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
            typing-inspection==0.4.2; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" "$spec"
done
ls "$dest"
