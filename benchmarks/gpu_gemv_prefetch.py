"""The W4A16 GEMV (M = 1) with and without PREFETCH, side by side, on the tile the tuner chooses.

An ncu profile of the GEMV on 8B gate/up_proj (gpu_profile_h200_gemv_8b.log) found its 896
programs, one group of K each, in a single wave, DRAM 48% busy, warps stalled mostly on global
loads: such a program is little more than one chain of round trips (x's load, its staging, the
barrier, then the words). PREFETCH (w4a16_triton._gemv_kernel) requests the first group's words
into L2 before the staging starts. For each shape this tunes the GEMV as the dispatcher would,
then times the chosen tile without and with PREFETCH in turns, seven rounds each, and reports the
medians (CUDA-graph replays, cold L2, as the kernel table times).

    python benchmarks/gpu_gemv_prefetch.py --out benchmarks/results/gpu_gemv_prefetch_h200
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
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402

ROUNDS = 7


def pinned_us(config: triton.Config, x: torch.Tensor, packed) -> float:
    """Microseconds per call of the GEMV with `config` as its only candidate."""
    kernel = w4a16_triton._gemv
    saved, kernel.configs = kernel.configs, [config]
    kernel.cache.clear()
    try:
        w4a16_triton.matmul(x, packed)
        return 1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed))
    finally:
        kernel.configs = saved
        kernel.cache.clear()


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128),
                                                   torch.randn(n, k, device="cuda")))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w4a16_triton._gemv.cache.clear()
    w4a16_triton.matmul(x, packed)
    chosen = next(iter(w4a16_triton._gemv.cache.values()))
    row = {"shape": name, "tuned": w4a16_triton._describe(chosen), "plain us": None, "prefetch us": None}
    if chosen.kwargs.get("F16_PAIRS"):
        plain, prefetch = (triton.Config({**chosen.kwargs, "PREFETCH": on}, num_warps=chosen.num_warps,
                                         num_stages=chosen.num_stages) for on in (False, True))
        times = {"plain us": [], "prefetch us": []}
        for _ in range(ROUNDS):
            for column, config in (("plain us", plain), ("prefetch us", prefetch)):  # in turns: clock drift hits both
                times[column].append(pinned_us(config, x, packed))
        row.update({column: statistics.median(t) for column, t in times.items()})
        row["config"] = w4a16_triton._describe(plain)
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The W4A16 GEMV (M = 1, asym g128) without and with PREFETCH on the tile the tuner chose, on {device} "
             f"(torch {torch.__version__}, triton {triton.__version__}); microseconds per call, medians of "
             f"{ROUNDS} rounds in turns, CUDA-graph replays, cold L2 (benchmarks/gpu_gemv_prefetch.py).", "",
             "| shape | tuned config | tile timed | without | with PREFETCH | with / without |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r["plain us"] is None:
            lines.append(f"| {r['shape']} | {r['tuned']} | - | - | - | (no F16_PAIRS tile chosen) |")
        else:
            lines.append(f"| {r['shape']} | {r['tuned']} | {r['config']} | {r['plain us']:.1f} | "
                         f"{r['prefetch us']:.1f} | {r['prefetch us'] / r['plain us']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))
