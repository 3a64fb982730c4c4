"""A Gluon W4A16 kernel for M <= 16 whose unpacked weights are already the tensor cores' operand.

Question: is the 16-row tensor-core tile (w4a16_triton's paired dots, about 4.9 SASS instructions
per int4 code, mma_sass_sm90.md) bound by those instructions? Triton chooses the register layout of
the unpacked weights and converts them to the MMA operand's layout (PRMT, shared memory). Here,
with Gluon's explicit layouts, the words are shuffled once (`shuffle_words`) so that each thread
loads exactly the words whose codes fill its mma.m16n8k16 B-operand registers: one lop3 and one
sub.bf16x2 turn a word's nibbles j and j + 4 into the (k, k + 1) pair of one register, and the
conversion to the operand layout is checked to be a no-op (`assert_trivial`). x's span is staged in
shared memory once per program (every warp reads its A fragments there, not from L2); the words of
the groups ahead are either loaded into registers two groups ahead (STAGES 0) or copied by cp.async
into a ring of shared-memory stages, each thread copying the words it reads back (no barrier); and
split-K programs meet through the same self-resetting workspace as lowbit's kernels. About 2.8-3.1
SASS instructions per code in the sm_90 compile (BLOCK_N 64-128), against the paired dots' 4.9.

Times the kernel at M = 16 over BLOCK_N (64, 128, 256) and every split whose span is a power of two
up to 2048, beside lowbit's autotuned kernel and bf16 cuBLAS, each checked against float64.
Needs Triton with Gluon (3.6 on the device; it compiles under 3.9 too) and an sm_90 GPU (sub.bf16x2).

    python benchmarks/gpu_gluon_m16.py --out benchmarks/results/gpu_gluon_m16_h200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

WARPS = 4
# Gluon is experimental and renames operations between Triton releases: 3.6's names, else 3.9's.
_barrier = getattr(ttgl, "thread_barrier", None) or ttgl.barrier
_async_copy = ttgl.nvidia.ampere.async_copy
_copy_to_shared = getattr(_async_copy, "async_load", None) or _async_copy.async_copy_global_to_shared
STAGES = (0, 4, 8)
"""0: the next two groups' words loaded into registers ahead; n: n groups in flight through shared
memory by cp.async."""
MAX_SPAN = 2048
"""x's span in shared memory: 16 rows x 2048 x 2 bytes = 64 KB at most."""


