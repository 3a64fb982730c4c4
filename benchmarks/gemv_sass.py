"""Static cost of lowbit's W4A16 kernels: SASS instructions per int4 code in their main loop, for sm_90.

The GEMV is issue-bound on Hopper (an H200's 1.4x bandwidth over an H100 left its time unchanged),
so instructions per code predict its speed. This compiles `_gemv_kernel` for sm_90 with Triton's
own ptxas, without a GPU, and disassembles it with the cuobjdump that Triton's wheel carries. It
declares the arguments the JIT finds aligned on model shapes (w4a16_triton.compile_for_sm90), so
the loads are vectorised as in the kernel that runs. With
the float32 unpacks the GEMV has two loops, over groups and over the K tiles of a group; a code
costs the inner loop's instructions over the codes one thread handles per tile, plus the rest of
the outer loop (the per-group scale and zero point) over the codes per group. The f16 unpack
(F16_PAIRS) has one loop, over K tiles, with the scale and zero point counted per tile. The
budget at the copy roofline on an H200 is about 3.9 (132 SMs x 128 lanes x 1.98 GHz over 8.5e12
codes/s), everything included.

    python benchmarks/gemv_sass.py --configs 1024x32 1024x64 2048x32   (needs `pip install triton`)

`--mma` does the same for the tensor-core kernel (M > 1; configs BLOCK_MxBLOCK_NxBLOCK_K, 4 warps,
4 stages, SWAP_AB), with the reshaped [BLOCK_K, BLOCK_N] tile and with PAIRED_DOTS, and also
counts its shared-memory traffic (STS/LDS/LDSM) and MMA instructions per code. `--gluon` counts
the Gluon 16-row tile (kernels/w4a16_gluon_kernel.py; configs BLOCK_NxWARPS, K span 1024) with
asymmetric zero points unpacked or folded, and symmetric weights; `--gluon-gemv` the Gluon GEMV
(configs BLOCK_NxBLOCK_KxWARPS, K span 1024) with its words one or two tiles ahead (`--ahead`),
asymmetric and symmetric (both need Triton with Gluon). `--attention` counts decode_attention's
loop over one tile of 64 cache positions (an 8B layer: 4 query heads a kv head, head_dim 128) over a
bf16 cache and over int8 and fp8 codes (kv/row_codes.py).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton

from lowbit.kernels import w4a16_triton

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
GROUP = 128


UNPACKS = ("nibble", "biased", "f16")


def gemv_opcodes_per_code(block_n: int, block_k: int, symmetric: bool, unpack: str, pipeline: int = 2,
                          warps: int = 4) -> tuple[collections.Counter, str]:
    """SASS opcodes per code of the GEMV compiled for sm_90: its K-tile loop per tile, plus the rest
    of its group loop per group (a K tile that is the whole group is unrolled into the group loop);
    and its occupancy (`occupancy`). `unpack`: one of UNPACKS. F16_PAIRS's staging of x, once per
    program before its loop, is not counted. The f16 unpack has one loop, over K tiles, software-
    pipelined `pipeline` tiles deep; its count per tile includes the scale and zero point."""
    constexprs = {"GROUP": GROUP, "SYMMETRIC": symmetric, "BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "SPLIT": True, "SWAP_AB": False, "BIASED": unpack == "biased", "F16_PAIRS": unpack == "f16",
                  "PIPELINE": pipeline}
    sass, registers, shared = compile_sm90(w4a16_triton._gemv_kernel, constexprs, warps, stages=3)
    loops = loop_opcodes(sass)
    codes_per_tile = block_n * block_k / (32 * warps)
    codes_per_group = codes_per_tile * GROUP / block_k
    outer_start, outer_end, outer = loops[-1]
    nested = [ops for start, end, ops in loops[:-1] if outer_start <= start and end <= outer_end]
    inner = nested[-1] if nested else outer
    per_code = collections.Counter({op: n / codes_per_tile for op, n in inner.items()})
    if nested:
        per_code.update({op: n / codes_per_group for op, n in (outer - inner).items()})
    return per_code, occupancy(registers, shared, warps)


def compile_sm90(kernel, constexprs: dict, warps: int, stages: int) -> tuple[str, int, int]:
    """`kernel` compiled for sm_90 with these constexprs: its SASS, registers per thread, shared bytes."""
    return disassemble(w4a16_triton.compile_for_sm90(kernel, constexprs, warps, stages))


def disassemble(compiled) -> tuple[str, int, int]:
    """A kernel compiled for sm_90: its SASS, registers per thread, shared bytes."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = [subprocess.run([str(CUOBJDUMP), flag, cubin.name], capture_output=True, text=True, check=True).stdout
                for flag in ("--dump-sass", "--dump-resource-usage")]
    registers = int(re.search(r"REG:(\d+)", dump[1]).group(1))
    return dump[0], registers, compiled.metadata.shared


