"""An experiment for M = 17-64 on Hopper: a warp-specialized mixed-input wgmma tile.

At M = 64 no lowbit path reaches 2x bf16: FBGEMM's CUTLASS tile runs at 0.78-1.21x
(gpu_kernels_h200.md). The tiles tried so far unpack and multiply in the same warps, so a warp
waits on its own words before its MMA can start (round 13's swap-AB tile, gpu_wgmma_swap_ab_h200.md).
Here two warpgroups split the work. A producer warpgroup loads each K tile's words and x's tile,
unpacks the codes to bf16((q - z)·s) (one rounding per weight, as FBGEMM's tile rounds), and stores
both into a ring of STAGES shared-memory buffers in the layout wgmma reads, 16 bytes at a time.
It unpacks two ways, each timed: "paired", two weights per bf16x2 operation (a mask-and-or into the
exponent of 128, then a subtraction and a product), and "float", one float32 conversion, subtraction
and product per weight. A consumer warpgroup
chains asynchronous wgmmas over the ring, one in flight while it waits for the next. Mbarriers
pass each buffer between the two: "ready" when the producer has filled it, "empty" when the MMA
that read it has completed. The words are the plain [K / 8, N] every path reads. Split-K programs
meet through the workspace as the other Gluon kernels do (w4a16_gluon_kernel.store_split_k).

For each shape, M and unpack this times every config offered, beside bf16 cuBLAS and the W4A16
dispatcher's choice in the same process, each checked against float64 dequantize-then-matmul.

    python benchmarks/gpu_ws_wgmma.py --out benchmarks/results/gpu_ws_wgmma_h200
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon import language as ttgl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from lowbit.bench.kernels import MAX_RELATIVE_ERROR, SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms
from lowbit.kernels.w4a16_gluon_kernel import compile_gluon_for_sm90, store_split_k
from lowbit.kernels.w4a16_triton import split_k_workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
"""A TMA copy into shared memory: `async_load` from Triton 3.7, `async_copy_global_to_shared` before."""
M_VALUES = (16, 64)
MAX_SHARED = 200 * 1024
"""Shared memory a program may take for its ring (an sm_90 SM has 227 KB)."""


@gluon.constexpr_function
def _tile_layout(block_n, rows):
    """Codes [ROWS, 8 nibbles, BLOCK_N] over the producer warpgroup: every nibble of 8 adjacent
    columns a thread (one 16-byte load per word row, and one 16-byte store per K row), the lanes
    across N, then down the word rows. Its slice along the nibbles holds the words."""
    lanes_n = min(32, block_n // 8)
    lanes_k = 32 // lanes_n
    return ttgl.BlockedLayout([max(1, rows // (4 * lanes_k)), 8, 8], [lanes_k, 1, lanes_n], [4, 1, 1], [2, 1, 0])


@gluon.jit
def _unpack_scaled(words, offset, scale):
    """bf16((q - z)·s) of nibbles (j, j + 4) for j = 0..3, two a register: 128 + q by a mask-and-or
    into the exponent of 128, minus `offset` (128 + z in both halves, exact), times `scale` (both
    halves): one rounding per weight."""
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
def _bf16_pair(values):
    """float32 values as the bf16 bits of both halves of an int32."""
    bits = values.to(ttgl.bfloat16).to(ttgl.int16, bitcast=True).to(ttgl.int32) & 0xFFFF
    return bits | (bits << 16)


@gluon.jit
def _halves(r):
    """A register's two bf16 halves as a trailing dimension of 2."""
    low = (r & 0xFFFF).to(ttgl.int16).to(ttgl.bfloat16, bitcast=True)
    high = (r >> 16).to(ttgl.int16).to(ttgl.bfloat16, bitcast=True)
    return ttgl.join(low, high)


