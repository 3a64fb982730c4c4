"""What the zero point costs lowbit's W4A16 Triton kernel, config by config.

The kernel table had the asymmetric kernel slower than the symmetric one at M = 16 (70B
gate/up_proj: 92.6 against 73.4 us, gpu_kernels_h200_folded.md), and its profile (same config,
gpu_profile_h200_zero.log) more registers and more time waiting on shared memory. This times one
config at a time (`w4a16_triton.pinned_config`, no autotuning) on the same weight three ways:
symmetric, asymmetric with uint8 zero points, and asymmetric with the zero points in the scales'
dtype (float16; the kernels load either), so the cost of loading and converting the zero points
shows apart from that of using them. The packed layout keeps float16 since these figures
(gpu_zero_points_h200_bits.md).

    python benchmarks/gpu_zero_points.py --out benchmarks/results/gpu_zero_points_h200
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

CASES = [("70B gate/up_proj", 16, "16x64x128 split 2 paired"),
         ("8B gate/up_proj", 16, "16x64x128 split 4 paired"),
         ("70B gate/up_proj", 1, "1x512x32 split 16 f16 pipeline 2")]


def time_case(name: str, m: int, config: str) -> dict:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    variants = {}
    for symmetric in (True, False):
        packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=128), weight))
        if symmetric:
            variants["sym"] = packed
        else:
            variants["asym uint8 zeros"] = dataclasses.replace(packed, zeros=packed.zeros.to(torch.uint8))
            variants["asym float16 zeros"] = dataclasses.replace(packed, zeros=packed.zeros.to(packed.scales.dtype))
    row, outputs = {"shape": name, "M": m, "config": config}, {}
    with w4a16_triton.pinned_config(m, config):
        for label, packed in variants.items():
            outputs[label] = w4a16_triton.matmul(x, packed)
            row[f"{label} us"] = 1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed))
    row["asym outputs equal"] = bool(torch.equal(outputs["asym uint8 zeros"], outputs["asym float16 zeros"]))
    return row


def markdown(rows: list[dict], device: str) -> str:
    labels = ["sym us", "asym uint8 zeros us", "asym float16 zeros us"]
    lines = [f"Zero-point cost of the W4A16 Triton kernel on {device} (torch {torch.__version__}); microseconds "
             "per call, CUDA-graph replays, cold L2; each row one pinned config.", "",
             "| shape | M | config | " + " | ".join(labels) + " | asym uint8 / sym | asym float16 / sym | outputs equal |",
             "|---|---:|---|" + "---:|" * (len(labels) + 2) + "---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['config']} | " + " | ".join(f"{r[l]:.1f}" for l in labels)
                     + f" | {r['asym uint8 zeros us'] / r['sym us']:.2f}x | {r['asym float16 zeros us'] / r['sym us']:.2f}x"
                     f" | {'yes' if r['asym outputs equal'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    args = parser.parse_args()

    def case_rows(case: tuple) -> list[dict]:
        row = time_case(*case)
        print(row, flush=True)
        return [row]

    run_cases(args.out, CASES, case_rows, lambda rows: markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
