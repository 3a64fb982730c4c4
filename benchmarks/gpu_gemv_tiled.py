"""The W4A16 GEMV (M = 1) on the plain word layout against the same words in column tiles.

In the plain layout ([K / 8, N] int32) a GEMV program of BLOCK_N columns reads K / 8 runs of
4·BLOCK_N bytes, N·4 bytes apart (114 KB for 70B gate/up_proj). With the words in column tiles
(`int4_pack.tile_columns`, [N / T, K / 8, T]) a program whose columns lie in one tile reads one
contiguous run. The profile of the pipelined GEMV found DRAM 71% busy against cuBLAS's 87%
(gpu_profile_h200_pipeline.log), and more programs did not help (gpu_gemv_splits_h200.md): this
says whether the access pattern is what is left.

Each layout is tuned over the whole GEMV candidate list (tiled layouts keep the tiles that divide
T), then the chosen kernels are timed again in turns, ROUNDS times, and the medians compared; the
outputs are checked against each other.

    python benchmarks/gpu_gemv_tiled.py --out benchmarks/results/gpu_gemv_tiled_h200
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight, tile_columns
from lowbit.kernels.timing import graph_time_ms

TILES = (256, 512, 1024)
ROUNDS = 7


def time_shape(name: str, symmetric: bool) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    fmt = IntegerFormat(4, symmetric=symmetric, group_size=128)
    plain = pack_quantized_weight(quantize_matrix(fmt, torch.randn(n, k, device="cuda")))
    layouts = {"plain": plain} | {f"tiles of {t}": tile_columns(plain, t) for t in TILES if n % t == 0}
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    expected = w4a16_triton.matmul(x, plain).float()
    configs, times = {}, {label: [] for label in layouts}
    for label, packed in layouts.items():
        got = w4a16_triton.matmul(x, packed).float()  # tunes this layout
        error = ((got - expected).norm() / expected.norm()).item()
        if error > 1e-2:
            raise AssertionError(f"{name} {label}: relative difference {error:.2e} from the plain layout")
        configs[label] = w4a16_triton.tuned_config(1, packed)
    for _ in range(ROUNDS):  # in turns: a drift in the GPU's clocks touches every layout alike
        for label, packed in layouts.items():
            times[label].append(1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed)))
    plain_us = statistics.median(times["plain"])
    rows = []
    for label in layouts:
        us = statistics.median(times[label])
        rows.append({"shape": name, "symmetric": symmetric, "layout": label, "config": configs[label], "us": us,
                     "plain_over_this": plain_us / us, "weight_gb_per_s": plain.nbytes() / us / 1e3})
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The W4A16 GEMV (M = 1, g128) on the plain word layout and in column tiles, on {device} "
             f"(torch {torch.__version__}, triton {triton.__version__}). Each layout tuned over every GEMV candidate, "
             f"then the choices timed in turns ({ROUNDS} rounds, medians; CUDA-graph replays, cold L2).", "",
             "| shape | zero point | layout | config | us | plain / this | weight GB/s |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {'sym' if r['symmetric'] else 'asym'} | {r['layout']} | {r['config']} | "
                     f"{r['us']:.1f} | {r['plain_over_this']:.2f}x | {r['weight_gb_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help="names from lowbit.bench.kernels.SHAPES")
    parser.add_argument("--symmetric", action="store_true", help="symmetric int4 (default: asymmetric)")
    args = parser.parse_args()
    rows = []
    for name in args.shapes:
        rows += time_shape(name, args.symmetric)
        text = markdown(rows, torch.cuda.get_device_name())
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
