"""GPTQModel's Marlin W4A16 kernel beside bf16 cuBLAS and lowbit's kernels, on the kernel table's shapes.

GPTQModel (a peer quantizer) serves its GPTQ checkpoints on NVIDIA GPUs with Marlin, the mixed-input
kernel vLLM also uses: int4 codes pre-shuffled for the tensor cores' mma.sync fragments, streamed
through a multi-stage cp.async pipeline, with tiles of 16 to 64 rows of x. GPTQModel 7.7 compiles
it on first use from the CUDA sources in its PyPI sdist (`gptqmodel_ext/marlin`). This script builds
the same sources (bf16, sm_90 only, each file's template instantiations split across several
files so that the build runs in parallel), then for each shape and M:
  * converts lowbit's PackedInt4 (whose `qweight` is GPTQ's [K / 8, N] word layout) into Marlin's:
    the words by Marlin's own repack op, the scales and zero points permuted as Marlin's loader does;
  * checks Marlin's product against float64 dequantize-then-matmul (relative error < 1e-2);
  * times bf16 cuBLAS, lowbit's dispatcher (`w4a16_matmul`, every path installed here) and Marlin,
    symmetric (Marlin's uint4b8) and asymmetric (uint4 with zero points), as `lowbit bench kernels`
    times: CUDA-graph replays, each call on its own copy of the weight. Marlin runs as GPTQModel
    calls it: float32 reduction of split tiles, no atomic adds.

    pip download --no-deps --no-binary :all: gptqmodel==7.7.0   # then unpack it
    python benchmarks/gpu_marlin.py --source gptqmodel-7.7.0/gptqmodel_ext/marlin \\
        --keep-library marlin_bf16.so --out benchmarks/results/gpu_marlin_h200
    python benchmarks/gpu_marlin.py --library marlin_bf16.so --out ...   # a library built before
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.bench.kernels import MAX_RELATIVE_ERROR, SHAPES, BenchError, rotated_us
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_matmul
from lowbit.kernels.int4_pack import PackedInt4, pack_quantized_weight
from lowbit.kernels.w4a16 import chosen_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

OPS = "gptqmodel_marlin_bf16"
"""The torch.ops namespace Marlin's bf16 library registers (marlin_torch_bf16.cpp)."""
INSTANTIATIONS_PER_FILE = 2
SCALE_PERM = [i + 8 * j for i in range(8) for j in range(8)]
"""Marlin's column order of scales and zero points within each block of 64 columns."""
ZERO_INTERLEAVE = [0, 2, 4, 6, 1, 3, 5, 7]
"""The order of a word's eight zero points, as Marlin's dequantization reads them."""


def _scalar_type_id(mantissa: int, bias: int) -> int:
    """The id of an unsigned integer ScalarType (Marlin's core/scalar_type.hpp packs exponent 8
    bits, mantissa 8, signed 1, bias 32, finite-only 1, NaN representation 8, in that order; an
    integer type keeps the default NaN representation, IEEE 754, 1)."""
    return mantissa << 8 | bias << 17 | 1 << 50


UINT4B8 = _scalar_type_id(4, 8)
"""Codes 0..15 standing for code - 8 (GPTQ's symmetric int4)."""
UINT4 = _scalar_type_id(4, 0)
"""Codes 0..15 with zero points given per group."""


def build(source: Path, build_dir: Path, jobs: int) -> Path:
    """Marlin's bf16 library compiled for sm_90 from GPTQModel's sources; returns its path."""
    from torch.utils import cpp_extension

    work = build_dir / "src"
    shutil.copytree(source, work, dirs_exist_ok=True)
    subprocess.run([sys.executable, "generate_kernels.py"], cwd=work, check=True)
    sources = [work / name for name in ("marlin_torch_bf16.cpp", "gptq_marlin_bf16.cu", "gptq_marlin_repack.cu",
                                        "awq_marlin_repack.cu")]
    for generated in sorted(work.glob("kernel_bf16_*.cu")):
        lines = generated.read_text().splitlines()
        instantiations = [line for line in lines if line.startswith("template __global__")]
        head = lines[: lines.index(instantiations[0])]
        for i in range(0, len(instantiations), INSTANTIATIONS_PER_FILE):
            part = work / f"{generated.stem}_part{i // INSTANTIATIONS_PER_FILE:03d}.cu"
            part.write_text("\n".join(head + instantiations[i:i + INSTANTIATIONS_PER_FILE] + ["}", ""]))
            sources.append(part)
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    os.environ["MAX_JOBS"] = str(jobs)
    flags = ["-O3", "-std=c++17", "-DENABLE_BF16"]
    # nvcc 12.8 and later make a template kernel's host stub static unless told otherwise, and the
    # dispatcher launches kernels instantiated in the other files.
    cuda_flags = ["-static-global-template-stub=false", *flags, "-diag-suppress=179,39,177"]
    start = time.perf_counter()
    library = cpp_extension.load(name="lowbit_bench_marlin_bf16", sources=[str(s) for s in sources],
                                 extra_include_paths=[str(work)], extra_cflags=flags, extra_cuda_cflags=cuda_flags,
                                 build_directory=str(build_dir), is_python_module=False, verbose=False)
    print(f"built {len(sources)} files in {time.perf_counter() - start:.0f} s", flush=True)
    return Path(library)


