"""What a W4A16 GEMV call costs before it streams any weight: the floor under the small shapes.

At M = 1 the small layers sit far above their roofline (8B k/v_proj: 4.7 us against 0.5,
gpu_kernels_h200.md), as bf16 cuBLAS does (7.0 us). This times, in one process and the same way
the kernel table does (CUDA-graph replays after an L2 flush, the flush's own time subtracted):
  * a Triton kernel that only writes one value, with 1 and with 224 programs: the launch and
    scheduling floor of any kernel timed this way;
  * the GEMV on a 128 x 128 weight, one program, no split: the floor of the GEMV's own prologue
    (staging x, the first loads) and epilogue;
  * the GEMV on 8B k/v_proj's shape (1024 x 4096) with one tile pinned at splits 1 to 32: what the
    split-K tail (atomics into the workspace, the tile counter, the last program's read-back) adds
    to a call, beside the programs it brings;
  * bf16 cuBLAS on both shapes.

    python benchmarks/gpu_gemv_floor.py --out benchmarks/results/gpu_gemv_floor_h200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import save  # noqa: E402

SMALL = (1024, 4096)  # 8B k/v_proj
SPLIT_TILE = "1x64x128 split {split}"
SPLITS = (1, 2, 4, 8, 16, 32)


@triton.jit
def _one_store(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 1.0)


def _gemv_us(n: int, k: int, config: str) -> float:
    torch.manual_seed(0)
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128),
                                                   torch.randn(n, k, device="cuda")))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w4a16_triton._gemv.cache.clear()
    with w4a16_triton.pinned_config(1, config):
        us = 1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed))
    w4a16_triton._gemv.cache.clear()
    return us


def _bf16_us(n: int, k: int) -> float:
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    return 1000 * graph_time_ms(lambda: F.linear(x, weight))


def run() -> list[dict]:
    out = torch.empty(224, device="cuda")
    rows = [{"case": f"Triton kernel storing one value, {p} program{'s' if p > 1 else ''}",
             "us": 1000 * graph_time_ms(lambda p=p: _one_store[(p,)](out))} for p in (1, 224)]
    rows.append({"case": "W4A16 GEMV 128 x 128, 1x128x128 split 1", "us": _gemv_us(128, 128, "1x128x128 split 1")})
    rows.append({"case": "bf16 cuBLAS 128 x 128", "us": _bf16_us(128, 128)})
    n, k = SMALL
    for split in SPLITS:
        config = SPLIT_TILE.format(split=split)
        rows.append({"case": f"W4A16 GEMV {n} x {k}, {config} ({n // 64 * split} programs)",
                     "us": _gemv_us(n, k, config)})
    rows.append({"case": f"bf16 cuBLAS {n} x {k}", "us": _bf16_us(n, k)})
    for row in rows:
        print(row, flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The cost of a call before its weight streams, on {device} (torch {torch.__version__}, triton "
             f"{triton.__version__}): microseconds per call, CUDA-graph replays after an L2 flush, as the kernel "
             "table times them (benchmarks/gpu_gemv_floor.py).", "", "| case | us |", "|---|---:|"]
    lines += [f"| {row['case']} | {row['us']:.2f} |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    args = parser.parse_args()
    rows = run()
    text = markdown(rows, torch.cuda.get_device_name())
    save(args.out, text, rows)
    print(text)


if __name__ == "__main__":
    main()
