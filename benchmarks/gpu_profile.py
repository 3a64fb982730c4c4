"""Hardware-counter profile of lowbit's W4A16 Triton kernels, for what timings alone cannot say.

Instruction counts (gemv_sass.py) stopped predicting the kernels' times: the tensor-core kernel at
M = 16 ran 35% fewer instructions per code for 2-6% less time, and prefetching its packed words
changed nothing. Nsight Compute's stall reasons, occupancy and DRAM throughput say what bounds
them. Each (shape, M) runs the fused-kernel config a kernel benchmark chose for it (`--bench`,
its "config_asym"; the autotuner's own picks under the profiler differed from the benchmark's),
or is autotuned where the file has no such row, outside the profiled range; then one call of
lowbit's Triton kernel and one bf16 cuBLAS matmul of the same shape run inside
cudaProfilerStart/Stop.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python benchmarks/gpu_profile.py --cases "70B gate/up_proj:1" "70B gate/up_proj:16"
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight


BENCH = Path(__file__).resolve().parent / "results" / "gpu_kernels_h200.json"


def chosen_configs(bench: Path) -> dict[tuple[str, int], str]:
    """(shape, M) -> the fused kernel's config a `lowbit bench kernels` JSON recorded (asymmetric)."""
    if not bench.is_file():
        return {}
    return {(row["shape"], row["M"]): row["config_asym"] for row in json.loads(bench.read_text())["rows"]
            if row.get("config_asym")}


def profile_case(name: str, m: int, config: str | None) -> None:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), weight))
    dense = weight.to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    with w4a16_triton.pinned_config(m, config) if config else contextlib.nullcontext():
        w4a16_triton.matmul(x, packed)  # compiles (and autotunes, without a config), unprofiled
        torch.mm(x, dense.T)
        torch.cuda.synchronize()
        chose = config or w4a16_triton.tuned_config(m, packed)
        print(f"profiled: {name} M={m}: lowbit {chose}, then bf16 cuBLAS", flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        w4a16_triton.matmul(x, packed)
        torch.mm(x, dense.T)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["70B gate/up_proj:1", "70B gate/up_proj:16"],
                        help="SHAPE:M, shapes as in lowbit bench kernels")
    parser.add_argument("--bench", type=Path, default=BENCH,
                        help="a `lowbit bench kernels` JSON whose chosen configs to profile (default: %(default)s)")
    args = parser.parse_args()
    chosen = chosen_configs(args.bench)
    for case in args.cases:
        name, m = case.rsplit(":", 1)
        profile_case(name, int(m), chosen.get((name, int(m))))


if __name__ == "__main__":
    main()