@gluon.constexpr_function
def _word_layout(chunks, block_n):
    """Words [chunks, block_n / 8, 8, 4] (their order in memory: chunk, block of 8 columns, column,
    t) held by the threads whose B-operand registers their codes fill: the linear layout of
    DotOperandLayout(1, mma v2 [1, 4] warps, k_width 2) for [32·chunks, block_n], K's bits 1-2 as t,
    5-6 as the chunk, N's bits 0-2 as the column in its block of 8 and 3 and up as the block."""
    regs = [[1 << i, 0, 0, 0] for i in range(chunks.bit_length() - 1)]
    regs += [[0, 4 << i, 0, 0] for i in range((block_n // 32).bit_length() - 1)]
    return ttgl.DistributedLinearLayout(
        reg_bases=regs, lane_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]],
        warp_bases=[[0, 1, 0, 0], [0, 2, 0, 0]], block_bases=[], shape=[chunks, block_n // 8, 8, 4])


@gluon.jit
def _unpack(words, offset):
    """Four int32 registers of two bf16 each, q - z of nibbles (j, j + 4) for j = 0..3: 128 + q by
    the mask-and-or of int4_unpack.paired_codes, minus `offset` (128 + z in both halves), exact."""
    return ttgl.inline_asm_elementwise(
        "{ .reg .b32 t;\n"
        "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $0, $0, $5;\n"
        "shr.u32 t, $4, 4;\n lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $1, $1, $5;\n"
        "shr.u32 t, $4, 8;\n lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $2, $2, $5;\n"
        "shr.u32 t, $4, 12;\n lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $3, $3, $5;\n}",
        "=r,=r,=r,=r,r,r", [words, offset], dtype=(ttgl.int32, ttgl.int32, ttgl.int32, ttgl.int32),
        is_pure=True, pack=1)


@gluon.jit
def _halves(r):
    """A register's two bf16 halves as a trailing dimension of 2 (the compiler keeps them one register)."""
    low = (r & 0xFFFF).to(ttgl.int16).to(ttgl.bfloat16, bitcast=True)
    high = (r >> 16).to(ttgl.int16).to(ttgl.bfloat16, bitcast=True)
    return ttgl.join(low, high)


@gluon.jit
def _group_product(words, z, a, B_L: ttgl.constexpr, MMA: ttgl.constexpr, GROUP: ttgl.constexpr,
                   BLOCK_N: ttgl.constexpr):
    """Σ x·(q - z) over one group: its words unpacked into the B operand in place, one MMA chain."""
    zb = z | 0x4300  # bf16 bits of 128 + z
    offset = ttgl.expand_dims(ttgl.expand_dims(zb | (zb << 16), 0), 3)  # [1, nb, ni, 1]
    r0, r1, r2, r3 = _unpack(words, offset)
    q0 = ttgl.join(_halves(r0), _halves(r1))  # [C, nb, ni, t, h, j0]
    q1 = ttgl.join(_halves(r2), _halves(r3))
    full = ttgl.permute(ttgl.join(q0, q1), (0, 6, 5, 3, 4, 1, 2))  # [C, j1, j0, t, h, nb, ni]: K, N in order
    b = ttgl.convert_layout(ttgl.reshape(full, [GROUP, BLOCK_N]), B_L, assert_trivial=True)
    return ttgl.nvidia.ampere.mma_v2(a, b, ttgl.zeros([16, BLOCK_N], ttgl.float32, MMA))


@gluon.jit
def m16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_sg, stride_om,
               SPLIT_K, GROUP: ttgl.constexpr, BLOCK_N: ttgl.constexpr, SPLIT: ttgl.constexpr,
               K_SPAN: ttgl.constexpr, STAGES: ttgl.constexpr):
    CHUNKS: ttgl.constexpr = GROUP // 32
    MMA: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    A_L: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    W_L: ttgl.constexpr = _word_layout(CHUNKS, BLOCK_N)
    pid_n = ttgl.program_id(0)
    pid_k = ttgl.program_id(1)
    n0 = pid_n * BLOCK_N
    # One group's words, shuffled [K / 32, N / 8, 8, 4] in memory (shuffle_words), as [CHUNKS, BLOCK_N / 8, 8, 4].
    c = ttgl.arange(0, CHUNKS, layout=ttgl.SliceLayout(1, ttgl.SliceLayout(2, ttgl.SliceLayout(3, W_L))))
    nb = ttgl.arange(0, BLOCK_N // 8, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, ttgl.SliceLayout(3, W_L))))
    ni = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, ttgl.SliceLayout(3, W_L))))
    t = ttgl.arange(0, 4, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, ttgl.SliceLayout(2, W_L))))
    c4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(c, 1), 2), 3)
    nb4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(nb, 0), 2), 3)
    ni4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(ni, 0), 1), 3)
    t4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(t, 0), 1), 2)
    word_offs = ((c4 * (N // 8) + n0 // 8 + nb4) * 8 + ni4) * 4 + t4
    cols = n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, MMA))
    Z_L: ttgl.constexpr = ttgl.SliceLayout(0, ttgl.SliceLayout(3, W_L))  # [nb, ni]
    zcols = (n0 + ttgl.expand_dims(ttgl.arange(0, BLOCK_N // 8, layout=ttgl.SliceLayout(1, Z_L)), 1) * 8
             + ttgl.expand_dims(ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, Z_L)), 0))
    acc = ttgl.zeros([16, BLOCK_N], ttgl.float32, MMA)
    SPAN_GROUPS: ttgl.constexpr = K_SPAN // GROUP
    first = pid_k * SPAN_GROUPS
    last = first + SPAN_GROUPS - 1
    # x's span, once, into shared memory: every warp reads its A fragments from there.
    X_L: ttgl.constexpr = ttgl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    xr = ttgl.arange(0, 16, layout=ttgl.SliceLayout(1, X_L))
    xk = ttgl.arange(0, GROUP, layout=ttgl.SliceLayout(0, X_L))
    x_tile_offs = ttgl.expand_dims(xr, 1) * stride_xm + ttgl.expand_dims(xk, 0)
    x_tile_mask = ttgl.expand_dims(xr < M, 1)
    SMEM_L: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    x_smem = ttgl.allocate_shared_memory(ttgl.bfloat16, [SPAN_GROUPS, 16, GROUP], SMEM_L)
    for i in ttgl.static_range(SPAN_GROUPS):
        x_smem.index(i).store(ttgl.load(x_ptr + (first + i) * GROUP + x_tile_offs, mask=x_tile_mask, other=0.0))
    _barrier()
    group_words = CHUNKS * (N // 8) * 32
    z_next = ttgl.load(z_ptr + first * stride_sg + zcols)
    s_next = ttgl.load(s_ptr + first * stride_sg + cols)
    if STAGES == 0:
        # The next two groups' words in flight while one is multiplied (registers, carried by the loop).
        w_a = ttgl.load(qw_ptr + first * group_words + word_offs)
        w_b = ttgl.load(qw_ptr + ttgl.minimum(first + 1, last) * group_words + word_offs)
        for g in range(0, SPAN_GROUPS):
            w_c = ttgl.load(qw_ptr + ttgl.minimum(first + g + 2, last) * group_words + word_offs)
            z = z_next.to(ttgl.float32).to(ttgl.int32)
            scale = s_next.to(ttgl.float32)
            g_next = ttgl.minimum(first + g + 1, last)
            z_next = ttgl.load(z_ptr + g_next * stride_sg + zcols)
            s_next = ttgl.load(s_ptr + g_next * stride_sg + cols)
            part = _group_product(w_a, z, x_smem.index(g).load(A_L), B_L, MMA, GROUP, BLOCK_N)
            acc += part * ttgl.expand_dims(scale, 0)
            w_a, w_b = w_b, w_c
    else:
        # STAGES groups' words in flight through shared memory (cp.async, no registers held). Each
        # thread copies exactly the words it reads back, so waiting for its own copies is enough.
        W_SMEM: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[3, 2, 1, 0])
        w_smem = ttgl.allocate_shared_memory(ttgl.int32, [STAGES, CHUNKS, BLOCK_N // 8, 8, 4], W_SMEM)
        for i in ttgl.static_range(STAGES - 1):
            _copy_to_shared(
                w_smem.index(i), qw_ptr + ttgl.minimum(first + i, last) * group_words + word_offs)
            _async_copy.commit_group()
        for g in range(0, SPAN_GROUPS):
            ahead = g + STAGES - 1
            _copy_to_shared(
                w_smem.index(ahead % STAGES), qw_ptr + ttgl.minimum(first + ahead, last) * group_words + word_offs)
            _async_copy.commit_group()
            z = z_next.to(ttgl.float32).to(ttgl.int32)
            scale = s_next.to(ttgl.float32)
            g_next = ttgl.minimum(first + g + 1, last)
            z_next = ttgl.load(z_ptr + g_next * stride_sg + zcols)
            s_next = ttgl.load(s_ptr + g_next * stride_sg + cols)
            _async_copy.wait_group(STAGES - 1)
            words = w_smem.index(g % STAGES).load(W_L)
            part = _group_product(words, z, x_smem.index(g).load(A_L), B_L, MMA, GROUP, BLOCK_N)
            acc += part * ttgl.expand_dims(scale, 0)
    rows = ttgl.arange(0, 16, layout=ttgl.SliceLayout(1, MMA))
    mask = ttgl.expand_dims(rows < M, 1)
    out_offs = ttgl.expand_dims(rows, 1) * stride_om + ttgl.expand_dims(cols, 0)
    if SPLIT:  # as w4a16_triton._store: the last of a tile's programs writes it and resets the workspace
        ws_offs = ttgl.expand_dims(rows, 1) * N + ttgl.expand_dims(cols, 0)
        ttgl.atomic_add(ws_ptr + ws_offs, acc, mask=mask, sem="relaxed")
        _barrier()
        count = ttgl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = ttgl.load(ws_ptr + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
            ttgl.store(out_ptr + out_offs, total.to(ttgl.bfloat16), mask=mask)
            ttgl.store(ws_ptr + ws_offs, ttgl.zeros([16, BLOCK_N], ttgl.float32, MMA), mask=mask)
            ttgl.store(cnt_ptr + pid_n, 0)
    else:
        ttgl.store(out_ptr + out_offs, acc.to(ttgl.bfloat16), mask=mask)


def compile_for_sm90(block_n: int, stages: int, k_span: int = 1024, group: int = 128):
    """`m16_kernel` compiled for sm_90 without a GPU (its operand-layout conversion is asserted
    trivial while it compiles): for the tests and for counting its SASS instructions."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    types = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*bf16",
             "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    constexprs = {"GROUP": group, "BLOCK_N": block_n, "SPLIT": True, "K_SPAN": k_span, "STAGES": stages}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in m16_kernel.arg_names}
    aligned = {(m16_kernel.arg_names.index(name),): [["tt.divisibility", 16]]
               for name in (*types, "N", "K", "stride_xm", "stride_sg", "stride_om")}
    return triton.compile(GluonASTSource(fn=m16_kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS})


def shuffle_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 words, [K / 32, N / 8, 8, 4] flattened: word (c, nb, ni, t) holds
    column 8·nb + ni at K = 32c + 16·j1 + 8·j0 + 2t + h in nibble 4h + 2·j1 + j0, so that nibbles
    (j, j + 4) are the (k, k + 1) pair of thread t's B-operand register j."""
    n, k = codes.shape
    v = codes.to(torch.int64).reshape(n // 8, 8, k // 32, 2, 2, 4, 2)  # nb, ni, c, j1, j0, t, h
    v = v.permute(2, 0, 1, 5, 6, 3, 4).reshape(k // 32, n // 8, 8, 4, 8)  # c, nb, ni, t, nibble
    words = (v << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(-1).contiguous()


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n: int, k: int,
           block_n: int, split: int, stages: int, group: int = 128) -> torch.Tensor:
    """x [M <= 16, K] bf16 @ Wᵀ with W's codes from `shuffle_words`, asymmetric (zeros [K / G, N])."""
    m = x.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    key = (x.device, n)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (torch.zeros(16 * n, device=x.device, dtype=torch.float32),
                           torch.zeros(n // 16, device=x.device, dtype=torch.int32))
    ws, counters = _WORKSPACE[key]
    m16_kernel[(n // block_n, split)](x, words, scales, zeros, out, ws, counters, m, n, k, x.stride(0),
                                      scales.stride(0), out.stride(0), split, GROUP=group, BLOCK_N=block_n,
                                      SPLIT=split > 1, K_SPAN=k // split, STAGES=stages,
                                      num_warps=WARPS)
    return out


def splits(k: int, group: int = 128) -> list[int]:
    """Split counts whose span of K is a power of two between one group and MAX_SPAN."""
    return [s for s in range(1, k // group + 1) if k % s == 0 and (k // s) & (k // s - 1) == 0
            and group <= k // s <= MAX_SPAN]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def run_shape(name: str) -> dict:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    words = shuffle_words(qweight.codes)
    dense = qweight.dequantize().to(torch.bfloat16)
    exact = qweight.dequantize().double()
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ exact.T
    row = {"shape": name, "bf16_us": 1000 * graph_time_ms(lambda: F.linear(x, dense))}
    w4a16_triton.matmul(x, packed)
    row["lowbit_us"] = 1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed))
    row["lowbit_config"] = w4a16_triton.tuned_config(16, packed)
    five = x[:5]
    row["gluon"] = []
    for stages in STAGES:
        for block_n in (64, 128, 256):
            for split in splits(k):
                if n % block_n or (n // block_n) * split > 4096:
                    continue
                args = (words, packed.scales, packed.zeros, n, k, block_n, split, stages)
                call = lambda: matmul(x, *args)  # noqa: E731
                error = max(relative_error(call(), ref), relative_error(matmul(five, *args), ref[:5]))
                row["gluon"].append({"block_n": block_n, "split": split, "stages": stages,
                                     "us": 1000 * graph_time_ms(call), "error": error})
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"A Gluon W4A16 kernel for M <= 16 with pre-shuffled words (benchmarks/gpu_gluon_m16.py) at M = 16, "
             f"asym g128, on {device} (torch {torch.__version__}, triton {triton.__version__}), beside lowbit's "
             "autotuned kernel and bf16 cuBLAS; microseconds per call, CUDA-graph replays, cold L2. `error`: the "
             "largest relative error of the chosen config at M = 16 and M = 5 against float64.", "",
             "| shape | bf16 | lowbit | lowbit config | gluon best | gluon config | lowbit / gluon | error |",
             "|---|---:|---:|---|---:|---|---:|---:|"]
    for r in rows:
        for stages in sorted({g.get("stages", 0) for g in r["gluon"]}):
            best = min((g for g in r["gluon"] if g["error"] < 1e-2 and g.get("stages", 0) == stages),
                       key=lambda g: g["us"])
            words = "registers, 2 groups ahead" if not stages else f"cp.async, {stages} stages"
            lines.append(f"| {r['shape']} | {r['bf16_us']:.1f} | {r['lowbit_us']:.1f} | {r['lowbit_config']} | "
                         f"{best['us']:.1f} | {best['block_n']} split {best['split']}, {words} | "
                         f"{r['lowbit_us'] / best['us']:.2f}x | {best['error']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    run_cases(args.out, args.shapes, lambda name: [run_shape(name)],
              lambda rows: markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
