#!/usr/bin/env bash
# The AutoRound peer of `lowbit compare` on the embedded SmolLM2-135M, beside lowbit's RTN at the same
# scheme (w4 asym g64). A CPU-sized proof run: AutoRound's iterations come from LOWBIT_AUTOROUND_ITERS
# (default here 10; AutoRound's own default is 200) and calibration is ${SAMPLES:-8} x 512 tokens of
# wikitext-2 valid.txt (seed 0); evaluation is the same as benchmarks/compare_smollm2.sh (the first 8
# non-overlapping 2048-token windows of test.txt), so the original's cached cell from that run is reused.
#
#   bash benchmarks/compare_smollm2_autoround.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/compare-smollm2-autoround
data=../shared/data/wikitext-2
mkdir -p "$out/cells"
cp -n benchmarks/results/compare-smollm2/cells/*.json "$out/cells/" 2>/dev/null || true
LOWBIT_AUTOROUND_ITERS="${LOWBIT_AUTOROUND_ITERS:-10}" PYTHONPATH=src python -m lowbit.cli compare \
  --methods rtn --bits 4 --group-sizes 64 --asym \
  --calib "$data/valid.txt" --samples "${SAMPLES:-8}" --seq-len 512 --data "$data/test.txt" --eval-windows 8 \
  --peers autoround --out "$out"
