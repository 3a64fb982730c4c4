"""GPTQ group ranges on SmolLM2-135M: fitted when the column loop reaches a group (the paper) vs fitted
up front on the original weights (static), with and without an MSE clipping search.

Same protocol and table as benchmarks/weight_only_methods.py (whose helpers it uses): calibration =
random windows of ../shared/data/wikitext-2/valid.txt, evaluation = the first --eval-windows
2048-token windows of test.txt, perplexity and KL(original || quantized); all asymmetric g64, the
settings of benchmarks/results/compare-smollm2 (where llm-compressor's GPTQ, which fits static
min/max ranges, is the peer). The integer schemes (`--scheme w4a16`...) use gptq-static-mse.

    python benchmarks/gptq_ranges.py --samples 32     # writes benchmarks/results/gptq_ranges.{json,md}
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from weight_only_methods import build_parser, run  # noqa: E402  (benchmarks/ is a folder of scripts)

SETTINGS = "2:64,3:64,4:64"
METHODS = "gptq,gptq-static,gptq-static-mse"


def main() -> None:
    args = build_parser(__doc__.splitlines()[0], SETTINGS, METHODS,
                        ROOT / "benchmarks" / "results" / "gptq_ranges").parse_args()
    run(args, METHODS.split(","), "gptq_ranges.py", "every row")


if __name__ == "__main__":
    main()