def occupancy(registers: int, shared: int, warps: int) -> str:
    """Blocks (and warps) one sm_90 SM holds at once: 64K registers, allocated per warp in units of
    256; 228 KB of shared memory, 1 KB of it reserved per block; 64 warps; 32 blocks. The profile
    (gpu_profile_h200.log) found the kernels short of warps, so this is printed beside the counts."""
    by_registers = 65536 // (-(-registers * 32 // 256) * 256 * warps)
    blocks = min(by_registers, 233472 // (shared + 1024), 64 // warps, 32)
    return f"{registers} reg, {blocks} blocks ({blocks * warps} warps)"


def main_loop(kernel, constexprs: dict, warps: int, stages: int) -> tuple[collections.Counter, str]:
    """Opcode counts of `kernel`'s longest loop compiled for sm_90 with these constexprs, and its occupancy."""
    sass, registers, shared = compile_sm90(kernel, constexprs, warps, stages)
    return loop_opcodes(sass)[-1][2], occupancy(registers, shared, warps)


def loop_opcodes(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """Each loop (backward branch) of a SASS listing, shortest first: its first and last address and
    opcode counts."""
    lines = [re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*)", line)
             for line in sass.splitlines()]
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in lines if m]
    loops = [(int(target.split("0x")[1], 16), address) for address, op, target in code
             if op == "BRA" and "0x" in target and int(target.split("0x")[1], 16) < address]
    return [(start, end, collections.Counter(op.split(".")[0] for address, op, _ in code if start <= address <= end))
            for start, end in sorted(loops, key=lambda loop: loop[1] - loop[0])]


def mma_table(configs: list[str], symmetric: bool, swap: bool) -> None:
    print("| BLOCK_M x BLOCK_N x BLOCK_K | weight tile | instructions / code | shared-memory ops / code | "
          "MMA / code | largest opcodes / code | per SM |")
    print("|---|---|---:|---:|---:|---|---|")
    for config in configs:
        block_m, block_n, block_k = (int(v) for v in config.split("x"))
        codes_per_thread = block_n * block_k / 128
        for tile, flags in (("reshaped", {}), ("paired dots", {"PAIRED_DOTS": True})):
            constexprs = {"GROUP": GROUP, "SYMMETRIC": symmetric, "BLOCK_M": block_m, "BLOCK_N": block_n,
                          "BLOCK_K": block_k, "SPLIT": True, "SWAP_AB": swap, **flags}
            ops, per_sm = main_loop(w4a16_triton._mma_kernel, constexprs, warps=4, stages=4)
            shared = sum(n for op, n in ops.items() if op in ("STS", "LDS", "LDSM", "STSM"))
            mma = sum(n for op, n in ops.items() if "MMA" in op)
            top = ", ".join(f"{op} {n / codes_per_thread:.2f}" for op, n in ops.most_common(6))
            print(f"| {config} | {tile} | "
                  f"{sum(ops.values()) / codes_per_thread:.2f} | {shared / codes_per_thread:.2f} | "
                  f"{mma / codes_per_thread:.3f} | {top} | {per_sm} |", flush=True)


def gluon_loop(block_n: int, warps: int, symmetric: bool, fold_zeros: bool, k_span: int = 1024):
    """The Gluon 16-row tile (kernels/w4a16_gluon_kernel.py) compiled for sm_90 at group 128: its
    loop's opcodes per code and its occupancy (`group_loop_per_code`)."""
    from lowbit.kernels.w4a16_gluon_kernel import compile_for_sm90

    return group_loop_per_code(compile_for_sm90(block_n, k_span, GROUP, symmetric, warps, fold_zeros), block_n, warps)


def group_loop_per_code(compiled, block_n: int, warps: int) -> tuple[collections.Counter, str]:
    """A Gluon kernel's longest loop, one group a step over BLOCK_N columns (its K tiles unrolled),
    as opcodes per code, and its occupancy."""
    sass, registers, shared = disassemble(compiled)
    codes_per_thread = block_n * GROUP / (32 * warps)
    ops = loop_opcodes(sass)[-1][2]
    return collections.Counter({op: n / codes_per_thread for op, n in ops.items()}), occupancy(registers, shared, warps)


def gluon_table(configs: list[str]) -> None:
    from lowbit.kernels.w4a16_gluon_kernel import WEIGHT_MODES

    print("| BLOCK_N x warps | weights | instructions / code | largest opcodes / code | per SM |")
    print("|---|---|---:|---|---|")
    for config in configs:
        block_n, warps = (int(v) for v in config.split("x"))
        for mode, (symmetric, fold) in WEIGHT_MODES.items():
            per_code, per_sm = gluon_loop(block_n, warps, symmetric, fold)
            top = ", ".join(f"{op} {n:.2f}" for op, n in per_code.most_common(6))
            print(f"| {config} | {mode} | {sum(per_code.values()):.2f} | {top} | {per_sm} |", flush=True)


