"""Rotations on SmolLM2-135M: RTN and GPTQ with and without the Hadamard rotation (offline `hadamard`,
`quarot` with the online down_proj Hadamard) and the learned `spinquant` rotation, weight-only.

Same protocol and table as benchmarks/weight_only_methods.py (whose helpers it uses): calibration =
random windows of ../shared/data/wikitext-2/valid.txt (GPTQ and SpinQuant's training), evaluation =
the first --eval-windows 2048-token windows of test.txt, perplexity and KL(original || quantized).
Settings: w4 per channel (group 128 does not divide SmolLM2's width 576), w3 per channel, w2 g64,
all asymmetric. Bits per weight count the quantized linears only: rotations untie lm_head from the
embeddings (an extra unquantized 49152 x 576 matrix in the checkpoint), which the table does not show.

    python benchmarks/rotations.py     # writes benchmarks/results/rotations.{json,md}
    python benchmarks/rotations.py --render
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from weight_only_methods import build_parser, run  # noqa: E402  (benchmarks/ is a folder of scripts)

from lowbit.transforms.spinquant import SpinQuant  # noqa: E402

SETTINGS = "4:-1,3:-1,2:64"
METHODS = "rtn,hadamard+rtn,quarot+rtn,spinquant+rtn,gptq,hadamard+gptq,quarot+gptq,spinquant+gptq"
"""Also the run order: the cheap RTN rows of every setting first."""


def main() -> None:
    parser = build_parser(__doc__.splitlines()[0], SETTINGS, METHODS, ROOT / "benchmarks" / "results" / "rotations")
    parser.add_argument("--spinquant-steps", type=int, default=SpinQuant.steps, help="training steps of spinquant")
    args = parser.parse_args()
    args.transform_options = {"spinquant": {"steps": args.spinquant_steps}}
    run(args, METHODS.split(","), "rotations.py",
        "gptq and spinquant only; rtn, hadamard and quarot use no data")


if __name__ == "__main__":
    main()
