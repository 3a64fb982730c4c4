#!/usr/bin/env bash
# A separate virtual environment for llm-compressor 0.14, which pins transformers<=5.17 and
# compressed-tensors 0.19 (lowbit's own environment uses newer releases). torch stays at 2.13.0,
# so both sides of a side-by-side timing run the same torch build.
set -euo pipefail
venv=${1:-"$(dirname "$0")/../.venv-llmcompressor"}
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet "llmcompressor==0.14.0.1" gguf safetensors
echo "$venv"