def marlin_scales(scales: torch.Tensor) -> torch.Tensor:
    """bf16 [K / G, N] scales in Marlin's column order (SCALE_PERM within each block of 64 columns)."""
    return scales.to(torch.bfloat16).reshape(-1, 64)[:, SCALE_PERM].reshape(scales.shape).contiguous()


def marlin_zero_points(zeros: torch.Tensor) -> torch.Tensor:
    """int32 [K / G, N / 8]: zero points in SCALE_PERM's column order, each eight of them reordered
    by ZERO_INTERLEAVE and packed into one word, the first in the low nibble."""
    groups, n = zeros.shape
    ordered = zeros.to(torch.int64).reshape(-1, 64)[:, SCALE_PERM].reshape(-1, 8)[:, ZERO_INTERLEAVE]
    words = sum(ordered.reshape(groups, n // 8, 8)[..., i] << (4 * i) for i in range(8))
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()  # same bits


def marlin_weight(packed: PackedInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(Marlin's words, scales, zero points or None) for a PackedInt4 without act order: its
    `qweight` is GPTQ's word layout, which Marlin's own repack op takes."""
    no_perm = torch.empty(0, dtype=torch.int32, device=packed.qweight.device)
    words = getattr(torch.ops, OPS).gptq_marlin_repack(packed.qweight, no_perm, packed.in_features,
                                                       packed.out_features, 4)
    zeros = None if packed.zeros is None else marlin_zero_points(packed.zeros)
    return words, marlin_scales(packed.scales), zeros


def marlin_matmul(x: torch.Tensor, weight: tuple, n: int, workspace: torch.Tensor) -> torch.Tensor:
    words, scales, zeros = weight
    m, k = x.shape
    return getattr(torch.ops, OPS).gptq_marlin_gemm_bf16(
        x, None, words, None, scales, None, zeros, None, None, workspace, UINT4B8 if zeros is None else UINT4,
        m, n, k, True, False, True, False)


def run_shape(name: str, m_values: tuple[int, ...]) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    workspace = torch.zeros(max(sms, 128), dtype=torch.int32, device="cuda")
    weights = {}
    for kind, symmetric in (("sym", True), ("asym", False)):
        packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=128), weight))
        weights[kind] = (packed, marlin_weight(packed))
    dense = weights["asym"][0].dequantize().to(torch.bfloat16)
    del weight
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row = {"shape": name, "N": n, "K": k, "M": m,
               "bf16_us": rotated_us(lambda w: F.linear(x, w), dense, dense.numel() * 2)}
        for kind, (packed, marlin) in weights.items():
            ref = x.double() @ packed.dequantize().double().T
            for label, call, held, nbytes in (
                    ("lowbit", lambda w: w4a16_matmul(x, w), packed, packed.nbytes()),
                    ("marlin", lambda w: marlin_matmul(x, w, n, workspace), marlin,
                     sum(t.numel() * t.element_size() for t in marlin if t is not None))):
                error = float((call(held).double() - ref).norm() / ref.norm())
                if not error < MAX_RELATIVE_ERROR:
                    raise BenchError(f"{name} M={m} {label} {kind}: relative error {error:.2e} exceeds "
                                     f"{MAX_RELATIVE_ERROR}; the weight's conversion or the kernel is wrong")
                row[f"{label}_{kind}_us"] = rotated_us(call, held, nbytes)
                row[f"{label}_{kind}_err"] = error
            row[f"path_{kind}"] = chosen_path(x, packed)
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    from lowbit.kernels import w4a16_fbgemm

    fbgemm = w4a16_fbgemm.version() or "not installed"
    lines = [f"GPTQModel 7.7.0's Marlin (bf16, built for sm_90) beside bf16 cuBLAS and lowbit's dispatcher on "
             f"{torch.cuda.get_device_name()} (torch {torch.__version__}, fbgemm-gpu-genai {fbgemm}, which the "
             "dispatcher may choose); int4, group 128; microseconds per call "
             "(CUDA-graph replays, each call on its own weight copy; benchmarks/gpu_marlin.py). Ratios above 1: "
             "Marlin slower than lowbit.", "",
             "| shape | M | bf16 | lowbit sym | Marlin sym | lowbit asym | Marlin asym | Marlin / lowbit (asym) "
             "| bf16 / Marlin (asym) | lowbit path (asym) | err Marlin asym |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {r['lowbit_sym_us']:.1f} | "
                     f"{r['marlin_sym_us']:.1f} | {r['lowbit_asym_us']:.1f} | {r['marlin_asym_us']:.1f} | "
                     f"{r['marlin_asym_us'] / r['lowbit_asym_us']:.2f} | {r['bf16_us'] / r['marlin_asym_us']:.2f}x | "
                     f"{r['path_asym']} | {r['marlin_asym_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", type=Path, help="gptqmodel_ext/marlin of GPTQModel's unpacked sdist")
    where.add_argument("--library", type=Path, help="a Marlin library this script built before (--keep-library)")
    parser.add_argument("--keep-library", type=Path, help="copy the library built from --source here")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/lowbit_marlin_build"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help="none: build only")
    parser.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 256])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_marlin.py needs a CUDA GPU")
    if args.source:
        library = build(args.source, args.build_dir, args.jobs)
        if args.keep_library:
            shutil.copy(library, args.keep_library)
    else:
        torch.ops.load_library(str(args.library))
    run_cases(args.out, args.shapes, lambda name: run_shape(name, tuple(args.m)), markdown)


if __name__ == "__main__":
    main()
