"""How the L2 flush before each timed call moves W4A16 and bf16 times: written or read.

kernels/timing.graph_time_ms emptied L2 before each call by writing zeros over twice its size
(until this comparison: it reads now), so each call started with L2 full of dirty lines: every line the call brings in first writes a
dirty one back to DRAM. A call reading less than L2 holds (every 8B-shaped int4 weight: 8-29 MB
against the H200's 50 MB) then moves twice its bytes through DRAM, and a bf16 weight of four
times the bytes is penalized far less in proportion. In a decode loop the lines a layer finds in
L2 were left there by the layers before it, which read their weights: clean lines, evicted for
free. This times, in one process and in turns (seven rounds, medians), bf16 cuBLAS and the W4A16
dispatcher's choice at M = 1 and 16 after three flushes: zeros written over twice L2 (the
earlier one), a read of twice L2 (the one now), and a read of four times L2 (whether twice is
enough to leave no weight line behind), each through graph_time_ms, which subtracts its time.

    python benchmarks/gpu_flush_kind.py --out benchmarks/results/gpu_flush_kind_h200
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import triton

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402

ROUNDS = 7
M_VALUES = (1, 16)


def _flushes() -> dict:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    twice = torch.zeros(2 * l2 // 4, dtype=torch.int32, device="cuda")
    four = torch.zeros(4 * l2 // 4, dtype=torch.int32, device="cuda")
    return {"write 2xL2": twice.zero_, "read 2xL2": lambda: twice.max(), "read 4xL2": lambda: four.max()}


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    dense = qweight.dequantize().to(torch.bfloat16)
    flushes = _flushes()
    rows = []
    for m in M_VALUES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        graph_time_ms(lambda: w4a16.w4a16_matmul(x, packed))  # tuned and the path chosen before timing
        calls = {"bf16": lambda: x @ dense.T, "int4": lambda: w4a16.w4a16_matmul(x, packed)}
        times = {(f, c): [] for f in flushes for c in calls}
        for _ in range(ROUNDS):
            for f, flush in flushes.items():
                for c, call in calls.items():
                    times[(f, c)].append(1000 * graph_time_ms(call, flush=flush))
        row = {"shape": name, "m": m, "path": w4a16.chosen_path(x, packed)}
        row.update({f"{c} {f}": statistics.median(t) for (f, c), t in times.items()})
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    kinds = ("write 2xL2", "read 2xL2", "read 4xL2")
    lines = [f"bf16 cuBLAS and the W4A16 dispatcher's choice (int4 g128 asym) after three L2 flushes, on {device} "
             f"(torch {torch.__version__}, triton {triton.__version__}); microseconds per call, medians of {ROUNDS} "
             "rounds in turns, CUDA-graph replays, the flush's own time subtracted (benchmarks/gpu_flush_kind.py).", "",
             "| shape | M | path | " + " | ".join(f"bf16 {k} | int4 {k} | bf16 / int4" for k in kinds) + " |",
             "|---|---:|---|" + "---:|---:|---:|" * len(kinds)]
    for r in rows:
        cells = " | ".join(f"{r['bf16 ' + k]:.1f} | {r['int4 ' + k]:.1f} | {r['bf16 ' + k] / r['int4 ' + k]:.2f}x"
                           for k in kinds)
        lines.append(f"| {r['shape']} | {r['m']} | {r['path']} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))