def gluon_gemv_table(configs: list[str], aheads: list[int]) -> None:
    """The Gluon GEMV's loop per code (a step is one group, its K tiles unrolled), and its
    occupancy, at K span 1024."""
    from lowbit.kernels.w4a16_gluon_kernel import compile_gemv_for_sm90

    print(f"Gluon GEMV compiled for sm_90 by Triton {triton.__version__}, group {GROUP}, K span 1024 "
          "(benchmarks/gemv_sass.py --gluon-gemv).\n")
    print("| BLOCK_N x BLOCK_K x warps | tiles ahead | weights | instructions / code | largest opcodes / code "
          "| per SM |")
    print("|---|---:|---|---:|---|---|")
    for config in configs:
        block_n, block_k, warps = (int(v) for v in config.split("x"))
        for ahead in aheads:
            for weights, symmetric in (("asymmetric", False), ("symmetric", True)):
                per_code, per_sm = group_loop_per_code(
                    compile_gemv_for_sm90(block_n, 1024, block_k, GROUP, symmetric, warps, ahead), block_n, warps)
                top = ", ".join(f"{op} {n:.2f}" for op, n in per_code.most_common(6))
                print(f"| {config} | {ahead} | {weights} | {sum(per_code.values()):.2f} | {top} | {per_sm} |",
                      flush=True)


def attention_table() -> None:
    """decode_attention's loop, one tile of BLOCK_L positions a step, per cache: instructions a
    thread, the largest opcodes, occupancy."""
    from lowbit.kernels import decode_attention

    print(f"decode_attention compiled for sm_90 by Triton {triton.__version__}: an 8B layer (4 query heads a kv "
          f"head, head_dim 128), {decode_attention.BLOCK_L} positions a tile, {decode_attention.WARPS} warps "
          "(benchmarks/gemv_sass.py --attention).\n")
    print("| cache | instructions a thread a tile | largest opcodes | per SM |")
    print("|---|---:|---|---|")
    for name, codes in (("bf16", "*bf16"), ("fp8 codes", "*fp8e4nv"), ("int8 codes", "*i8")):
        compiled = decode_attention.compile_for_sm90(codes, KV_HEADS=8, GROUP=4, GROUP_ROWS=16, DIM=128, BLOCK_D=128,
                                                     SPLITS=16, SPLITS_P2=16, GROUP_P2=4)
        sass, registers, shared = disassemble(compiled)
        ops = max((loop[2] for loop in loop_opcodes(sass)), key=lambda counts: sum(counts.values()))
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
        print(f"| {name} | {sum(ops.values())} | {top} | {occupancy(registers, shared, decode_attention.WARPS)} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=None,
                        help="BLOCK_NxBLOCK_K tiles (GEMV, 4 warps); with --mma BLOCK_MxBLOCK_NxBLOCK_K "
                        "(default 16x64x128 16x128x128 64x128x128)")
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4],
                        help="GEMV, f16 unpack: software-pipeline depths (PIPELINE)")
    parser.add_argument("--mma", action="store_true", help="the tensor-core kernel (M > 1) instead of the GEMV")
    parser.add_argument("--swap", action="store_true", help="--mma: SWAP_AB")
    parser.add_argument("--gluon", action="store_true",
                        help="the Gluon 16-row tile instead (configs BLOCK_NxWARPS, default 64x4 128x4 256x4 128x8)")
    parser.add_argument("--gluon-gemv", action="store_true",
                        help="the Gluon GEMV instead (configs BLOCK_NxBLOCK_KxWARPS, default 256x32x4 512x32x4 "
                        "512x64x8 256x64x4)")
    parser.add_argument("--ahead", type=int, nargs="+", default=[1, 2], help="--gluon-gemv: K tiles of words in flight")
    parser.add_argument("--attention", action="store_true",
                        help="decode_attention's tile loop over bf16, fp8 and int8 caches instead")
    args = parser.parse_args()
    if args.attention:
        return attention_table()
    if args.gluon_gemv:
        return gluon_gemv_table(args.configs or ["256x32x4", "512x32x4", "512x64x8", "256x64x4"], args.ahead)
    if args.gluon:
        return gluon_table(args.configs or ["64x4", "128x4", "256x4", "128x8"])
    if args.mma:
        return mma_table(args.configs or ["16x64x128", "16x128x128", "64x128x128"], args.symmetric, args.swap)
    args.configs = args.configs or ["64x128", "128x128", "256x64", "512x32", "512x64", "1024x32", "1024x64",
                                    "2048x32"]
    print("| BLOCK_N x BLOCK_K | unpack | instructions / code | largest opcodes / code | per SM |")
    print("|---|---|---:|---|---|")
    for config in args.configs:
        block_n, block_k = (int(v) for v in config.split("x"))
        variants = [(unpack, 2) for unpack in UNPACKS[:2]]
        if block_n >= w4a16_triton.F16_MIN_BLOCK_N:
            variants += [("f16", stages) for stages in args.stages]
        for unpack, stages in variants:
            per_code, per_sm = gemv_opcodes_per_code(block_n, block_k, args.symmetric, unpack, stages)
            top = ", ".join(f"{op} {n:.2f}" for op, n in per_code.most_common(6))
            name = f"f16, {stages} stages" if unpack == "f16" else unpack
            print(f"| {config} | {name} | {sum(per_code.values()):.2f} | {top} | {per_sm} |", flush=True)


if __name__ == "__main__":
    main()
