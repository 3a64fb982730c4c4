#!/usr/bin/env bash
# `lowbit compare` on the embedded SmolLM2-135M: rtn/gptq x bits {2,3,4} x group 64 (asymmetric),
# with the peers llm-compressor GPTQ (in its own environment) and HQQ, then a screenshot of the
# HTML report in headless Chromium. Calibration: 32 x 512 tokens of wikitext-2 valid.txt (seed 0);
# evaluation: the first 8 non-overlapping 2048-token windows of test.txt. Finished cells are cached
# under the output folder's cells/, so running this again only re-renders the outputs.
#
#   LOWBIT_LLMCOMPRESSOR_PYTHON=/path/to/.venv-llmcompressor/bin/python bash benchmarks/compare_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/compare-smollm2
data=../shared/data/wikitext-2
PYTHONPATH=src python -m lowbit.cli compare --methods rtn,gptq --bits 2,3,4 --group-sizes 64 --asym \
  --calib "$data/valid.txt" --samples 32 --seq-len 512 --data "$data/test.txt" --eval-windows 8 \
  --peers "${PEERS:-llmcompressor-gptq,hqq}" --out "$out"
PYTHONPATH=src python benchmarks/screenshot_html.py "$out/report.html" "$out/report.png"
