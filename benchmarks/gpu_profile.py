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

`--gluon "70B gate/up_proj@16x128 span 1024 w4"` also profiles lowbit's Gluon kernel for M <= 16
(kernels/w4a16_gluon.py) at M = 16 with that config, as its tuned_config() names it (add
--section MemoryWorkloadAnalysis for L1, L2 and DRAM traffic).
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
        def calls() -> None:
            w4a16_triton.matmul(x, packed)
            torch.mm(x, dense.T)

        profile_once(calls, lambda: f"{name} M={m} {'sym' if symmetric else 'asym'}: "
                     f"lowbit {config or w4a16_triton.tuned_config(m, packed)}, then bf16 cuBLAS")


def profile_once(calls, label) -> None:
    """`calls` once unprofiled (it compiles, autotunes, builds layouts), then once inside
    cudaProfilerStart/Stop, which is all ncu sees with --profile-from-start off; `label()`, asked
    after the first call (a tuned config is known then), says what was profiled."""
    calls()
    torch.cuda.synchronize()
    print(f"profiled: {label()}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    calls()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def parse_gluon_case(case: str) -> tuple[str, str]:
    """"SHAPE@CONFIG" -> shape, the Gluon kernel's config as its tuned_config() names it."""
    name, _, config = case.partition("@")
    if name not in SHAPES or not config:
        raise SystemExit(f"error: {case!r}: give SHAPE@CONFIG, e.g. '70B gate/up_proj@16x128 span 1024 w4', "
                         f"SHAPE one of {', '.join(SHAPES)}")
    return name, config


def profile_gluon_case(name: str, config: str) -> None:
    from lowbit.kernels import w4a16_gluon

    n, k = SHAPES[name]
    torch.manual_seed(0)
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128),
                                                   torch.randn(n, k, device="cuda")))
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    with w4a16_gluon.pinned_config(config):
        profile_once(lambda: w4a16_gluon.matmul(x, packed), lambda: f"{name} M=16 asym: lowbit Gluon {config}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["70B gate/up_proj:1", "70B gate/up_proj:16"],
                        help="SHAPE:M[:sym][@CONFIG], shapes as in lowbit bench kernels, CONFIG as its tables "
                        "name one (e.g. '70B gate/up_proj:16:sym@16x64x128 split 2 paired')")
    parser.add_argument("--bench", type=Path, default=BENCH,
                        help="a `lowbit bench kernels` JSON whose chosen configs to profile (default: %(default)s)")
    parser.add_argument("--gluon", nargs="*", default=[],
                        help="SHAPE@CONFIG: also profile lowbit's Gluon kernel at M = 16 with this config "
                        "(e.g. '70B gate/up_proj@16x128 span 1024 w4')")
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
