"""The Gluon 16-row tile's asymmetric weights two ways, beside symmetric ones, every config of each.

The asymmetric tile ran about 10% behind the symmetric one (70B gate/up_proj M = 16: 57.2 against
51.6 us, gpu_kernels_h200_gluon_m64.md). In the sm_90 compile, about 40 of its 334 loop
instructions per group went to the zero points: four 2-byte loads, their addresses, and the
conversions into the unpack's offset. FOLD_ZEROS first unpacked the codes as symmetric ones and
added (8 - z)·Σx to each group, x's row sums taken once while x is staged: a loop no shorter
(340), but 128 registers a thread instead of 150 (63 instead of 88 with 8 warps), so more warps
fit on an SM (gpu_gluon_zero_fold_h200.md, this script at commit 30e6277). The question is which
runs faster.

The fold now also takes the codes' bias off: they enter the MMA as 128 + q, straight from one
lop3 a register, and the correction is -(128 + z)·Σx, which drops the unpack's subtraction
(2.14 instructions per code against 2.66 at 16x128 w4, gluon_sass_sm90.md). Folding without the
bias, and symmetric weights with it, were measured beside these modes and not kept
(gpu_gluon_biased_h200.md, this script at commit 5219aee).

For each shape at M = 16, every tile the tuner would be offered (w4a16_gluon._prune) is launched
directly in each mode, checked against float64, and timed as the kernel table times (CUDA-graph
replays, cold L2); the best of each mode is reported.

    python benchmarks/gpu_gluon_zero_fold.py --out benchmarks/results/gpu_gluon_zero_fold_h200
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_gluon
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms
from lowbit.kernels.w4a16_gluon_kernel import WEIGHT_MODES, m16_kernel
from lowbit.kernels.w4a16_triton import split_k_workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402


def launch(x, packed, config, fold: bool) -> torch.Tensor:
    m, k = x.shape
    n = packed.out_features
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, m * n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    kw = config.kwargs
    m16_kernel[(n // kw["BLOCK_N"], k // kw["K_SPAN"])](
        x, w4a16_gluon.layout(packed), packed.scales, zeros, out, ws, counters, m, n, k, x.stride(0),
        packed.scales.stride(0), out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric,
        ZERO=SYMMETRIC_ZERO, num_warps=kw["WARPS"], **{**kw, "FOLD_ZEROS": fold})
    return out


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    configs = w4a16_gluon._prune(w4a16_gluon._tuned().configs, {"N": n, "K": k}, GROUP=128, SYMMETRIC=True)  # tiles
    rows = []
    for mode, (symmetric, fold) in WEIGHT_MODES.items():
        qweight = quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=128), weight)
        packed = pack_quantized_weight(qweight)
        ref = x.double() @ qweight.dequantize().double().T
        timed = []
        for config in configs:
            out = launch(x, packed, config, fold)
            error = float((out.double() - ref).norm() / ref.norm())
            if not error < 1e-2:
                raise SystemExit(f"{name} {mode} {w4a16_gluon._describe(config)}: relative error {error:.2e}")
            timed.append((1000 * graph_time_ms(lambda c=config: launch(x, packed, c, fold)), config, error))
        us, config, error = min(timed, key=lambda t: t[0])
        rows.append({"shape": name, "mode": mode, "us": us, "config": w4a16_gluon._describe(config), "error": error})
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The Gluon 16-row tile at M = 16, g128, best config of each mode (benchmarks/gpu_gluon_zero_fold.py) on "
             f"{device} (torch {torch.__version__}, triton {triton.__version__}); microseconds "
             "per call, CUDA-graph replays, cold L2; error against float64.", "",
             "| shape | mode | us | config | error | / unpacked zeros |", "|---|---|---:|---|---:|---:|"]
    base = {r["shape"]: r["us"] for r in rows if r["mode"] == "unpacked zeros"}
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['us']:.1f} | {r['config']} | {r['error']:.1e} | "
                     f"{r['us'] / base[r['shape']]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    shapes_command(__doc__.splitlines()[0], SHAPES, run_shape, lambda rows: markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
