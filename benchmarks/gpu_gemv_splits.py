"""The W4A16 GEMV (M = 1) at every split-K count of one tile: what a program's fixed cost is.

The profile of the pipelined GEMV (gpu_profile_h200_pipeline.log) found the tuner's choice for
70B gate/up_proj running 224 programs, 0.42 waves, 1.74 active warps per scheduler, although
candidates with 2 to 8 times the programs were on offer. Each program stages its span of x, waits
at a barrier, fills its pipeline and adds its sums atomically, whatever the span's length. This
times one tile (`w4a16_triton.pinned_config`, no autotuning) at each split count, so the time per
call against the number of programs shows that fixed cost beside the streaming of the weight.

    python benchmarks/gpu_gemv_splits.py --out benchmarks/results/gpu_gemv_splits_h200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

CASE_SHAPES = ("70B gate/up_proj", "70B down_proj", "8B gate/up_proj")
TILES = ((512, 64, 3), (512, 32, 3))
SPLITS = (1, 2, 4, 8, 16, 32)


def time_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128),
                                                   torch.randn(n, k, device="cuda")))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weight_bytes = packed.qweight.numel() * 4 + packed.scales.numel() * 2 + packed.zeros.numel()
    kernel = w4a16_triton._autotuned(1)
    rows = []
    for block_n, block_k, stages in TILES:
        for split in SPLITS:
            config = f"1x{block_n}x{block_k} split {split} f16 pipeline {stages}"
            row = {"shape": name, "config": config, "programs": triton.cdiv(n, block_n) * split}
            # One candidate is launched as it is (no pruning), so grids the autotuner never offers
            # (too few programs for the GPU, or too many atomics) are timed too, and marked.
            row["offered"] = split == 1 or w4a16_triton._MIN_PROGRAMS <= row["programs"] <= w4a16_triton._MAX_PROGRAMS
            kernel.cache.clear()  # the pinned config is "tuned" afresh for this shape
            with w4a16_triton.pinned_config(1, config):
                w4a16_triton.matmul(x, packed)
                row["us"] = 1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed))
            row["weight_gb_per_s"] = weight_bytes / row["us"] / 1e3
            rows.append(row)
            print(row, flush=True)
    kernel.cache.clear()
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The W4A16 GEMV (M = 1, asym g128, F16_PAIRS, pipelined) at each split count of one tile, on {device} "
             f"(torch {torch.__version__}, triton {triton.__version__}); microseconds per call, CUDA-graph replays, "
             "cold L2; weight GB/s counts codes, scales and one byte per zero point.", "",
             "| shape | config | programs | offered to the autotuner | us | weight GB/s |",
             "|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['config']} | {r['programs']} | {'yes' if r['offered'] else 'no'} | "
                     f"{r['us']:.1f} | {r['weight_gb_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    args = parser.parse_args()
    run_cases(args.out, CASE_SHAPES, time_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
