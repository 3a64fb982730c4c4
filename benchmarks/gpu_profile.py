"""Hardware-counter profile of lowbit's W4A16 Triton kernels, for what timings alone cannot say.

Instruction counts (gemv_sass.py) stopped predicting the kernels' times: the tensor-core kernel at
M = 16 ran 35% fewer instructions per code for 2-6% less time, and prefetching its packed words
changed nothing. Nsight Compute's stall reasons, occupancy and DRAM throughput say what bounds
them. Each (shape, M) runs the config a case names or else the fused-kernel config a kernel
benchmark chose for it (`--bench`, its "config_asym" or "config_sym"; the autotuner's own picks
under the profiler differed from the benchmark's), or is autotuned where the file has no such
row, outside the profiled range; then one call of
lowbit's Triton kernel and one bf16 cuBLAS matmul of the same shape run inside
cudaProfilerStart/Stop.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python benchmarks/gpu_profile.py --cases "70B gate/up_proj:1" "70B gate/up_proj:16"

`--gluon "70B gate/up_proj@64:8"` also profiles the Gluon prototype of gpu_gluon_m16.py at M = 16
with that BLOCK_N and split (and ":STAGES" for its cp.async variant): with a Triton tile at half
its instructions per code yet within 17% of its time, what bounds the 16-row tile is a question
for the counters (add --section MemoryWorkloadAnalysis for L1, L2 and DRAM traffic).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the Gluon cases import gpu_gluon_m16 from here
BENCH = Path(__file__).resolve().parent / "results" / "gpu_kernels_h200.json"


def chosen_configs(bench: Path) -> dict[tuple[str, int, bool], str]:
    """(shape, M, symmetric) -> the fused kernel's config a `lowbit bench kernels` JSON recorded."""
    if not bench.is_file():
        return {}
    return {(row["shape"], row["M"], symmetric): row[f"config_{scheme}"] for row in json.loads(bench.read_text())["rows"]
            for symmetric, scheme in ((True, "sym"), (False, "asym")) if row.get(f"config_{scheme}")}


def parse_case(case: str) -> tuple[str, int, bool, str | None]:
    """"SHAPE:M[:sym][@CONFIG]" -> shape, M, symmetric, the config asked for (None: the bench's)."""
    case, _, config = case.partition("@")
    name, m, *scheme = case.split(":")
    if scheme not in ([], ["sym"], ["asym"]):
        raise SystemExit(f"error: {case!r}: the scheme after SHAPE:M is sym or asym")
    return name, int(m), scheme == ["sym"], config or None


def profile_case(name: str, m: int, symmetric: bool, config: str | None) -> None:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=128), weight))
    dense = weight.to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    with w4a16_triton.pinned_config(m, config) if config else contextlib.nullcontext():
        w4a16_triton.matmul(x, packed)  # compiles (and autotunes, without a config), unprofiled
        torch.mm(x, dense.T)
        torch.cuda.synchronize()
        chose = config or w4a16_triton.tuned_config(m, packed)
        print(f"profiled: {name} M={m} {'sym' if symmetric else 'asym'}: lowbit {chose}, then bf16 cuBLAS", flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        w4a16_triton.matmul(x, packed)
        torch.mm(x, dense.T)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def parse_gluon_case(case: str) -> tuple[str, int, int, int]:
    """"SHAPE@BLOCK_N:SPLIT[:STAGES]" -> shape, BLOCK_N, split, stages (0: the register prefetch)."""
    name, _, config = case.partition("@")
    values = config.split(":")
    if name not in SHAPES or len(values) not in (2, 3) or not all(v.isdigit() for v in values):
        raise SystemExit(f"error: {case!r}: give SHAPE@BLOCK_N:SPLIT[:STAGES], SHAPE one of {', '.join(SHAPES)}")
    block_n, split, stages = (int(v) for v in values + ["0"] * (3 - len(values)))
    return name, block_n, split, stages


def profile_gluon_case(name: str, block_n: int, split: int, stages: int) -> None:
    import gpu_gluon_m16 as gluon  # needs Triton's Gluon: imported only when a Gluon case is asked for

    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    words = gluon.shuffle_words(qweight.codes)
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    gluon.matmul(x, words, packed.scales, packed.zeros, n, k, block_n, split, stages)  # compiles, unprofiled
    torch.cuda.synchronize()
    print(f"profiled: {name} M=16 asym: Gluon prototype BLOCK_N {block_n} split {split} stages {stages}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    gluon.matmul(x, words, packed.scales, packed.zeros, n, k, block_n, split, stages)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["70B gate/up_proj:1", "70B gate/up_proj:16"],
                        help="SHAPE:M[:sym][@CONFIG], shapes as in lowbit bench kernels, CONFIG as its tables "
                        "name one (e.g. '70B gate/up_proj:16:sym@16x64x128 split 2 paired')")
    parser.add_argument("--bench", type=Path, default=BENCH,
                        help="a `lowbit bench kernels` JSON whose chosen configs to profile (default: %(default)s)")
    parser.add_argument("--gluon", nargs="*", default=[],
                        help="SHAPE@BLOCK_N:SPLIT[:STAGES]: also profile the Gluon prototype of "
                        "gpu_gluon_m16.py at M = 16 with this config")
    args = parser.parse_args()
    gluon_cases = [parse_gluon_case(case) for case in args.gluon]
    chosen = chosen_configs(args.bench)
    for case in args.cases:
        name, m, symmetric, config = parse_case(case)
        profile_case(name, m, symmetric, config or chosen.get((name, m, symmetric)))
    for case in gluon_cases:
        profile_gluon_case(*case)


if __name__ == "__main__":
    main()
