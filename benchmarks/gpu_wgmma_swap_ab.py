"""An experiment for M = 17-64 on Hopper: the weight as wgmma's A operand from registers, x from shared memory.

At M = 64 no lowbit path reaches 2x bf16: FBGEMM's tile and lowbit's fused tile run at 0.78-1.21x
(gpu_kernels_h200.md). A 64-row Gluon tile on mma.m16n8k16 lost every M = 64 row, because every
warp re-read all of x from shared memory (gpu_kernels_h200_gluon_m64.md). Hopper's wgmma reads its
B operand from shared memory once per warpgroup, asynchronously, and takes its A operand from
registers. So this kernel swaps the operands: outᵀ[N, M] = W[N, K] · xᵀ[K, M]. The weight's rows
are wgmma's M (64 per warpgroup), the tokens are its N (MT = 16, 32 or 64), and x's span is staged
in shared memory in the layout wgmma reads.

The A operand's registers hold, per warp, 16 rows x 16 K in mma.m16n8k16's A layout: two B-operand
fragments of 8 rows each. So w4a16_gluon's word shuffle serves unchanged: only the map from the
word's column block to warps and registers differs (`_word_layout`), and the compiler asserts the
conversion to the operand layout is a no-op.

Two ways to apply the scales, each timed with every config offered:
  * exact: each group's product lands in a float32 accumulator of its own, then is scaled (and,
    for asymmetric weights, given the zero-point term (8 - z)·Σx) into the running sum, as
    w4a16_gluon_kernel.m16_kernel does;
  * scaled A: the weights enter the MMA already scaled, bf16((q - z)·s) (one rounding per weight),
    so one accumulator runs through the span, the extra float32 FMAs go, and the zero point enters
    the unpack (two rows per thread: two offsets).
  * scaled A through shared memory: the scaled weights are stored to one of two buffers in shared
    memory and the wgmma reads them from there, asynchronously, one group's MMAs in flight while
    the next group is unpacked (register operands of an asynchronous wgmma must not be rewritten
    until it completes, which the loop could not promise; shared buffers can be waited on).
In the first two the wgmma is synchronous: the loop waits for each group's product.

Beside them, in the same process: bf16 cuBLAS and the W4A16 dispatcher's choice (every lowbit path
and FBGEMM where installed). Each result is checked against float64 dequantize-then-matmul.

    python benchmarks/gpu_wgmma_swap_ab.py --out benchmarks/results/gpu_wgmma_swap_ab_h200
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl
from triton.experimental.gluon.language.nvidia import hopper

from lowbit.bench.kernels import MAX_RELATIVE_ERROR, SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16, w4a16_gluon
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms
from lowbit.kernels.w4a16_gluon_kernel import (_barrier, _halves, _unpack, compile_gluon_for_sm90, shuffled_word_offsets,
                                              store_split_k)
from lowbit.kernels.w4a16_triton import split_k_workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

MODES = {"exact": (False, False), "scaled A": (True, False), "scaled A, shared": (True, True)}
"""Mode -> (SCALED_A, A_SHARED)."""
M_VALUES = (16, 64)
MAX_SHARED = 160 * 1024
"""x's staged span: MT rows x K_SPAN x 2 bytes, at most this."""