@gluon.jit
def _weight_tile(words, scale, zero, PAIRED: ttgl.constexpr, BLOCK_K: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
                 P_L: ttgl.constexpr):
    """Words [BLOCK_K / 8, BLOCK_N] -> bf16((q - z)·s) [BLOCK_K, BLOCK_N], K = 8·row + nibble.
    PAIRED: two weights per bf16x2 operation (`_unpack_scaled`); else one float32 each."""
    if PAIRED:
        r0, r1, r2, r3 = _unpack_scaled(words, ttgl.expand_dims(_bf16_pair(128.0 + zero), 0),
                                        ttgl.expand_dims(_bf16_pair(scale), 0))
        # [rows, N, h, j_lo, j_hi], nibble 4h + 2 j_hi + j_lo: to [rows, h, j_hi, j_lo, N].
        full = ttgl.join(ttgl.join(_halves(r0), _halves(r1)), ttgl.join(_halves(r2), _halves(r3)))
        weights = ttgl.permute(full, (0, 2, 4, 3, 1))
    else:
        nibbles = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, P_L)))
        codes = (ttgl.expand_dims(words, 1) >> ttgl.expand_dims(ttgl.expand_dims(nibbles * 4, 0), 2)) & 15
        weights = ((codes.to(ttgl.float32) - ttgl.expand_dims(ttgl.expand_dims(zero, 0), 1))
                   * ttgl.expand_dims(ttgl.expand_dims(scale, 0), 1)).to(ttgl.bfloat16)
    return ttgl.reshape(weights, [BLOCK_K, BLOCK_N])


