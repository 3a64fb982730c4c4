"""The Gluon 16-row tile's variants side by side: zero points folded or unpacked, words prefetched
into registers or through a cp.async ring in shared memory; every config of each.

The asymmetric tile ran about 10% behind the symmetric one (70B gate/up_proj M = 16: 57.2 against
51.6 us, gpu_kernels_h200_gluon_m64.md). In the sm_90 compile, about 40 of its 334 loop
instructions per group went to the zero points: four 2-byte loads, their addresses, and the
conversions into the unpack's offset. With FOLD_ZEROS the codes unpack as symmetric ones and each
group adds (8 - z)·Σx, x's row sums taken once while x is staged. That loop is no shorter (340),
but it holds 128 registers a thread instead of 150 (63 instead of 88 with 8 warps), so more warps
fit on an SM. The question is which runs faster.

The words of the next groups wait in registers (3 groups live, 48 registers a thread at 16x128 w4),
or, with STAGES >= 2, stream through a ring of STAGES groups in shared memory: 95 registers a
thread instead of 128 at 16x128 span 1024 w4, but 66 KB of shared memory instead of 33 KB.
--modes picks which variants run; the first is each shape's baseline.

For each shape at M = 16, every tile the tuner would be offered (w4a16_gluon._prune) is launched
directly in each mode, checked against float64, and timed as the kernel table times (CUDA-graph
replays, cold L2); the best of each mode is reported.

    python benchmarks/gpu_gluon_variants.py --out benchmarks/results/gpu_gluon_zero_fold_h200
    python benchmarks/gpu_gluon_variants.py --modes "folded zeros" "folded zeros, ring of 3" \
        "folded zeros, ring of 4" --out benchmarks/results/gpu_gluon_stages_h200
"""

from __future__ import annotations

import argparse
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
from lowbit.kernels.w4a16_gluon_kernel import m16_kernel
from lowbit.kernels.w4a16_triton import split_k_workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

MODES = {"unpacked zeros": (False, False, 0), "folded zeros": (False, True, 0), "symmetric": (True, True, 0),
         "folded zeros, ring of 3": (False, True, 3), "folded zeros, ring of 4": (False, True, 4),
         "unpacked zeros, ring of 4": (False, False, 4)}
"""Mode -> (symmetric weight, FOLD_ZEROS, STAGES)."""
DEFAULT_MODES = ("unpacked zeros", "folded zeros", "symmetric")


def launch(x, packed, config, fold: bool, stages: int) -> torch.Tensor:
    m, k = x.shape
    n = packed.out_features
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, m * n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    kw = config.kwargs
    m16_kernel[(n // kw["BLOCK_N"], k // kw["K_SPAN"])](
        x, w4a16_gluon.layout(packed), packed.scales, zeros, out, ws, counters, m, n, k, x.stride(0),
        packed.scales.stride(0), out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric,
        ZERO=SYMMETRIC_ZERO, num_warps=kw["WARPS"], **{**kw, "FOLD_ZEROS": fold, "STAGES": stages})
    return out


def run_shape(name: str, modes: tuple[str, ...]) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    configs = w4a16_gluon._prune(w4a16_gluon._tuned().configs, {"N": n, "K": k}, GROUP=128, SYMMETRIC=True)  # tiles
    rows = []
    for mode in modes:
        symmetric, fold, stages = MODES[mode]
        qweight = quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=128), weight)
        packed = pack_quantized_weight(qweight)
        ref = x.double() @ qweight.dequantize().double().T
        timed = []
        for config in configs:
            out = launch(x, packed, config, fold, stages)
            error = float((out.double() - ref).norm() / ref.norm())
            if not error < 1e-2:
                raise SystemExit(f"{name} {mode} {w4a16_gluon._describe(config)}: relative error {error:.2e}")
            timed.append((1000 * graph_time_ms(lambda c=config: launch(x, packed, c, fold, stages)), config, error))
        us, config, error = min(timed, key=lambda t: t[0])
        rows.append({"shape": name, "mode": mode, "us": us, "config": w4a16_gluon._describe(config), "error": error})
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    first = rows[0]["mode"] if rows else ""
    lines = [f"The Gluon 16-row tile at M = 16, g128, best config of each mode (benchmarks/gpu_gluon_variants.py) on "
             f"{device} (torch {torch.__version__}, triton {triton.__version__}); microseconds "
             "per call, CUDA-graph replays, cold L2; error against float64.", "",
             f"| shape | mode | us | config | error | / {first} |", "|---|---|---:|---|---:|---:|"]
    base = {r["shape"]: r["us"] for r in rows if r["mode"] == first}
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['us']:.1f} | {r['config']} | {r['error']:.1e} | "
                     f"{r['us'] / base[r['shape']]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    args = parser.parse_args()
    run_cases(args.out, args.shapes, lambda name: run_shape(name, tuple(args.modes)),
              lambda rows: markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
