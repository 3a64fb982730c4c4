"""The Gluon GEMV's two split-K tails side by side at M = 1: the tile counter and the last adder.

The counter tail (w4a16_gluon_kernel.store_split_k) ends the last program of a tile with three
dependent round trips; the last adder (store_last_adder) ends every program with one returning
atomic, its fixed point scaled from |x|₁ · max|W[n]|, at the price of every program reading all
of x. For each shape this tunes the GEMV (the last adder is a finalist variant there), then times
the chosen config with each tail, seven rounds in turns, beside bf16 cuBLAS (asymmetric, group
128; CUDA-graph replays, cold L2, timing.graph_time_ms as the tuner times). The last adder's
error is given at x's own scale and at x scaled by 2^-60 and 2^60, where a fixed-point scale of
its own would fail.

    python benchmarks/gpu_gemv_last_adder.py --out benchmarks/results/gpu_gemv_last_adder_h200
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
from lowbit.kernels import w4a16_gluon_gemv
from lowbit.kernels.autotune import chosen_config, pinned_to, with_settings
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402

ROUNDS = 7


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    dense = qweight.dequantize().to(torch.bfloat16)
    weight64 = qweight.dequantize().double()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w4a16_gluon_gemv.matmul(x, packed)  # tuned for this shape, both tails among the candidates
    tuner = w4a16_gluon_gemv._tuned()
    chosen = chosen_config(tuner, (n, k, packed.group_size, packed.symmetric))
    tails = {"counter": with_settings(chosen, {"LAST_ADDER": False})[0],
             "last adder": with_settings(chosen, {"LAST_ADDER": True})[0]}

    def pinned_call(config, x_in: torch.Tensor = x):
        def call() -> torch.Tensor:
            with pinned_to(tuner, config):
                return w4a16_gluon_gemv.matmul(x_in, packed)
        return call

    errors = {tail: relative_error(pinned_call(config)(), x.double() @ weight64.T) for tail, config in tails.items()}
    for exponent in (-60, 60):
        scaled = (x.double() * 2.0 ** exponent).to(torch.bfloat16)
        errors[f"last adder 2^{exponent}"] = relative_error(pinned_call(tails["last adder"], scaled)(),
                                                            scaled.double() @ weight64.T)
    calls = {tail: pinned_call(config) for tail, config in tails.items()}
    calls["bf16"] = lambda: x @ dense.T
    rounds = {tail: [] for tail in calls}
    for _ in range(ROUNDS):
        for tail, call in calls.items():
            rounds[tail].append(1000 * graph_time_ms(call))
    row = {"shape": name, "tuned": w4a16_gluon_gemv._describe(chosen), **{t: statistics.median(v) for t, v in rounds.items()},
           **{f"error {t}": e for t, e in errors.items()}}
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The Gluon GEMV's split-K tails, M = 1, asym g128, on {device} (torch {torch.__version__}, "
             f"triton {triton.__version__}); microseconds per call, medians of {ROUNDS} rounds in turns, CUDA-graph "
             "replays, cold L2 (benchmarks/gpu_gemv_last_adder.py). Both tails run the tuned config's tile.", "",
             "| shape | tuned | counter | last adder | last adder / counter | bf16 | bf16 / counter | bf16 / last adder "
             "| error counter | error last adder (x, x·2^-60, x·2^60) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tuned']} | {r['counter']:.1f} | {r['last adder']:.1f} | "
                     f"{r['last adder'] / r['counter']:.2f} | {r['bf16']:.1f} | {r['bf16'] / r['counter']:.2f}x | "
                     f"{r['bf16'] / r['last adder']:.2f}x | {r['error counter']:.1e} | {r['error last adder']:.1e}, "
                     f"{r['error last adder 2^-60']:.1e}, {r['error last adder 2^60']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))
