"""What the split-K tail costs the 16-row Gluon tile, and what a tail without a counter would save.

The tile is the dispatcher's path at 2-16 rows. 
At 16 rows the tile reaches 1.95x and 1.97x bf16 on 8B gate/up and down_proj, against the
issue's 2x (gpu_kernels_h200.md). At one row the tile counter and the last program's read-back
cost 1.2-2.1 us a call on the 8B shapes (gpu_gemv_anatomy_tail_h200.md). This launches the tile's
tuned config (w4a16_gluon_kernel.m16_kernel, the config the tuner chose for the shape) with four
tails in place of `store_split_k`, each in its own copy of the kernel, seven rounds in turns:
  * counter: `store_split_k` itself;
  * adds alone: the partial sums added into the workspace, nothing after (products wrong);
  * none: each split's partial sums stored straight into out, racing (products wrong);
  * last adder: gpu_gemv_tma._last_adder_tail, int64 fixed point past a count (products right;
    its precision envelope in docs/gpu_notes.md, round 17).
beside bf16 cuBLAS, at 16 rows (asymmetric, group 128; CUDA-graph replays, cold L2).

    python benchmarks/gpu_m16_tail.py --out benchmarks/results/gpu_m16_tail_h200
"""

from __future__ import annotations

import statistics
import sys
import types
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_gluon
from lowbit.kernels import w4a16_gluon_kernel as kernel_module
from lowbit.kernels.autotune import chosen_config
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms
from lowbit.kernels.w4a16_triton import split_k_workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gemv_tma import _fixed_point_workspace, _last_adder_tail  # noqa: E402
from results_file import shapes_command  # noqa: E402

ROUNDS = 7
M = 16


@gluon.jit
def _adds_alone(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, rows, cols, mask, N, stride_om,
                FINISH: ttgl.constexpr = True):
    ttgl.atomic_add(ws_ptr + rows * N + cols, acc, mask=mask, sem="relaxed")


@gluon.jit
def _none(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, rows, cols, mask, N, stride_om,
          FINISH: ttgl.constexpr = True):
    ttgl.store(out_ptr + rows * stride_om + cols, acc.to(ttgl.bfloat16), mask=mask)


@gluon.jit
def _last_adder(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, rows, cols, mask, N, stride_om,
                FINISH: ttgl.constexpr = True):
    _last_adder_tail(acc, out_ptr, ws_ptr, rows * N + cols, rows * stride_om + cols, mask)


TAILS = {"counter": kernel_module.store_split_k, "adds alone": _adds_alone, "none": _none,
         "last adder": _last_adder}


def kernel_with_tail(tail):
    """A copy of m16_kernel whose calls of `store_split_k` call `tail`: the same code over a copy of
    its module's globals, so the copies compile and cache apart and the module stays as it is."""
    fn = kernel_module.m16_kernel.fn
    namespace = {**fn.__globals__, "store_split_k": tail}
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = fn.__annotations__  # which arguments are constexprs
    return gluon.jit(copy)


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    dense = qweight.dequantize().to(torch.bfloat16)
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qweight.dequantize().double().T
    w4a16_gluon.matmul(x, packed)  # tuned for this shape
    config = chosen_config(w4a16_gluon._tuned(), (n, k, packed.group_size, packed.symmetric))
    words = w4a16_gluon.layout(packed)
    grid = (n // config.kwargs["BLOCK_N"], k // config.kwargs["K_SPAN"])

    def launcher(kernel, last_adder: bool):
        def launch() -> torch.Tensor:
            out = torch.empty(M, n, device="cuda", dtype=torch.bfloat16)
            ws, counters = split_k_workspace(x.device, M * n)
            if last_adder:
                ws = _fixed_point_workspace(x.device, M * n)
            kernel[grid](x, words, packed.scales, packed.zeros, out, ws, counters, M, n, k, x.stride(0),
                         packed.scales.stride(0), out.stride(0), GROUP=packed.group_size, SYMMETRIC=False,
                         ZERO=SYMMETRIC_ZERO, **config.kwargs, num_warps=config.num_warps)
            return out
        return launch

    kernels = {name: launcher(kernel_with_tail(tail), name == "last adder") for name, tail in TAILS.items()}
    errors = {t: float((kernels[t]().double() - ref).norm() / ref.norm()) for t in ("counter", "last adder")}
    rounds = {t: [] for t in [*TAILS, "bf16"]}
    for _ in range(ROUNDS):
        for t in TAILS:
            rounds[t].append(1000 * graph_time_ms(kernels[t]))
        rounds["bf16"].append(1000 * graph_time_ms(lambda: x @ dense.T))
    row = {"shape": name, "config": w4a16_gluon._describe(config), "counter error": errors["counter"],
           "last adder error": errors["last adder"], **{t: statistics.median(v) for t, v in rounds.items()}}
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The 16-row Gluon tile's split-K tail, M = {M}, asym g128, on {device} (torch {torch.__version__}, "
             f"triton {triton.__version__}); microseconds per call, medians of {ROUNDS} rounds in turns, CUDA-graph "
             "replays, cold L2 (benchmarks/gpu_m16_tail.py); 'adds alone' and 'none' give wrong products.", "",
             "| shape | config | counter | adds alone | none | last adder | bf16 | bf16 / counter | bf16 / last adder "
             "| error (counter / last adder) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['config']} | {r['counter']:.1f} | {r['adds alone']:.1f} | {r['none']:.1f} | "
                     f"{r['last adder']:.1f} | {r['bf16']:.1f} | {r['bf16'] / r['counter']:.2f}x | "
                     f"{r['bf16'] / r['last adder']:.2f}x | {r['counter error']:.1e} / {r['last adder error']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))