@gluon.jit
def _tile_loads(x_ptr, qw_ptr, s_ptr, z_ptr, k, N, stride_sg, word_offs, cols, x_offs, x_mask,
                GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, W_L: ttgl.constexpr):
    """The words, scales, zeros and x of the K tile at `k`."""
    words = ttgl.load(qw_ptr + (k // 8) * N + word_offs)
    scale = ttgl.load(s_ptr + (k // GROUP) * stride_sg + cols).to(ttgl.float32)
    if SYMMETRIC:
        zero = ttgl.full([cols.shape[0]], ZERO, ttgl.float32, ttgl.SliceLayout(0, W_L))
    else:
        zero = ttgl.load(z_ptr + (k // GROUP) * stride_sg + cols).to(ttgl.float32)
    return words, scale, zero, ttgl.load(x_ptr + k + x_offs, mask=x_mask, other=0.0)


@gluon.jit
def _producer(x_ptr, qw_ptr, s_ptr, z_ptr, x_bufs, w_bufs, ready, empty, M, N, stride_xm, stride_sg, n0, k0,
              GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
              BLOCK_K: ttgl.constexpr, TILES: ttgl.constexpr, STAGES: ttgl.constexpr, PAIRED: ttgl.constexpr,
              AHEAD: ttgl.constexpr):
    """Fills the ring: x's tile and the weight's tile, unpacked and scaled, for each K tile of the span."""
    P_L: ttgl.constexpr = _tile_layout(BLOCK_N, BLOCK_K // 8)
    W_L: ttgl.constexpr = ttgl.SliceLayout(1, P_L)
    cols = n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, W_L))
    word_offs = ttgl.expand_dims(ttgl.arange(0, BLOCK_K // 8, layout=ttgl.SliceLayout(1, W_L)), 1) * N + \
        ttgl.expand_dims(cols, 0)
    X_L: ttgl.constexpr = ttgl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    x_rows = ttgl.arange(0, 64, layout=ttgl.SliceLayout(1, X_L))
    x_offs = ttgl.expand_dims(x_rows, 1) * stride_xm + ttgl.expand_dims(
        ttgl.arange(0, BLOCK_K, layout=ttgl.SliceLayout(0, X_L)), 0)
    x_mask = ttgl.expand_dims(x_rows < M, 1)
    if AHEAD == 0:
        for t in range(TILES):
            words, scale, zero, x_tile = _tile_loads(x_ptr, qw_ptr, s_ptr, z_ptr, k0 + t * BLOCK_K, N, stride_sg,
                                                     word_offs, cols, x_offs, x_mask, GROUP, SYMMETRIC, ZERO, W_L)
            _fill(x_bufs, w_bufs, ready, empty, t, words, scale, zero, x_tile, PAIRED, BLOCK_K, BLOCK_N, STAGES, P_L)
    else:  # the next tile's loads in flight while this one is unpacked and stored (registers, carried)
        words, scale, zero, x_tile = _tile_loads(x_ptr, qw_ptr, s_ptr, z_ptr, k0, N, stride_sg, word_offs, cols,
                                                 x_offs, x_mask, GROUP, SYMMETRIC, ZERO, W_L)
        for t in range(TILES):
            k_next = k0 + ttgl.minimum(t + 1, TILES - 1) * BLOCK_K
            words_next, scale_next, zero_next, x_next = _tile_loads(x_ptr, qw_ptr, s_ptr, z_ptr, k_next, N, stride_sg,
                                                                    word_offs, cols, x_offs, x_mask, GROUP, SYMMETRIC,
                                                                    ZERO, W_L)
            _fill(x_bufs, w_bufs, ready, empty, t, words, scale, zero, x_tile, PAIRED, BLOCK_K, BLOCK_N, STAGES, P_L)
            words, scale, zero, x_tile = words_next, scale_next, zero_next, x_next


@gluon.jit
def _fill(x_bufs, w_bufs, ready, empty, t, words, scale, zero, x_tile, PAIRED: ttgl.constexpr,
          BLOCK_K: ttgl.constexpr, BLOCK_N: ttgl.constexpr, STAGES: ttgl.constexpr, P_L: ttgl.constexpr):
    """Tile t unpacked into its ring buffer, x's tile beside it, once the MMA that last read the
    buffer has completed; then the buffer is marked ready."""
    stage = t % STAGES
    weights = _weight_tile(words, scale, zero, PAIRED, BLOCK_K, BLOCK_N, P_L)
    mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)
    x_bufs.index(stage).store(x_tile)
    w_bufs.index(stage).store(weights)
    fence_async_shared()
    mbarrier.arrive(ready.index(stage), count=1)


@gluon.jit
def _consumer(x_bufs, w_bufs, ready, empty, BLOCK_N: ttgl.constexpr, TILES: ttgl.constexpr,
              STAGES: ttgl.constexpr):
    """Chains the wgmmas over the ring, one in flight, and frees each buffer once its MMA completed."""
    MMA_L: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    acc = ttgl.zeros([64, BLOCK_N], ttgl.float32, MMA_L)
    for t in range(TILES):
        stage = t % STAGES
        mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
        acc = warpgroup_mma(x_bufs.index(stage), w_bufs.index(stage), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        mbarrier.arrive(empty.index((t + STAGES - 1) % STAGES), count=1, pred=t > 0)
    return (warpgroup_mma_wait(0, deps=[acc]),)  # a partition returns a tuple


@gluon.jit
def ws_wgmma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_sg, stride_om,
                    GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
                    BLOCK_K: ttgl.constexpr, K_SPAN: ttgl.constexpr, STAGES: ttgl.constexpr, PAIRED: ttgl.constexpr,
                    AHEAD: ttgl.constexpr):
    """out[:M, tile] = x[:M] @ W[tile]ᵀ over one span of K, M <= 64 (wgmma's M: 16 rows a warp of
    the kernel's own warpgroup, which multiplies; rows past M are zeros in x's buffers), a producer
    warpgroup unpacking (see the module's docstring)."""
    pid_n = ttgl.program_id(0)
    pid_k = ttgl.program_id(1)
    n0 = pid_n * BLOCK_N
    X_S: ttgl.constexpr = ttgl.NVMMASharedLayout.get_default_for([64, BLOCK_K], ttgl.bfloat16)
    W_S: ttgl.constexpr = ttgl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], ttgl.bfloat16)
    x_bufs = ttgl.allocate_shared_memory(ttgl.bfloat16, [STAGES, 64, BLOCK_K], X_S)
    w_bufs = ttgl.allocate_shared_memory(ttgl.bfloat16, [STAGES, BLOCK_K, BLOCK_N], W_S)
    ready = ttgl.allocate_shared_memory(ttgl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = ttgl.allocate_shared_memory(ttgl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in ttgl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    TILES: ttgl.constexpr = K_SPAN // BLOCK_K
    (acc,) = ttgl.warp_specialize([
        (_consumer, (x_bufs, w_bufs, ready, empty, BLOCK_N, TILES, STAGES)),
        (_producer, (x_ptr, qw_ptr, s_ptr, z_ptr, x_bufs, w_bufs, ready, empty, M, N, stride_xm, stride_sg, n0,
                     pid_k * K_SPAN, GROUP, SYMMETRIC, ZERO, BLOCK_N, BLOCK_K, TILES, STAGES, PAIRED, AHEAD)),
    ], [4], [152])  # the producer: one warpgroup (its layouts assume 4 warps), 152 registers a thread
    MMA_L: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    rows = ttgl.expand_dims(ttgl.arange(0, 64, layout=ttgl.SliceLayout(1, MMA_L)), 1)
    cols = ttgl.expand_dims(n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, MMA_L)), 0)
    store_split_k(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, rows, cols, rows < M, N, stride_om)


@gluon.jit
def _tma_loader(w_desc, s_desc, z_desc, raw_words, raw_scales, raw_zeros, words_ready, words_free, n0, k0,
                GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, BLOCK_K: ttgl.constexpr, TILES: ttgl.constexpr,
                RAW_STAGES: ttgl.constexpr, SCALES_BY_TMA: ttgl.constexpr):
    """One warp: each K tile's words, scales and zeros by TMA into the raw ring, RAW_STAGES tiles
    ahead of the unpack, so that many tiles' bytes are in flight without holding registers."""
    W_BYTES: ttgl.constexpr = w_desc.block_type.nbytes
    S_BYTES: ttgl.constexpr = s_desc.block_type.nbytes * (1 if SYMMETRIC else 2)
    for t in range(TILES):
        r = t % RAW_STAGES
        k = k0 + t * BLOCK_K
        mbarrier.wait(words_free.index(r), ((t // RAW_STAGES) & 1) ^ 1)
        if SCALES_BY_TMA:
            mbarrier.expect(words_ready.index(r), W_BYTES + S_BYTES)
        else:
            mbarrier.expect(words_ready.index(r), W_BYTES)
        _tma_load(w_desc, [k // 8, n0], words_ready.index(r), raw_words.index(r))
        if SCALES_BY_TMA:
            _tma_load(s_desc, [k // GROUP, n0], words_ready.index(r), raw_scales.index(r))
            if not SYMMETRIC:
                _tma_load(z_desc, [k // GROUP, n0], words_ready.index(r), raw_zeros.index(r))


@gluon.jit
def _tma_unpacker(x_desc, raw_words, raw_scales, raw_zeros, words_ready, words_free, x_bufs, w_bufs, x_ready,
                  w_ready, mma_free, k0, x_ptr, s_ptr, z_ptr, M, stride_xm, stride_sg, n0,
                  FIRST: ttgl.constexpr, UNPACKERS: ttgl.constexpr,
                  SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
                  BLOCK_K: ttgl.constexpr, TILES: ttgl.constexpr, STAGES: ttgl.constexpr,
                  RAW_STAGES: ttgl.constexpr, GROUP: ttgl.constexpr, SCALES_BY_TMA: ttgl.constexpr,
                  X_BY_TMA: ttgl.constexpr, LATE_FREE: ttgl.constexpr):
    """One warpgroup, tiles FIRST, FIRST + UNPACKERS, ...: the tile's words from the raw ring into
    registers (freeing the raw buffer at once), then, once the MMA that last read the ring buffer
    has completed, x's tile by TMA and the unpacked, scaled weights into it."""
    P_L: ttgl.constexpr = _tile_layout(BLOCK_N, BLOCK_K // 8)
    W_L: ttgl.constexpr = ttgl.SliceLayout(1, P_L)
    V_L: ttgl.constexpr = ttgl.SliceLayout(0, W_L)
    cols = n0 + ttgl.arange(0, BLOCK_N, layout=V_L)
    X_L: ttgl.constexpr = ttgl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    x_rows = ttgl.arange(0, 64, layout=ttgl.SliceLayout(1, X_L))
    x_offs = ttgl.expand_dims(x_rows, 1) * stride_xm + ttgl.expand_dims(
        ttgl.arange(0, BLOCK_K, layout=ttgl.SliceLayout(0, X_L)), 0)
    x_mask = ttgl.expand_dims(x_rows < M, 1)
    for t in range(FIRST, TILES, UNPACKERS):
        r = t % RAW_STAGES
        stage = t % STAGES
        k = k0 + t * BLOCK_K
        mbarrier.wait(words_ready.index(r), (t // RAW_STAGES) & 1)
        words = raw_words.index(r).load(W_L)
        if SCALES_BY_TMA:
            scale = raw_scales.index(r).reshape([BLOCK_N]).load(V_L).to(ttgl.float32)
        else:
            scale = ttgl.load(s_ptr + (k // GROUP) * stride_sg + cols).to(ttgl.float32)
        if SYMMETRIC:
            zero = ttgl.full([BLOCK_N], ZERO, ttgl.float32, V_L)
        elif SCALES_BY_TMA:
            zero = raw_zeros.index(r).reshape([BLOCK_N]).load(V_L).to(ttgl.float32)
        else:
            zero = ttgl.load(z_ptr + (k // GROUP) * stride_sg + cols).to(ttgl.float32)
        if not LATE_FREE:
            mbarrier.arrive(words_free.index(r), count=1)
        mbarrier.wait(mma_free.index(stage), ((t // STAGES) & 1) ^ 1)
        if X_BY_TMA:
            mbarrier.expect(x_ready.index(stage), x_desc.block_type.nbytes)
            _tma_load(x_desc, [0, k], x_ready.index(stage), x_bufs.index(stage))
        else:
            x_bufs.index(stage).store(ttgl.load(x_ptr + k + x_offs, mask=x_mask, other=0.0))
            mbarrier.arrive(x_ready.index(stage), count=1)
        w_bufs.index(stage).store(_weight_tile(words, scale, zero, True, BLOCK_K, BLOCK_N, P_L))
        fence_async_shared()
        if LATE_FREE:  # the words' shared loads are certainly done: their values have been used
            mbarrier.arrive(words_free.index(r), count=1)
        mbarrier.arrive(w_ready.index(stage), count=1)


@gluon.jit
def _tma_consumer(x_bufs, w_bufs, x_ready, w_ready, mma_free, BLOCK_N: ttgl.constexpr, TILES: ttgl.constexpr,
                  STAGES: ttgl.constexpr):
    """`_consumer`, waiting for x's TMA as well as for the unpacked weights."""
    MMA_L: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    acc = ttgl.zeros([64, BLOCK_N], ttgl.float32, MMA_L)
    for t in range(TILES):
        stage = t % STAGES
        mbarrier.wait(x_ready.index(stage), (t // STAGES) & 1)
        mbarrier.wait(w_ready.index(stage), (t // STAGES) & 1)
        acc = warpgroup_mma(x_bufs.index(stage), w_bufs.index(stage), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        mbarrier.arrive(mma_free.index((t + STAGES - 1) % STAGES), count=1, pred=t > 0)
    return (warpgroup_mma_wait(0, deps=[acc]),)


@gluon.jit
def tma_kernel(x_desc, w_desc, s_desc, z_desc, out_ptr, ws_ptr, cnt_ptr, M, N, stride_om, x_ptr, s_ptr, z_ptr,
               stride_xm, stride_sg,
               GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr, BLOCK_K: ttgl.constexpr,
               K_SPAN: ttgl.constexpr, STAGES: ttgl.constexpr, RAW_STAGES: ttgl.constexpr,
               UNPACKERS: ttgl.constexpr, SCALES_BY_TMA: ttgl.constexpr = True, X_BY_TMA: ttgl.constexpr = True,
               EVEN_REGISTERS: ttgl.constexpr = False, LATE_FREE: ttgl.constexpr = False):
    """`ws_wgmma_kernel` fed by TMA: a loader warp keeps RAW_STAGES tiles of words, scales and
    zeros in flight into a raw ring; UNPACKERS warpgroups take turns unpacking them into the ring
    the consumer's wgmmas read, each fetching x's tile by TMA beside its weights (rows past M
    arrive as zeros: TMA fills what lies outside x)."""
    pid_n = ttgl.program_id(0)
    pid_k = ttgl.program_id(1)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * K_SPAN
    raw_words = ttgl.allocate_shared_memory(ttgl.int32, [RAW_STAGES, BLOCK_K // 8, BLOCK_N], w_desc.layout)
    raw_scales = ttgl.allocate_shared_memory(ttgl.float16, [RAW_STAGES, 1, BLOCK_N], s_desc.layout)
    raw_zeros = ttgl.allocate_shared_memory(ttgl.float16, [RAW_STAGES, 1, BLOCK_N], z_desc.layout)
    W_S: ttgl.constexpr = ttgl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], ttgl.bfloat16)
    x_bufs = ttgl.allocate_shared_memory(ttgl.bfloat16, [STAGES, 64, BLOCK_K], x_desc.layout)
    w_bufs = ttgl.allocate_shared_memory(ttgl.bfloat16, [STAGES, BLOCK_K, BLOCK_N], W_S)
    words_ready = ttgl.allocate_shared_memory(ttgl.int64, [RAW_STAGES, 1], mbarrier.MBarrierLayout())
    words_free = ttgl.allocate_shared_memory(ttgl.int64, [RAW_STAGES, 1], mbarrier.MBarrierLayout())
    x_ready = ttgl.allocate_shared_memory(ttgl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = ttgl.allocate_shared_memory(ttgl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mma_free = ttgl.allocate_shared_memory(ttgl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in ttgl.static_range(RAW_STAGES):
        mbarrier.init(words_ready.index(i), count=1)
        mbarrier.init(words_free.index(i), count=1)
    for i in ttgl.static_range(STAGES):
        mbarrier.init(x_ready.index(i), count=1)
        mbarrier.init(w_ready.index(i), count=1)
        mbarrier.init(mma_free.index(i), count=1)
    fence_async_shared()  # the barriers' initialization, seen by TMA (the async proxy) before its first copy
    TILES: ttgl.constexpr = K_SPAN // BLOCK_K
    if UNPACKERS == 1:
        (acc,) = ttgl.warp_specialize([
            (_tma_consumer, (x_bufs, w_bufs, x_ready, w_ready, mma_free, BLOCK_N, TILES, STAGES)),
            (_tma_unpacker, (x_desc, raw_words, raw_scales, raw_zeros, words_ready, words_free, x_bufs, w_bufs,
                             x_ready, w_ready, mma_free, k0, x_ptr, s_ptr, z_ptr, M, stride_xm, stride_sg, n0, 0, 1,
                             SYMMETRIC, ZERO, BLOCK_N, BLOCK_K, TILES, STAGES, RAW_STAGES, GROUP, SCALES_BY_TMA,
                             X_BY_TMA, LATE_FREE)),
            (_tma_loader, (w_desc, s_desc, z_desc, raw_words, raw_scales, raw_zeros, words_ready, words_free, n0, k0,
                           GROUP, SYMMETRIC, BLOCK_K, TILES, RAW_STAGES, SCALES_BY_TMA)),
        ], [4, 1], [160, 160] if EVEN_REGISTERS else [152, 40])
    else:  # two unpacking warpgroups, even and odd tiles
        (acc,) = ttgl.warp_specialize([
            (_tma_consumer, (x_bufs, w_bufs, x_ready, w_ready, mma_free, BLOCK_N, TILES, STAGES)),
            (_tma_unpacker, (x_desc, raw_words, raw_scales, raw_zeros, words_ready, words_free, x_bufs, w_bufs,
                             x_ready, w_ready, mma_free, k0, x_ptr, s_ptr, z_ptr, M, stride_xm, stride_sg, n0, 0, 2,
                             SYMMETRIC, ZERO, BLOCK_N, BLOCK_K, TILES, STAGES, RAW_STAGES, GROUP, SCALES_BY_TMA,
                             X_BY_TMA, LATE_FREE)),
            (_tma_unpacker, (x_desc, raw_words, raw_scales, raw_zeros, words_ready, words_free, x_bufs, w_bufs,
                             x_ready, w_ready, mma_free, k0, x_ptr, s_ptr, z_ptr, M, stride_xm, stride_sg, n0, 1, 2,
                             SYMMETRIC, ZERO, BLOCK_N, BLOCK_K, TILES, STAGES, RAW_STAGES, GROUP, SCALES_BY_TMA,
                             X_BY_TMA, LATE_FREE)),
            (_tma_loader, (w_desc, s_desc, z_desc, raw_words, raw_scales, raw_zeros, words_ready, words_free, n0, k0,
                           GROUP, SYMMETRIC, BLOCK_K, TILES, RAW_STAGES, SCALES_BY_TMA)),
        ], [4, 4, 1], [120, 120, 120] if EVEN_REGISTERS else [152, 152, 40])
    MMA_L: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    rows = ttgl.expand_dims(ttgl.arange(0, 64, layout=ttgl.SliceLayout(1, MMA_L)), 1)
    cols = ttgl.expand_dims(n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, MMA_L)), 0)
    store_split_k(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, rows, cols, rows < M, N, stride_om)


class Config(NamedTuple):
    block_n: int
    block_k: int
    span: int
    stages: int
    two_per_sm: bool = False
    """Registers capped at 128 a thread (`maxnreg`), so that two programs' 256 threads fit an SM's
    register file: uncapped, the warp specialization's launch asks 256, one program an SM. Only
    with 128 columns: a 64x256 float32 accumulator alone takes 128 registers a thread, and ptxas
    refuses the kernel."""


TWO_PER_SM_REGISTERS = 128


def compile_for_sm90(config: Config, symmetric: bool = False, paired: bool = True, ahead: int = 0):
    """`ws_wgmma_kernel` compiled for sm_90 without a GPU: for the tests."""
    return compile_gluon_for_sm90(ws_wgmma_kernel, {"GROUP": 128, "SYMMETRIC": symmetric, "ZERO": SYMMETRIC_ZERO,
                                                    "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                                                    "K_SPAN": config.span, "STAGES": config.stages, "PAIRED": paired,
                                                    "AHEAD": ahead}, 4,
                                  maxnreg=TWO_PER_SM_REGISTERS if config.two_per_sm else None)


def shared_bytes(config: Config) -> int:
    return config.stages * 2 * config.block_k * (64 + config.block_n)


def configs(n: int, k: int) -> list[Config]:
    """Configs that fit the shape: whole tiles of at least the producer's 128 threads' columns, K
    tiles within a group, spans of whole tiles dividing K and holding at least a ring's worth of
    tiles, the ring within MAX_SHARED (half of it for two programs an SM), 64 to 4096 programs."""
    offered = [Config(*values) for values in itertools.product((128, 256), (64, 128), (512, 1024, 2048), (2, 3, 4),
                                                               (False, True))]
    return [c for c in offered if n % c.block_n == 0 and k % c.span == 0 and c.span >= c.stages * c.block_k
            and shared_bytes(c) <= MAX_SHARED // (2 if c.two_per_sm else 1) and not (c.two_per_sm and c.block_n > 128)
            and 64 <= (n // c.block_n) * (k // c.span) <= 4096]


def launch(x: torch.Tensor, packed, config: Config, paired: bool = True, ahead: int = 0) -> torch.Tensor:
    m, k = x.shape
    n = packed.out_features
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, m * n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    options = {"maxnreg": TWO_PER_SM_REGISTERS} if config.two_per_sm else {}
    ws_wgmma_kernel[(n // config.block_n, k // config.span)](
        x, packed.qweight, packed.scales, zeros, out, ws, counters, m, n, k, x.stride(0), packed.scales.stride(0),
        out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric, ZERO=SYMMETRIC_ZERO,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, K_SPAN=config.span, STAGES=config.stages, PAIRED=paired,
        AHEAD=ahead, num_warps=4, **options)
    return out


class TmaConfig(NamedTuple):
    block_n: int
    block_k: int
    span: int
    stages: int
    raw_stages: int
    unpackers: int


def tma_shared_bytes(config: TmaConfig, symmetric: bool = False) -> int:
    """The rings' bytes (symmetric weights' zeros take none: the compiler drops their buffer)."""
    raw = config.raw_stages * config.block_n * (config.block_k // 8 * 4 + 2 * (1 if symmetric else 2))
    return raw + config.stages * 2 * config.block_k * (64 + config.block_n)


def tma_configs(n: int, k: int) -> list[TmaConfig]:
    """As `configs`, 128 columns (a 256-column consumer's accumulator does not fit the registers
    the unpacking warpgroups leave it), a raw ring of 4 or 8 tiles, one unpacking warpgroup: with
    two, 64-row K tiles gave wrong products on an H200 (relative error 1.4e-2 and 0.25), a race
    not yet found (round 16)."""
    offered = [TmaConfig(128, *values, unpackers=1)
               for values in itertools.product((64, 128), (512, 1024, 2048), (2, 3), (4, 8))]
    return [c for c in offered if n % c.block_n == 0 and k % c.span == 0 and c.span >= c.raw_stages * c.block_k
            and tma_shared_bytes(c) <= MAX_SHARED and 64 <= (n // c.block_n) * (k // c.span) <= 4096]


WORDS_SWIZZLE = 128
"""The words' shared layout: unswizzled, 16-row tiles read back wrong on an H200 (8-row ones right)."""


def _layouts(config: TmaConfig) -> dict:
    """Shared layouts of the TMA copies: x's in the layout wgmma reads; the words', scales' and
    zeros' unswizzled, rows as they lie in memory."""
    return {"x": ttgl.NVMMASharedLayout.get_default_for([64, config.block_k], ttgl.bfloat16),
            "w": ttgl.NVMMASharedLayout(swizzle_byte_width=WORDS_SWIZZLE, element_bitwidth=32, rank=2),
            "s": ttgl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)}


def _tma_constexprs(config: TmaConfig, group: int, symmetric: bool) -> dict:
    return {"GROUP": group, "SYMMETRIC": symmetric, "ZERO": SYMMETRIC_ZERO, "BLOCK_N": config.block_n,
            "BLOCK_K": config.block_k, "K_SPAN": config.span, "STAGES": config.stages,
            "RAW_STAGES": config.raw_stages, "UNPACKERS": config.unpackers}


def compile_tma_for_sm90(config: TmaConfig, symmetric: bool = False, **flags):
    """`tma_kernel` compiled for sm_90 without a GPU: for the tests."""
    layouts = _layouts(config)
    descriptors = {"x_desc": f"tensordesc<bf16[64,{config.block_k}],{layouts['x']!r}>",
                   "w_desc": f"tensordesc<i32[{config.block_k // 8},{config.block_n}],{layouts['w']!r}>",
                   "s_desc": f"tensordesc<fp16[1,{config.block_n}],{layouts['s']!r}>",
                   "z_desc": f"tensordesc<fp16[1,{config.block_n}],{layouts['s']!r}>"}
    flags = {"SCALES_BY_TMA": True, "X_BY_TMA": True, "EVEN_REGISTERS": False, "LATE_FREE": False, **flags}  # constexprs, not i32
    return compile_gluon_for_sm90(tma_kernel, {**_tma_constexprs(config, 128, symmetric), **flags}, 4, types=descriptors)


def tma_launch(x: torch.Tensor, packed, config: TmaConfig, **flags) -> torch.Tensor:
    m, k = x.shape
    n = packed.out_features
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, m * n)
    layouts = _layouts(config)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    descriptors = (TensorDescriptor.from_tensor(x, [64, config.block_k], layouts["x"]),
                   TensorDescriptor.from_tensor(packed.qweight, [config.block_k // 8, config.block_n], layouts["w"]),
                   TensorDescriptor.from_tensor(packed.scales, [1, config.block_n], layouts["s"]),
                   TensorDescriptor.from_tensor(zeros, [1, config.block_n], layouts["s"]))
    tma_kernel[(n // config.block_n, k // config.span)](
        *descriptors, out, ws, counters, m, n, out.stride(0), x, packed.scales, zeros, x.stride(0),
        packed.scales.stride(0), **_tma_constexprs(config, packed.group_size, packed.symmetric), **flags,
        num_warps=4)
    return out


def describe(config: Config | TmaConfig) -> str:
    text = f"64x{config.block_n}x{config.block_k} span {config.span} stages {config.stages}"
    if isinstance(config, TmaConfig):
        return text + f", raw {config.raw_stages}, {config.unpackers} unpacking"
    return text + (", 2/SM" if config.two_per_sm else "")


MODES = {"paired": (configs, functools.partial(launch, paired=True, ahead=0)),
         "paired, 1 ahead": (configs, functools.partial(launch, paired=True, ahead=1)),
         "float": (configs, functools.partial(launch, paired=False, ahead=0)),
         "tma": (tma_configs, tma_launch)}
"""How the producer unpacks (two weights per bf16x2 operation, or one float32 each), whether it
loads the next tile before unpacking this one, or whether a loader warp feeds it by TMA: each
mode's configs and launch."""
DEFAULT_MODES = ("tma",)
"""Round 16 timed "paired" beside the dispatcher (gpu_ws_wgmma_h200_round2.md of d738db6), "float" at
1.13-1.34x paired's time on every row (gpu_ws_wgmma_h200.md of 2461a21),
and "paired, 1 ahead" at 1.08-1.20x (gpu_ws_wgmma_h200_round2.md of d738db6)."""


def run_shape(name: str, modes: tuple[str, ...] = DEFAULT_MODES) -> list[dict]:
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
            mode_configs, mode_launch = MODES[mode]
            timed = []
            for config in mode_configs(n, k):
                error = float((mode_launch(x, packed, config).double() - ref).norm() / ref.norm())
                if not error < MAX_RELATIVE_ERROR:
                    raise SystemExit(f"{name} M={m} {mode} {describe(config)}: relative error {error:.2e}")
                timed.append((1000 * graph_time_ms(lambda c=config: mode_launch(x, packed, c)), config, error))
            us, config, error = min(timed)
            row.update({mode: us, f"{mode} config": describe(config), f"{mode} error": error})
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    modes = [mode for mode in MODES if mode in rows[0]]
    lines = [f"The warp-specialized mixed-input wgmma tile (benchmarks/gpu_ws_wgmma.py), int4 g128 asymmetric, best "
             f"config of each unpack, on {device} (torch {torch.__version__}, triton {triton.__version__}); "
             "microseconds per call (config), CUDA-graph replays, cold L2; error against float64.", "",
             "| shape | M | bf16 cuBLAS | dispatcher (path) | " + " | ".join(modes) + " | error (" + " / ".join(modes)
             + ") | bf16 / best | dispatcher / best |", "|---|---:|---:|---|" + "---|" * len(modes) + "---|---:|---:|"]
    for r in rows:
        best = min(r[mode] for mode in modes)
        cells = " | ".join(f"{r[mode]:.1f} ({r[mode + ' config']})" for mode in modes)
        errors = " / ".join(f"{r[mode + ' error']:.1e}" for mode in modes)
        lines.append(f"| {r['shape']} | {r['m']} | {r['bf16']:.1f} | {r['dispatcher']:.1f} ({r['dispatcher path']}) | "
                     f"{cells} | {errors} | {r['bf16'] / best:.2f}x | {r['dispatcher'] / best:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=list(MODES))
    args = parser.parse_args()
    run_cases(args.out, args.shapes, lambda name: run_shape(name, tuple(args.modes)),
              lambda rows: markdown(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