@gluon.constexpr_function
def _word_layout(chunks, block_n, warps):
    """Words [BLOCK_N / 8, 8, 4, chunks] held by the threads whose A-operand registers their codes
    fill: as w4a16_gluon_kernel._word_layout, but a warp owns 16 rows (the column block's bit 0 is a
    register: rows r and r + 8), warps follow each other down N, and further rows are registers."""
    regs = [[0, 0, 0, 1 << i] for i in range(chunks.bit_length() - 1)] + [[1, 0, 0, 0]]
    regs += [[2 * warps << i, 0, 0, 0] for i in range((block_n // (16 * warps)).bit_length() - 1)]
    return ttgl.DistributedLinearLayout(
        reg_bases=regs, lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]],
        warp_bases=[[2 << i, 0, 0, 0] for i in range(warps.bit_length() - 1)], block_bases=[],
        shape=[block_n // 8, 8, 4, chunks])


@gluon.jit
def _unpack_scaled(words, offset, scale):
    """_unpack's q - z, then times the scale (both halves of `scale`): one bf16 rounding per weight."""
    return ttgl.inline_asm_elementwise(
        "{ .reg .b32 t;\n"
        "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $0, $0, $5;\n mul.rn.bf16x2 $0, $0, $6;\n"
        "shr.u32 t, $4, 4;\n lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $1, $1, $5;\n"
        "mul.rn.bf16x2 $1, $1, $6;\n"
        "shr.u32 t, $4, 8;\n lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $2, $2, $5;\n"
        "mul.rn.bf16x2 $2, $2, $6;\n"
        "shr.u32 t, $4, 12;\n lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $3, $3, $5;\n"
        "mul.rn.bf16x2 $3, $3, $6;\n}",
        "=r,=r,=r,=r,r,r,r", [words, offset, scale], dtype=(ttgl.int32, ttgl.int32, ttgl.int32, ttgl.int32),
        is_pure=True, pack=1)


@gluon.jit
def _pair(bits):
    """16-bit values [nb, ni] as both halves of an int32, broadcast over [nb, ni, t, c]."""
    return ttgl.expand_dims(ttgl.expand_dims(bits | (bits << 16), 2), 3)


@gluon.jit
def swap_ab_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_sg, stride_om,
                   GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
                   MT: ttgl.constexpr, K_SPAN: ttgl.constexpr, WARPS: ttgl.constexpr, SCALED_A: ttgl.constexpr,
                   A_SHARED: ttgl.constexpr):
    """outᵀ[tile, :M] = W[tile] · x[:M]ᵀ over one span of K (split-K: `store_split_k`)."""
    CHUNKS: ttgl.constexpr = GROUP // 32
    ACC: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, MT, 16])
    A_L: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    W_L: ttgl.constexpr = _word_layout(CHUNKS, BLOCK_N, WARPS)
    Z_L: ttgl.constexpr = ttgl.SliceLayout(2, ttgl.SliceLayout(3, W_L))  # [nb, ni]: a thread's rows
    pid_n = ttgl.program_id(0)
    n0 = pid_n * BLOCK_N
    word_offs = shuffled_word_offsets(n0, BLOCK_N, CHUNKS, W_L)
    group_words = N * 4 * CHUNKS
    cols = n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(1, ACC))
    thread_rows = (n0 + ttgl.expand_dims(ttgl.arange(0, BLOCK_N // 8, layout=ttgl.SliceLayout(1, Z_L)), 1) * 8
                   + ttgl.expand_dims(ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, Z_L)), 0))
    symmetric_offset = _pair(ttgl.full([BLOCK_N // 8, 8], ZERO | 0x4300, ttgl.int32, Z_L))
    SPAN_GROUPS: ttgl.constexpr = K_SPAN // GROUP
    first = ttgl.program_id(1) * SPAN_GROUPS
    last = first + SPAN_GROUPS - 1
    w_a = ttgl.load(qw_ptr + first * group_words + word_offs)
    w_b = ttgl.load(qw_ptr + ttgl.minimum(first + 1, last) * group_words + word_offs)
    if SCALED_A:
        s_next = ttgl.load(s_ptr + first * stride_sg + thread_rows)
        if not SYMMETRIC:
            z_next = ttgl.load(z_ptr + first * stride_sg + thread_rows)
    else:
        s_next = ttgl.load(s_ptr + first * stride_sg + cols)
        if not SYMMETRIC:
            z_next = ttgl.load(z_ptr + first * stride_sg + cols).to(ttgl.float32)
    X_L: ttgl.constexpr = ttgl.BlockedLayout([1, 8], [2, 16], [WARPS, 1], [1, 0])
    xr = ttgl.arange(0, MT, layout=ttgl.SliceLayout(1, X_L))
    x_tile_offs = ttgl.expand_dims(xr, 1) * stride_xm + ttgl.expand_dims(ttgl.arange(0, GROUP, ttgl.SliceLayout(0, X_L)), 0)
    x_tile_mask = ttgl.expand_dims(xr < M, 1)
    x_smem = ttgl.allocate_shared_memory(ttgl.bfloat16, [SPAN_GROUPS, MT, GROUP],
                                         ttgl.NVMMASharedLayout.get_default_for([MT, GROUP], ttgl.bfloat16))
    FOLD: ttgl.constexpr = not SYMMETRIC and not SCALED_A
    if FOLD:
        row_sums = ttgl.allocate_shared_memory(ttgl.float32, [SPAN_GROUPS, MT],
                                               ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
    for i in ttgl.static_range(SPAN_GROUPS):
        x_tile = ttgl.load(x_ptr + (first + i) * GROUP + x_tile_offs, mask=x_tile_mask, other=0.0)
        x_smem.index(i).store(x_tile)
        if FOLD:
            row_sums.index(i).store(ttgl.sum(x_tile.to(ttgl.float32), axis=1))
    if A_SHARED:  # two groups' scaled weights: one read by the MMA in flight, one being written
        a_smem = ttgl.allocate_shared_memory(ttgl.bfloat16, [2, BLOCK_N, GROUP],
                                             ttgl.NVMMASharedLayout.get_default_for([BLOCK_N, GROUP], ttgl.bfloat16))
    hopper.fence_async_shared()  # the generic proxy's stores, before wgmma's async proxy reads them
    _barrier()
    acc = ttgl.zeros([BLOCK_N, MT], ttgl.float32, ACC)
    for g in range(0, SPAN_GROUPS):
        w_c = ttgl.load(qw_ptr + ttgl.minimum(first + g + 2, last) * group_words + word_offs)
        g_next = ttgl.minimum(first + g + 1, last)
        if SCALED_A:
            scale = _pair(s_next.to(ttgl.bfloat16).to(ttgl.int16, bitcast=True).to(ttgl.int32) & 0xFFFF)
            s_next = ttgl.load(s_ptr + g_next * stride_sg + thread_rows)
            offset = symmetric_offset
            if not SYMMETRIC:
                offset = _pair(z_next.to(ttgl.int32) | 0x4300)
                z_next = ttgl.load(z_ptr + g_next * stride_sg + thread_rows)
            r0, r1, r2, r3 = _unpack_scaled(w_a, offset, scale)
        else:
            scale = s_next.to(ttgl.float32)
            s_next = ttgl.load(s_ptr + g_next * stride_sg + cols)
            r0, r1, r2, r3 = _unpack(w_a, symmetric_offset)
        q0 = ttgl.join(_halves(r0), _halves(r1))  # [nb, ni, t, c, h, j0]
        q1 = ttgl.join(_halves(r2), _halves(r3))
        full = ttgl.permute(ttgl.join(q0, q1), (0, 1, 3, 6, 5, 2, 4))  # [nb, ni, c, j1, j0, t, h]: N, K in order
        a = ttgl.convert_layout(ttgl.reshape(full, [BLOCK_N, GROUP]), A_L, assert_trivial=True)
        x_t = x_smem.index(g).permute((1, 0))
        if A_SHARED:
            # The buffer's last reader, group g - 2's MMA, completed at the previous step's wait.
            a_smem.index(g % 2).store(a)
            hopper.fence_async_shared()
            _barrier()
            acc = hopper.warpgroup_mma(a_smem.index(g % 2), x_t, acc, is_async=True)
            acc = hopper.warpgroup_mma_wait(1, deps=[acc])
        elif SCALED_A:
            acc = hopper.warpgroup_mma(a, x_t, acc)
        else:
            part = hopper.warpgroup_mma(a, x_t, ttgl.zeros([BLOCK_N, MT], ttgl.float32, ACC), use_acc=False)
            if FOLD:
                sums = row_sums.index(g).load(ttgl.SliceLayout(0, ACC))
                part += ttgl.expand_dims(ZERO - z_next, 1) * ttgl.expand_dims(sums, 0)
                z_next = ttgl.load(z_ptr + g_next * stride_sg + cols).to(ttgl.float32)
            acc += part * ttgl.expand_dims(scale, 1)
        w_a, w_b = w_b, w_c
    if A_SHARED:
        acc = hopper.warpgroup_mma_wait(0, deps=[acc])
    tokens = ttgl.arange(0, MT, layout=ttgl.SliceLayout(0, ACC))
    store_split_k(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, ttgl.expand_dims(tokens, 0), ttgl.expand_dims(cols, 1),
                  ttgl.expand_dims(tokens < M, 0), N, stride_om)

def compile_for_sm90(config: tuple[int, int, int], mt: int, symmetric: bool, scaled_a: bool, a_shared: bool = False):
    """`swap_ab_kernel` compiled for sm_90 without a GPU (the operand-layout conversion asserted
    trivial while it compiles): for the tests."""
    block_n, warps, span = config
    return compile_gluon_for_sm90(swap_ab_kernel, {"GROUP": 128, "SYMMETRIC": symmetric, "ZERO": SYMMETRIC_ZERO,
                                                   "BLOCK_N": block_n, "MT": mt, "K_SPAN": span, "WARPS": warps,
                                                   "SCALED_A": scaled_a, "A_SHARED": a_shared}, warps)


def token_tile(m: int) -> int:
    """wgmma's N for M tokens: a power of two, 16 to 64."""
    return max(16, 1 << (m - 1).bit_length())


def configs(n: int, k: int, m: int, a_shared: bool = False) -> list[tuple[int, int, int]]:
    """(BLOCK_N, warps, K_SPAN) that fit the shape: 16 rows a warp at least, two register rows of
    warps at most, whole groups, shared memory (x's span, and the two weight buffers where the
    weights go through shared memory) within MAX_SHARED."""
    return [(block_n, warps, span) for block_n, warps, span in itertools.product((64, 128, 256), (4, 8), (128, 256, 512, 1024))
            if 16 * warps <= block_n <= 32 * warps and n % block_n == 0 and k % span == 0
            and 2 * token_tile(m) * span + (2 * 2 * block_n * 128 if a_shared else 0) <= MAX_SHARED]


def launch(x: torch.Tensor, packed, config: tuple[int, int, int], scaled_a: bool, a_shared: bool) -> torch.Tensor:
    block_n, warps, span = config
    m, k = x.shape
    n = packed.out_features
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, m * n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    swap_ab_kernel[(n // block_n, k // span)](
        x, w4a16_gluon.layout(packed), packed.scales, zeros, out, ws, counters, m, n, k, x.stride(0),
        packed.scales.stride(0), out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric,
        ZERO=SYMMETRIC_ZERO, BLOCK_N=block_n, MT=token_tile(m), K_SPAN=span, WARPS=warps, SCALED_A=scaled_a,
        A_SHARED=a_shared, num_warps=warps)
    return out


def describe(config: tuple[int, int, int], m: int) -> str:
    block_n, warps, span = config
    return f"{block_n}x{token_tile(m)} span {span} w{warps}"


def run_shape(name: str, modes: tuple[str, ...]) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    dense = qweight.dequantize().to(torch.bfloat16)
    rows = []
    for m in M_VALUES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ qweight.dequantize().double().T
        row = {"shape": name, "m": m, "bf16": 1000 * graph_time_ms(lambda: x @ dense.T),
               "dispatcher": 1000 * graph_time_ms(lambda: w4a16.w4a16_matmul(x, packed)),
               "dispatcher path": w4a16.chosen_path(x, packed)}
        for mode in modes:
            scaled_a, a_shared = MODES[mode]
            timed = []
            for config in configs(n, k, m, a_shared):
                error = float((launch(x, packed, config, scaled_a, a_shared).double() - ref).norm() / ref.norm())
                if not error < MAX_RELATIVE_ERROR:
                    raise SystemExit(f"{name} M={m} {mode} {describe(config, m)}: relative error {error:.2e}")
                timed.append((1000 * graph_time_ms(lambda c=config: launch(x, packed, c, scaled_a, a_shared)), config,
                              error))
            us, config, error = min(timed)
            row.update({mode: us, f"{mode} config": describe(config, m), f"{mode} error": error})
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    modes = [mode for mode in MODES if rows and mode in rows[0]]
    lines = [f"The swap-AB wgmma W4A16 tile (benchmarks/gpu_wgmma_swap_ab.py), int4 g128 asymmetric, best config of "
             f"each mode, on {device} (torch {torch.__version__}, triton {triton.__version__}); microseconds per "
             "call (config), CUDA-graph replays, cold L2; error against float64.", "",
             "| shape | M | bf16 cuBLAS | dispatcher (path) | " + " | ".join(modes) + " | error (" + " / ".join(modes)
             + ") | bf16 / best mode |", "|---|---:|---:|---|" + "---|" * len(modes) + "---|---:|"]
    for r in rows:
        best = min(r[mode] for mode in modes)
        cells = " | ".join(f"{r[mode]:.1f} ({r[mode + ' config']})" for mode in modes)
        errors = " / ".join(f"{r[mode + ' error']:.1e}" for mode in modes)
        lines.append(f"| {r['shape']} | {r['m']} | {r['bf16']:.1f} | {r['dispatcher']:.1f} ({r['dispatcher path']}) | "
                     f"{cells} | {errors} | {r['bf16'] / best:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    run_cases(args.out, args.shapes, lambda name: run_shape(name, tuple(args.modes)),
              lambda rows: markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
