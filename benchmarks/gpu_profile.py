"""Hardware-counter profile of lowbit's W4A16 kernels, for what timings alone cannot say.

Instruction counts (gemv_sass.py) stopped predicting the kernels' times: the tensor-core kernel at
M = 16 ran 35% fewer instructions per code for 2-6% less time, and prefetching its packed words
changed nothing. Nsight Compute's stall reasons, occupancy and DRAM throughput say what bounds
them. Each (shape, M) runs the config a case names or else the one a kernel benchmark recorded
for it (`--bench`, its "config_asym" or "config_sym": the chosen Gluon kernel's where the
dispatcher chose one, else the fused Triton kernel's; the autotuner's own picks under the
profiler differed from the benchmark's), or the fused kernel autotuned where the file has no such
row, outside the profiled range. A config names its kernel: "1x256x32 span 256 w4" the Gluon
GEMV (M = 1), "16x128 span 1024 w4" the Gluon 16-row tile, "1x512x32 split 16 f16 pipeline 3"
the fused Triton kernels. Then one call of that kernel and one bf16 cuBLAS matmul of the same
shape run inside cudaProfilerStart/Stop.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python benchmarks/gpu_profile.py --cases "70B gate/up_proj:1" "8B gate/up_proj:16@16x128 span 1024 w8"

(add --section MemoryWorkloadAnalysis for L1, L2 and DRAM traffic).
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
    name, *fields = case.split(":")
    m, scheme = (fields[0], fields[1:]) if fields else ("", [])
    if name not in SHAPES or not m.isdigit():
        raise SystemExit(f"error: {case!r}: give SHAPE:M, SHAPE one of {', '.join(SHAPES)}")
    if scheme not in ([], ["sym"], ["asym"]):
        raise SystemExit(f"error: {case!r}: the scheme after SHAPE:M is sym or asym")
    return name, int(m), scheme == ["sym"], config or None


def kernel_of(config: str) -> str:
    """The dispatcher's path whose kernel names configs like `config` (see the module's docstring)."""
    if " span " not in config:
        return "fused"
    return "gluon-gemv" if config.startswith("1x") else "gluon"


def pinned_matmul(m: int, config: str | None):
    """(a context within which the kernel runs `config`, that kernel's matmul(x, packed))."""
    from lowbit.kernels import w4a16_gluon, w4a16_gluon_gemv

    if config is None:
        return contextlib.nullcontext(), w4a16_triton.matmul
    modules = {"gluon": w4a16_gluon, "gluon-gemv": w4a16_gluon_gemv}
    kernel = kernel_of(config)
    if kernel in modules:
        return modules[kernel].pinned_config(config), modules[kernel].matmul
    return w4a16_triton.pinned_config(m, config), w4a16_triton.matmul


def profile_case(name: str, m: int, symmetric: bool, config: str | None) -> None:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=128), weight))
    dense = weight.to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    pinned, matmul = pinned_matmul(m, config)
    with pinned:
        def calls() -> None:
            matmul(x, packed)
            torch.mm(x, dense.T)

        profile_once(calls, lambda: f"{name} M={m} {'sym' if symmetric else 'asym'}: lowbit "
                     f"{kernel_of(config) if config else 'fused'} {config or w4a16_triton.tuned_config(m, packed)}, "
                     "then bf16 cuBLAS")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["70B gate/up_proj:1", "70B gate/up_proj:16"],
                        help="SHAPE:M[:sym][@CONFIG], shapes as in lowbit bench kernels, CONFIG as its tables "
                        "name one, which names its kernel (e.g. '70B gate/up_proj:16:sym@16x128 span 1024 w4')")
    parser.add_argument("--bench", type=Path, default=BENCH,
                        help="a `lowbit bench kernels` JSON whose chosen configs to profile (default: %(default)s)")
    args = parser.parse_args()
    chosen = chosen_configs(args.bench)
    for case in args.cases:
        name, m, symmetric, config = parse_case(case)
        profile_case(name, m, symmetric, config or chosen.get((name, m, symmetric)))


if __name__ == "__main__":
    main()
