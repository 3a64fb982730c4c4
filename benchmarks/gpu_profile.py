"""Hardware-counter profile of lowbit's W4A16 Triton kernels, for what timings alone cannot say.

Instruction counts (gemv_sass.py) stopped predicting the kernels' times: the tensor-core kernel at
M = 16 ran 35% fewer instructions per code for 2-6% less time, and prefetching its packed words
changed nothing. Nsight Compute's stall reasons, occupancy and DRAM throughput say what bounds
them. Each (shape, M) is autotuned first, outside the profiled range; then one call of lowbit's
Triton kernel and one bf16 cuBLAS matmul of the same shape run inside cudaProfilerStart/Stop.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python benchmarks/gpu_profile.py --cases "70B gate/up_proj:1" "70B gate/up_proj:16"
"""

from __future__ import annotations

import argparse

import torch

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight


def profile_case(name: str, m: int) -> None:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), weight))
    dense = weight.to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w4a16_triton.matmul(x, packed)  # autotunes, unprofiled
    torch.mm(x, dense.T)
    torch.cuda.synchronize()
    print(f"profiled: {name} M={m}: lowbit {w4a16_triton.tuned_config(m, packed)}, then bf16 cuBLAS", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    w4a16_triton.matmul(x, packed)
    torch.mm(x, dense.T)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["70B gate/up_proj:1", "70B gate/up_proj:16"],
                        help="SHAPE:M, shapes as in lowbit bench kernels")
    for case in parser.parse_args().cases:
        name, m = case.rsplit(":", 1)
        profile_case(name, int(m))


if __name__ == "__main__":
    main()
