"""The Gluon GEMV's split-K tail per program or per element, on the tuner's chosen config, M = 1.

An ncu profile of the Gluon GEMV on 70B gate/up_proj (64-way split-K) put barrier stalls first,
4.32 warps per issued instruction (gpu_profile_h200_gluon.log). Per program, the tail waits at a
block-wide barrier for every warp's atomics before one thread counts the program in. Per element
(w4a16_gluon_kernel.store_split_k's PER_ELEMENT), each thread counts in its own elements after
adding them, so nothing waits for the slowest warp, at one more atomic per element. For each
shape (asymmetric, group 128) this tunes the GEMV as the dispatcher does, then times its chosen
config with each tail in turns, seven rounds each, and reports the medians (CUDA-graph replays,
cold L2, as the kernel table times), after checking each against float64 and that the split-K
workspace is left zero.

    python benchmarks/gpu_gluon_gemv_tail.py --out benchmarks/results/gpu_gluon_gemv_tail_h200
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
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402

ROUNDS = 7
GROUP = 128
TAILS = {"per program": False, "per element": True}


def launch(x: torch.Tensor, packed, config: triton.Config, per_element: bool) -> torch.Tensor:
    """x [1, K] bf16 @ Wᵀ with the Gluon GEMV at `config` and the chosen split-K tail, one launch."""
    from lowbit.kernels.w4a16_gluon_kernel import gemv_kernel

    k, n = x.shape[1], packed.out_features
    out = torch.empty(1, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = w4a16_triton.split_k_workspace(x.device, n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    grid = (n // config.kwargs["BLOCK_N"], k // config.kwargs["K_SPAN"])
    gemv_kernel[grid](x, packed.qweight, packed.scales, zeros, out, ws, counters, 1, n, k, x.stride(0),
                      packed.scales.stride(0), out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric,
                      ZERO=SYMMETRIC_ZERO, **config.kwargs, TAIL_PER_ELEMENT=per_element,
                      num_warps=config.num_warps)
    return out


def workspace_is_zero(n: int) -> bool:
    ws, counters = w4a16_triton.split_k_workspace(torch.device("cuda"), n)
    torch.cuda.synchronize()
    return not ws[:n].any() and not counters[:n].any()


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=GROUP), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qweight.dequantize().double().T
    w4a16_gluon_gemv.matmul(x, packed)  # tuned as the dispatcher tunes it
    config = w4a16_gluon_gemv.tuned_choice(packed)
    errors = {}
    for tail, per_element in TAILS.items():
        for _ in range(2):  # the second call finds the workspace the first one left
            out = launch(x, packed, config, per_element)
            errors[tail] = float((out.double() - ref).norm() / ref.norm())
            if not errors[tail] < 1e-2 or not workspace_is_zero(n):
                raise SystemExit(f"{name} {tail}: relative error {errors[tail]:.2e} or a workspace left dirty")
    rounds = {tail: [] for tail in TAILS}
    for _ in range(ROUNDS):  # in turns: a drift in the clocks touches both alike
        for tail, per_element in TAILS.items():
            rounds[tail].append(1000 * graph_time_ms(lambda p=per_element: launch(x, packed, config, p)))
    row = {"shape": name, "config": w4a16_gluon_gemv.tuned_config(packed),
           "splits": k // config.kwargs["K_SPAN"], **{f"{tail} us": statistics.median(t) for tail, t in rounds.items()},
           **{f"{tail} error": e for tail, e in errors.items()}}
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The Gluon GEMV's split-K tail per program and per element on the tuner's choice, M = 1, asym g128, on "
             f"{device} (torch {torch.__version__}, triton {triton.__version__}); microseconds per call, medians of "
             f"{ROUNDS} rounds in turns, CUDA-graph replays, cold L2 (benchmarks/gpu_gluon_gemv_tail.py).", "",
             "| shape | config | splits | per program us | per element us | per element / per program | errors |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['config']} | {r['splits']} | {r['per program us']:.1f} | "
                     f"{r['per element us']:.1f} | {r['per element us'] / r['per program us']:.2f} | "
                     f"{r['per program error']:.1e} / {r['per element error']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))
