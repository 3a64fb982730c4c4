"""The Gluon GEMV (w4a16_gluon_kernel.gemv_kernel) beside the Triton GEMV the tuner chooses, M = 1.

The Triton GEMV's pipelined loop syncs its block twice per tile, and an ncu profile on 8B
gate/up_proj put barrier stalls at 1.44 warps per issued instruction
(gpu_profile_h200_gemv_8b.log). The Gluon kernel loads into registers exactly the words each
thread multiplies, one or two tiles ahead, so its loop has no barrier, at the price of more
registers a thread. For each shape (asymmetric, group 128) this times every Gluon config the
tuner may choose (w4a16_gluon_gemv) once, then the fastest beside the Triton GEMV's tuned choice
in turns, seven rounds each, and reports the medians (CUDA-graph replays, cold L2, as the kernel table times).

    python benchmarks/gpu_gluon_gemv.py --out benchmarks/results/gpu_gluon_gemv_h200
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
from lowbit.kernels import w4a16_gluon_gemv, w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402

ROUNDS = 7
GROUP = 128


def configs(n: int, k: int) -> list[str]:
    """Every Gluon GEMV config the tuner may choose for the shape (asymmetric, group 128), by name."""
    from lowbit.kernels.autotune import every_candidate

    tuner = w4a16_gluon_gemv._tuned()
    fitting = w4a16_gluon_gemv._prune(every_candidate(tuner), {"N": n, "K": k}, GROUP=GROUP, SYMMETRIC=False)
    return [w4a16_gluon_gemv._describe(config) for config in fitting]


def launch(x: torch.Tensor, packed, config: str) -> torch.Tensor:
    """x [1, K] bf16 @ Wᵀ with the Gluon GEMV at `config`, untuned."""
    with w4a16_gluon_gemv.pinned_config(config):
        return w4a16_gluon_gemv.matmul(x, packed)


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=GROUP), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qweight.dequantize().double().T
    timed = []
    for config in configs(n, k):
        out = launch(x, packed, config)
        error = float((out.double() - ref).norm() / ref.norm())
        if not error < 1e-2:
            raise SystemExit(f"{name} {config}: relative error {error:.2e}")
        timed.append((1000 * graph_time_ms(lambda c=config: launch(x, packed, c)), config, error))
    best = min(timed)[1]
    w4a16_triton.matmul(x, packed)  # the Triton GEMV tuned for this shape
    triton_config = w4a16_triton.tuned_config(1, packed)
    rounds = {"gluon": [], "triton": []}
    for _ in range(ROUNDS):  # in turns: a drift in the clocks touches both alike
        rounds["gluon"].append(1000 * graph_time_ms(lambda: launch(x, packed, best)))
        rounds["triton"].append(1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed)))
    row = {"shape": name, "gluon config": best, "gluon us": statistics.median(rounds["gluon"]),
           "gluon error": min(timed)[2], "triton config": triton_config,
           "triton us": statistics.median(rounds["triton"])}
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The Gluon GEMV beside the Triton GEMV's tuned choice, M = 1, asym g128, on {device} (torch "
             f"{torch.__version__}, triton {triton.__version__}); microseconds per call, medians of {ROUNDS} rounds in "
             "turns, CUDA-graph replays, cold L2 (benchmarks/gpu_gluon_gemv.py); error against float64.", "",
             "| shape | Gluon config | Gluon us | error | Triton config | Triton us | Gluon / Triton |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['gluon config']} | {r['gluon us']:.1f} | {r['gluon error']:.1e} | "
                     f"{r['triton config']} | {r['triton us']:.1f} | {r['gluon us'] / r['triton us']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))
