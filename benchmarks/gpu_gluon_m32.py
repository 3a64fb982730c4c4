"""The Gluon tensor-core tile at 32 or 64 rows beside the dispatcher's choice and bf16 cuBLAS, between 17 and 64 rows.

Between 17 and 64 rows (a decode step at batch 17-64) the dispatcher has only 64-row tiles: FBGEMM's
CUTLASS kernel and lowbit's fused Triton tile, near bf16's time at 64 rows (gpu_kernels_h200.md),
while the Gluon 16-row tile, which streams each weight's words straight into the tensor cores'
B-operand registers, takes about half of bf16's at 16 rows. Here that kernel (w4a16_gluon_kernel.m16_kernel)
runs with BLOCK_M = 32 or 64: x's span staged as that many rows, each unpacked B fragment feeding
two or four MMAs; above BLOCK_M rows, as ROW_BLOCKS tiles side by side (adjacent programs read
the same words, so all but the first find them in L2). The tuner offers it the 16-row tile's candidates (spans up to 1024, so x's span
stays within 128 KB of shared memory) and finalist variants; its choice is then timed beside bf16 and the
dispatcher's other paths (the Gluon path left out, which serves up to 64 rows in the product) as
`lowbit bench kernels` times (CUDA-graph replays, a weight copy a call), every
product checked against float64 first.

    python benchmarks/gpu_gluon_m32.py --out benchmarks/results/gpu_gluon_m32_h200
    BLOCK_M=64 M_VALUES=48,64 python benchmarks/gpu_gluon_m32.py --out benchmarks/results/gpu_gluon_m64_h200
    M_VALUES=48,64 python benchmarks/gpu_gluon_m32.py --out benchmarks/results/gpu_gluon_2x32_h200
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from lowbit.bench.kernels import MAX_RELATIVE_ERROR, SHAPES, BenchError, rotated_us
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16, w4a16_gluon, w4a16_matmul
from lowbit.kernels.autotune import autotune, chosen_config
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, PackedInt4, pack_quantized_weight
from lowbit.kernels.w4a16 import chosen_path
from lowbit.kernels.w4a16_gluon_kernel import m16_kernel
from lowbit.kernels.w4a16_triton import split_k_workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402

BLOCK_M = int(os.environ.get("BLOCK_M", "32"))
M_VALUES = tuple(int(m) for m in os.environ.get("M_VALUES", "24,32").split(","))
K_SPANS = (256, 512, 1024)


@functools.cache
def tuner():
    configs = [triton.Config({"BLOCK_N": bn, "K_SPAN": span, "WARPS": warps, "FOLD_ZEROS": True, "AHEAD": 2,
                              "BLOCK_M": BLOCK_M}, num_warps=warps)
               for bn in (64, 128, 256) for span in K_SPANS for warps in (4, 8)]
    return autotune(configs, ["N", "K", "GROUP", "SYMMETRIC", "ROW_BLOCKS"], w4a16_gluon._prune, m16_kernel,
                    finalist_variants=w4a16_gluon._variants)


def gluon_rows(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [M, K] @ Wᵀ by the Gluon tile (w4a16_gluon.matmul's launch at BLOCK_M rows, ROW_BLOCKS tiles)."""
    m, k = x.shape
    blocks = triton.cdiv(m, BLOCK_M)
    n = packed.out_features
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, m * n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales  # unused when symmetric
    grid = lambda meta: (n // meta["BLOCK_N"] * blocks, k // meta["K_SPAN"])  # noqa: E731
    tuner()[grid](x, w4a16_gluon.layout(packed), packed.scales, zeros, out, ws, counters, m, n, k, x.stride(0),
                  packed.scales.stride(0), out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric,
                  ZERO=SYMMETRIC_ZERO, ROW_BLOCKS=blocks)
    return out


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128),
                                                   torch.randn(n, k, device="cuda")))
    dense = packed.dequantize().to(torch.bfloat16)
    w4a16.use_paths(*(path for path in w4a16.PATHS if path != "gluon"))
    rows = []
    for m in M_VALUES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ packed.dequantize().double().T
        row = {"shape": name, "M": m, "bf16_us": rotated_us(lambda w: F.linear(x, w), dense, dense.numel() * 2)}
        for label, call in (("dispatcher", w4a16_matmul), ("gluon", gluon_rows)):
            error = float((call(x, packed).double() - ref).norm() / ref.norm())
            if not error < MAX_RELATIVE_ERROR:
                raise BenchError(f"{name} M={m} {label}: relative error {error:.2e} exceeds {MAX_RELATIVE_ERROR}")
            row[f"{label}_us"] = rotated_us(lambda w, f=call: f(x, w), packed, packed.nbytes())
            row[f"{label}_err"] = error
        row["path"] = chosen_path(x, packed)
        blocks = triton.cdiv(m, BLOCK_M)
        config = chosen_config(tuner(), (n, k, packed.group_size, packed.symmetric, blocks))
        row["gluon_config"] = w4a16_gluon._describe(config, rows=f"{blocks}x{BLOCK_M}" if blocks > 1 else str(BLOCK_M))
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [f"The Gluon tile at {BLOCK_M} rows beside the dispatcher's other paths and bf16 cuBLAS on {torch.cuda.get_device_name()} "
             f"(torch {torch.__version__}, triton {triton.__version__}); int4 asymmetric, group 128; microseconds "
             "per call (CUDA-graph replays, a weight copy a call; benchmarks/gpu_gluon_m32.py).", "",
             f"| shape | M | bf16 | dispatcher | path | Gluon {BLOCK_M} rows | config | bf16 / Gluon | dispatcher / Gluon "
             "| error |", "|---|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {r['dispatcher_us']:.1f} | {r['path']} | "
                     f"{r['gluon_us']:.1f} | {r['gluon_config']} | {r['bf16_us'] / r['gluon_us']:.2f}x | "
                     f"{r['dispatcher_us'] / r['gluon_us']:.2f}x | {r['gluon_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_gluon_m32.py needs a CUDA GPU")
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, markdown)


if __name__ == "__main__":
    main()
