"""The Gluon kernel of w4a16_gluon.py (imported only where Triton has Gluon; see that module for why).

Gluon is experimental and renames operations between Triton releases: `_barrier` takes 3.6's name,
else 3.9's. tests/test_kernels_gluon.py compiles the kernel for sm_90 on the installed Triton.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl

from lowbit.kernels.int4_unpack import F16_DOT_ASM

_barrier = getattr(ttgl, "thread_barrier", None) or ttgl.barrier

WEIGHT_MODES = {"unpacked zeros": (False, False), "folded zeros": (False, True), "symmetric": (True, True)}
"""The ways `m16_kernel` takes a weight, as benchmarks name them: (SYMMETRIC, FOLD_ZEROS)."""


@gluon.constexpr_function
def _word_layout(chunks, block_n, warps):
    """Words [BLOCK_N / 8, 8, 4, chunks] (their order in memory: block of 8 columns, column, t,
    chunk) held by the threads whose B-operand registers their codes fill: the linear layout of
    DotOperandLayout(1, mma v2 [1, warps] warps, k_width 2) for [32·chunks, BLOCK_N], with K's bits
    1-2 as t, 5 and up as the chunk, N's bits 0-2 as the column in its block of 8, the next
    log2(warps) as the warp, the rest as registers. A thread's chunks are its innermost registers,
    so it loads them in one vector."""
    regs = [[0, 0, 0, 1 << i] for i in range(chunks.bit_length() - 1)]
    regs += [[warps << i, 0, 0, 0] for i in range((block_n // (8 * warps)).bit_length() - 1)]
    return ttgl.DistributedLinearLayout(
        reg_bases=regs, lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]],
        warp_bases=[[1 << i, 0, 0, 0] for i in range(warps.bit_length() - 1)], block_bases=[],
        shape=[block_n // 8, 8, 4, chunks])


@gluon.jit
def shuffled_word_offsets(n0, BLOCK_N: ttgl.constexpr, CHUNKS: ttgl.constexpr, W_L: ttgl.constexpr):
    """Offsets of one group's words [BLOCK_N / 8, 8, 4, CHUNKS] of the column tile at n0 within
    that group's block of the shuffled [K / G, N / 8, 8, 4, CHUNKS] (w4a16_gluon.shuffle_words),
    in the word layout W_L."""
    nb = ttgl.arange(0, BLOCK_N // 8, layout=ttgl.SliceLayout(1, ttgl.SliceLayout(2, ttgl.SliceLayout(3, W_L))))
    ni = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, ttgl.SliceLayout(3, W_L))))
    t = ttgl.arange(0, 4, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, ttgl.SliceLayout(3, W_L))))
    c = ttgl.arange(0, CHUNKS, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, ttgl.SliceLayout(2, W_L))))
    nb4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(nb, 1), 2), 3)
    ni4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(ni, 0), 2), 3)
    t4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(t, 0), 1), 3)
    c4 = ttgl.expand_dims(ttgl.expand_dims(ttgl.expand_dims(c, 0), 1), 2)
    return (((n0 // 8 + nb4) * 8 + ni4) * 4 + t4) * CHUNKS + c4


@gluon.jit
def _unpack(words, offset):
    """Four int32 registers of two bf16 each, q - z of nibbles (j, j + 4) for j = 0..3: 128 + q by
    a mask-and-or into the exponent of 128 (int4_unpack.paired_codes), minus `offset`, the bf16
    bits of 128 + z in both halves. Exact: every value is a small whole number."""
    return ttgl.inline_asm_elementwise(
        "{ .reg .b32 t;\n"
        "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $0, $0, $5;\n"
        "shr.u32 t, $4, 4;\n lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $1, $1, $5;\n"
        "shr.u32 t, $4, 8;\n lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $2, $2, $5;\n"
        "shr.u32 t, $4, 12;\n lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xea;\n sub.rn.bf16x2 $3, $3, $5;\n}",
        "=r,=r,=r,=r,r,r", [words, offset], dtype=(ttgl.int32, ttgl.int32, ttgl.int32, ttgl.int32),
        is_pure=True, pack=1)


@gluon.jit
def _unpack_biased(words):
    """_unpack without its subtraction: 128 + q of nibbles (j, j + 4), one lop3 a register. The
    bias 128 leaves with the zero point in the row-sum correction (m16_kernel's FOLD_ZEROS)."""
    return ttgl.inline_asm_elementwise(
        "{ .reg .b32 t;\n"
        "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xea;\n"
        "shr.u32 t, $4, 4;\n lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xea;\n"
        "shr.u32 t, $4, 8;\n lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xea;\n"
        "shr.u32 t, $4, 12;\n lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xea;\n}",
        "=r,=r,=r,=r,r", [words], dtype=(ttgl.int32, ttgl.int32, ttgl.int32, ttgl.int32), is_pure=True, pack=1)


@gluon.jit
def _halves(r):
    """A register's two bf16 halves as a trailing dimension of 2 (the compiler keeps them one register)."""
    low = (r & 0xFFFF).to(ttgl.int16).to(ttgl.bfloat16, bitcast=True)
    high = (r >> 16).to(ttgl.int16).to(ttgl.bfloat16, bitcast=True)
    return ttgl.join(low, high)


@gluon.jit
def _group_product(words, z, a, B_L: ttgl.constexpr, MMA: ttgl.constexpr, GROUP: ttgl.constexpr,
                   BLOCK_N: ttgl.constexpr, BIASED: ttgl.constexpr, BLOCK_M: ttgl.constexpr = 16):
    """Σ x·(q - z) over one group (Σ x·(128 + q) if BIASED): its words unpacked into the B operand
    in place, one MMA chain."""
    if BIASED:
        r0, r1, r2, r3 = _unpack_biased(words)
    else:
        zb = z | 0x4300  # bf16 bits of 128 + z
        r0, r1, r2, r3 = _unpack(words, ttgl.expand_dims(ttgl.expand_dims(zb | (zb << 16), 2), 3))
    q0 = ttgl.join(_halves(r0), _halves(r1))  # [nb, ni, t, c, h, j0]
    q1 = ttgl.join(_halves(r2), _halves(r3))
    full = ttgl.permute(ttgl.join(q0, q1), (3, 6, 5, 2, 4, 0, 1))  # [c, j1, j0, t, h, nb, ni]: K, N in order
    b = ttgl.convert_layout(ttgl.reshape(full, [GROUP, BLOCK_N]), B_L, assert_trivial=True)
    return ttgl.nvidia.ampere.mma_v2(a, b, ttgl.zeros([BLOCK_M, BLOCK_N], ttgl.float32, MMA))


@gluon.jit
def store_split_k(acc, out_ptr, ws_ptr, cnt_ptr, tile, rows, cols, mask, N, stride_om, FINISH: ttgl.constexpr = True):
    """acc, the float32 product of one program's span of K, into out[rows, cols] (bf16). Split-K
    programs (grid axis 1; `tile` numbers the output tile, its counter's index) add into the workspace and the last of a tile writes it and resets the
    workspace and its counter (w4a16_triton._store's protocol), so a call is one launch.

    FINISH=False leaves the sum pending: every program, split or not, only adds into the workspace
    (here a zeroed buffer of the caller's), and the kernel that reads the product next rounds it and
    zeroes the buffer (decode_ops.Pending). The tile counter, its fence and the last program's read-back
    go: on an H200 they were 1.2-2.1 us of a GEMV on the 8B shapes (gpu_gemv_anatomy_tail_h200.md)."""
    if not FINISH:
        ttgl.atomic_add(ws_ptr + rows * N + cols, acc, mask=mask, sem="relaxed")
    else:
        out_offs = rows * stride_om + cols
        split_k = ttgl.num_programs(1)
        if split_k > 1:
            ws_offs = rows * N + cols
            ttgl.atomic_add(ws_ptr + ws_offs, acc, mask=mask, sem="relaxed")
            _barrier()
            count = ttgl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if count == split_k - 1:
                total = ttgl.load(ws_ptr + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
                ttgl.store(out_ptr + out_offs, total.to(ttgl.bfloat16), mask=mask)
                ttgl.store(ws_ptr + ws_offs, ttgl.zeros_like(acc), mask=mask)
                ttgl.store(cnt_ptr + tile, 0)
        else:
            ttgl.store(out_ptr + out_offs, acc.to(ttgl.bfloat16), mask=mask)


@gluon.jit
def m16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_sg, stride_om,
               GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
               K_SPAN: ttgl.constexpr, WARPS: ttgl.constexpr, FOLD_ZEROS: ttgl.constexpr = True,
               AHEAD: ttgl.constexpr = 2, FINISH: ttgl.constexpr = True, BLOCK_M: ttgl.constexpr = 16,
               ROW_BLOCKS: ttgl.constexpr = 1):
    """out[rows, tile] = x[rows] @ W[tile]ᵀ over one span of K (split-K: `store_split_k`) for one
    block of BLOCK_M rows (16 or 32: each unpacked B fragment serves BLOCK_M / 16 MMAs), the words
    of AHEAD (1 or 2) groups in flight while one is multiplied.

    Grid axis 0 runs over (column tile, row block), ROW_BLOCKS blocks a tile, innermost: where M
    spans several blocks, the programs that read a tile's words run side by side, so all but the
    first find them in L2.

    FOLD_ZEROS (asymmetric weights): the codes enter the MMA as 128 + q, straight from one lop3 a
    register, and each group adds -(128 + z)·Σx, x's row sums over the group taken once while x is
    staged, since Σ x·(q - z) = Σ x·(128 + q) - (128 + z)·Σ x. Otherwise each column's zero point
    enters the unpack's subtraction, which costs its loads, their addresses and conversions in every
    group. The folded group's product carries the bias, 128·Σx, until the correction cancels it in
    float32: the errors against float64 stayed those of the bf16 output, 1.6-1.7e-3, on every
    shape (gpu_gluon_biased_h200.md). Symmetric weights unpack as q - ZERO: taking the bias off
    with their row sums cost more than the subtraction on five shapes of eight (same file)."""
    CHUNKS: ttgl.constexpr = GROUP // 32
    MMA: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
    A_L: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    W_L: ttgl.constexpr = _word_layout(CHUNKS, BLOCK_N, WARPS)
    tile = ttgl.program_id(0)  # this program's (column tile, row block), its split-K counter's index
    row0 = (tile % ROW_BLOCKS) * BLOCK_M
    M -= row0
    x_ptr += row0 * stride_xm
    out_ptr += row0 * stride_om
    ws_ptr += row0 * N
    pid_k = ttgl.program_id(1)
    n0 = (tile // ROW_BLOCKS) * BLOCK_N
    word_offs = shuffled_word_offsets(n0, BLOCK_N, CHUNKS, W_L)
    group_words = N * 4 * CHUNKS
    cols = n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, MMA))
    Z_L: ttgl.constexpr = ttgl.SliceLayout(2, ttgl.SliceLayout(3, W_L))  # [nb, ni]
    zcols = (n0 + ttgl.expand_dims(ttgl.arange(0, BLOCK_N // 8, layout=ttgl.SliceLayout(1, Z_L)), 1) * 8
             + ttgl.expand_dims(ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, Z_L)), 0))
    SPAN_GROUPS: ttgl.constexpr = K_SPAN // GROUP
    first = pid_k * SPAN_GROUPS
    last = first + SPAN_GROUPS - 1
    # The first two groups' words are requested before x is staged: their DRAM latency covers it.
    w_a = ttgl.load(qw_ptr + first * group_words + word_offs)
    if AHEAD == 2:
        w_b = ttgl.load(qw_ptr + ttgl.minimum(first + 1, last) * group_words + word_offs)
    s_next = ttgl.load(s_ptr + first * stride_sg + cols)
    FOLD: ttgl.constexpr = FOLD_ZEROS and not SYMMETRIC
    if SYMMETRIC or FOLD:
        z_next = ttgl.full([BLOCK_N // 8, 8], ZERO, ttgl.float32, Z_L)
    else:
        z_next = ttgl.load(z_ptr + first * stride_sg + zcols).to(ttgl.float32)
    if FOLD:
        zt_next = ttgl.load(z_ptr + first * stride_sg + cols).to(ttgl.float32)
    # x's span, once, into shared memory: every warp reads its A fragments from there.
    X_L: ttgl.constexpr = ttgl.BlockedLayout([1, 8], [2, 16], [WARPS, 1], [1, 0])
    xr = ttgl.arange(0, BLOCK_M, layout=ttgl.SliceLayout(1, X_L))
    xk = ttgl.arange(0, GROUP, layout=ttgl.SliceLayout(0, X_L))
    x_tile_offs = ttgl.expand_dims(xr, 1) * stride_xm + ttgl.expand_dims(xk, 0)
    x_tile_mask = ttgl.expand_dims(xr < M, 1)
    SMEM_L: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    x_smem = ttgl.allocate_shared_memory(ttgl.bfloat16, [SPAN_GROUPS, BLOCK_M, GROUP], SMEM_L)
    if FOLD:
        RS_L: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        row_sums = ttgl.allocate_shared_memory(ttgl.float32, [SPAN_GROUPS, BLOCK_M], RS_L)
    for i in ttgl.static_range(SPAN_GROUPS):
        x_tile = ttgl.load(x_ptr + (first + i) * GROUP + x_tile_offs, mask=x_tile_mask, other=0.0)
        x_smem.index(i).store(x_tile)
        if FOLD:
            row_sums.index(i).store(ttgl.sum(x_tile.to(ttgl.float32), axis=1))
    _barrier()
    acc = ttgl.zeros([BLOCK_M, BLOCK_N], ttgl.float32, MMA)
    for g in range(0, SPAN_GROUPS):
        # AHEAD groups' words in flight while one is multiplied (registers, carried by the loop).
        w_next = ttgl.load(qw_ptr + ttgl.minimum(first + g + AHEAD, last) * group_words + word_offs)
        z = z_next.to(ttgl.int32)
        scale = s_next.to(ttgl.float32)
        g_next = ttgl.minimum(first + g + 1, last)
        s_next = ttgl.load(s_ptr + g_next * stride_sg + cols)
        if not SYMMETRIC and not FOLD:
            z_next = ttgl.load(z_ptr + g_next * stride_sg + zcols).to(ttgl.float32)
        part = _group_product(w_a, z, x_smem.index(g).load(A_L), B_L, MMA, GROUP, BLOCK_N, FOLD, BLOCK_M)
        if FOLD:
            zero_term = -128.0 - zt_next
            zt_next = ttgl.load(z_ptr + g_next * stride_sg + cols).to(ttgl.float32)
            sums = row_sums.index(g).load(ttgl.SliceLayout(1, MMA))
            part += ttgl.expand_dims(sums, 1) * ttgl.expand_dims(zero_term, 0)
        acc += part * ttgl.expand_dims(scale, 0)
        if AHEAD == 2:
            w_a, w_b = w_b, w_next
        else:
            w_a = w_next
    rows = ttgl.arange(0, BLOCK_M, layout=ttgl.SliceLayout(1, MMA))
    store_split_k(acc, out_ptr, ws_ptr, cnt_ptr, tile, ttgl.expand_dims(rows, 1), ttgl.expand_dims(cols, 0),
                  ttgl.expand_dims(rows < M, 1), N, stride_om, FINISH)

@gluon.jit
def _f16_pair(high, low):
    """Two float32 tensors as one int32 tensor of fp16 pairs (int4_unpack.f16x2 in Gluon)."""
    return ttgl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [high, low], dtype=ttgl.int32,
                                       is_pure=True, pack=1)


@gluon.jit
def staged_x_pairs(x_ptr, k0, GROUP: ttgl.constexpr, SPAN_GROUPS: ttgl.constexpr, WARPS: ttgl.constexpr):
    """x[k0 : k0 + SPAN_GROUPS·GROUP] in shared memory, per group, as the GEMVs' fp16 pairs
    (x_j, x_j+4) of each row of eight, the row scaled by a power of two that brings its largest |x|
    into [64, 128) (int4_unpack.stage_f16_rows), with the rows' inverse factors: the buffers
    (pairs04, pairs15, pairs26, pairs37, inverse), read after a block barrier."""
    V_L: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])  # per group
    pairs04 = ttgl.allocate_shared_memory(ttgl.int32, [SPAN_GROUPS, GROUP // 8], V_L)
    pairs15 = ttgl.allocate_shared_memory(ttgl.int32, [SPAN_GROUPS, GROUP // 8], V_L)
    pairs26 = ttgl.allocate_shared_memory(ttgl.int32, [SPAN_GROUPS, GROUP // 8], V_L)
    pairs37 = ttgl.allocate_shared_memory(ttgl.int32, [SPAN_GROUPS, GROUP // 8], V_L)
    inverse = ttgl.allocate_shared_memory(ttgl.float32, [SPAN_GROUPS, GROUP // 8], V_L)
    X_L: ttgl.constexpr = ttgl.BlockedLayout([1], [32], [WARPS], [0])  # a row of eight a thread
    xrows = ttgl.arange(0, GROUP // 8, layout=X_L)
    for i in ttgl.static_range(SPAN_GROUPS):
        x_offs = k0 + i * GROUP + xrows * 8
        x0 = ttgl.load(x_ptr + x_offs).to(ttgl.float32)
        x1 = ttgl.load(x_ptr + x_offs + 1).to(ttgl.float32)
        x2 = ttgl.load(x_ptr + x_offs + 2).to(ttgl.float32)
        x3 = ttgl.load(x_ptr + x_offs + 3).to(ttgl.float32)
        x4 = ttgl.load(x_ptr + x_offs + 4).to(ttgl.float32)
        x5 = ttgl.load(x_ptr + x_offs + 5).to(ttgl.float32)
        x6 = ttgl.load(x_ptr + x_offs + 6).to(ttgl.float32)
        x7 = ttgl.load(x_ptr + x_offs + 7).to(ttgl.float32)
        largest = ttgl.maximum(ttgl.maximum(ttgl.maximum(ttgl.abs(x0), ttgl.abs(x1)),
                                            ttgl.maximum(ttgl.abs(x2), ttgl.abs(x3))),
                               ttgl.maximum(ttgl.maximum(ttgl.abs(x4), ttgl.abs(x5)),
                                            ttgl.maximum(ttgl.abs(x6), ttgl.abs(x7))))
        exponent = ttgl.maximum(largest.to(ttgl.int32, bitcast=True) >> 23, 6)
        factor = ((260 - exponent) << 23).to(ttgl.float32, bitcast=True)
        pairs04.index(i).store(_f16_pair(x4 * factor, x0 * factor))
        pairs15.index(i).store(_f16_pair(x5 * factor, x1 * factor))
        pairs26.index(i).store(_f16_pair(x6 * factor, x2 * factor))
        pairs37.index(i).store(_f16_pair(x7 * factor, x3 * factor))
        inverse.index(i).store(((exponent - 6) << 23).to(ttgl.float32, bitcast=True))
    return pairs04, pairs15, pairs26, pairs37, inverse


@gluon.jit
def tile_dots(words, pairs04, pairs15, pairs26, pairs37, inverse, g, row, plus_1024_z, minus_64_z,
              ROWS: ttgl.constexpr, ROW_L: ttgl.constexpr):
    """Σ x·(q - z) per column over ROWS word rows of group g, from its row `row` on: each word's
    eight codes against x's staged pairs (F16_DOT_ASM), each row's dot times its inverse factor."""
    x04 = ttgl.expand_dims(pairs04.index(g).slice(row, ROWS).load(ROW_L), 1)
    x15 = ttgl.expand_dims(pairs15.index(g).slice(row, ROWS).load(ROW_L), 1)
    x26 = ttgl.expand_dims(pairs26.index(g).slice(row, ROWS).load(ROW_L), 1)
    x37 = ttgl.expand_dims(pairs37.index(g).slice(row, ROWS).load(ROW_L), 1)
    dots = ttgl.inline_asm_elementwise(F16_DOT_ASM, "=f,r,r,r,r,r,r,r",
                                       [words, x04, x15, x26, x37, plus_1024_z, minus_64_z],
                                       dtype=ttgl.float32, is_pure=True, pack=1)
    row_factor = ttgl.expand_dims(inverse.index(g).slice(row, ROWS).load(ROW_L), 1)
    return ttgl.sum(dots * row_factor, axis=0)


@gluon.jit
def gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_sg, stride_om,
                GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
                K_SPAN: ttgl.constexpr, WARPS: ttgl.constexpr, BLOCK_K: ttgl.constexpr, AHEAD: ttgl.constexpr = 2,
                FINISH: ttgl.constexpr = True):
    """out[0, tile] = x[0] @ W[tile]ᵀ over one span of K, from the plain words [K / 8, N] (M = 1).

    w4a16_triton's F16_PAIRS GEMV in Gluon, for what Triton's pipeliner does not allow: each
    thread loads exactly the words it multiplies (VEC columns of every word row of a tile, 16 bytes
    a row), AHEAD (1 or 2) tiles ahead into registers, so the loop needs no barrier; x's span is staged once,
    as fp16 pairs and row factors, in shared memory, where every thread reads the rows it needs.
    The Triton GEMV syncs its block twice per tile (cp.async stages shared by all threads), and an
    ncu profile on 8B gate/up_proj put barrier stalls at 1.44 warps per issued instruction
    (gpu_profile_h200_gemv_8b.log)."""
    VEC: ttgl.constexpr = BLOCK_N // (32 * WARPS)
    ROWS: ttgl.constexpr = BLOCK_K // 8
    W_L: ttgl.constexpr = ttgl.BlockedLayout([ROWS, VEC], [1, 32], [1, WARPS], [1, 0])
    ROW_L: ttgl.constexpr = ttgl.SliceLayout(1, W_L)  # a tile's rows, every thread all of them
    COL_L: ttgl.constexpr = ttgl.SliceLayout(0, W_L)  # a thread's VEC columns
    SPAN_ROWS: ttgl.constexpr = K_SPAN // 8
    TILES: ttgl.constexpr = K_SPAN // BLOCK_K
    GROUP_TILES: ttgl.constexpr = GROUP // BLOCK_K
    pid_n = ttgl.program_id(0)
    pid_k = ttgl.program_id(1)
    n0 = pid_n * BLOCK_N
    row0 = pid_k * SPAN_ROWS  # this span's first word row
    cols = n0 + ttgl.arange(0, BLOCK_N, layout=COL_L)
    word_offs = ttgl.expand_dims(ttgl.arange(0, ROWS, layout=ROW_L), 1) * N + ttgl.expand_dims(cols, 0)
    # The first tiles' words are requested before x is staged: their DRAM latency covers it.
    w_a = ttgl.load(qw_ptr + row0 * N + word_offs)
    if AHEAD == 2:
        w_b = ttgl.load(qw_ptr + (row0 + ttgl.minimum(1, TILES - 1) * ROWS) * N + word_offs)
    g0 = pid_k * (K_SPAN // GROUP)  # this span's first group
    s_next = ttgl.load(s_ptr + g0 * stride_sg + cols)
    if SYMMETRIC:
        z_next = ttgl.full([BLOCK_N], ZERO, ttgl.float32, COL_L)
    else:
        z_next = ttgl.load(z_ptr + g0 * stride_sg + cols).to(ttgl.float32)
    # x's span as fp16 pairs (x_j, x_j+4), each row of eight scaled by a power of two.
    SPAN_GROUPS: ttgl.constexpr = K_SPAN // GROUP
    pairs04, pairs15, pairs26, pairs37, inverse = staged_x_pairs(x_ptr, pid_k * K_SPAN, GROUP, SPAN_GROUPS, WARPS)
    _barrier()
    acc = ttgl.zeros([BLOCK_N], ttgl.float32, COL_L)
    for g in range(0, SPAN_GROUPS):
        scale = s_next.to(ttgl.float32)
        z = z_next
        g_next = g0 + ttgl.minimum(g + 1, SPAN_GROUPS - 1)
        s_next = ttgl.load(s_ptr + g_next * stride_sg + cols)
        if not SYMMETRIC:
            z_next = ttgl.load(z_ptr + g_next * stride_sg + cols).to(ttgl.float32)
        plus_1024_z = ttgl.expand_dims(_f16_pair(1024.0 + z, 1024.0 + z), 0)
        minus_64_z = ttgl.expand_dims(_f16_pair(-64.0 - z, -64.0 - z), 0)
        group_sum = ttgl.zeros([BLOCK_N], ttgl.float32, COL_L)
        for i in ttgl.static_range(GROUP_TILES):
            tile = g * GROUP_TILES + i
            w_next = ttgl.load(qw_ptr + (row0 + ttgl.minimum(tile + AHEAD, TILES - 1) * ROWS) * N + word_offs)
            group_sum += tile_dots(w_a, pairs04, pairs15, pairs26, pairs37, inverse, g, i * ROWS, plus_1024_z,
                                   minus_64_z, ROWS, ROW_L)
            if AHEAD == 2:
                w_a, w_b = w_b, w_next
            else:
                w_a = w_next
        acc += scale * group_sum
    OUT_L: ttgl.constexpr = ttgl.BlockedLayout([1, VEC], [1, 32], [1, WARPS], [1, 0])
    out = ttgl.convert_layout(ttgl.expand_dims(acc, 0), OUT_L)
    out_rows = ttgl.expand_dims(ttgl.arange(0, 1, layout=ttgl.SliceLayout(1, OUT_L)), 1)
    out_cols = ttgl.expand_dims(n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, OUT_L)), 0)
    store_split_k(out, out_ptr, ws_ptr, cnt_ptr, pid_n, out_rows, out_cols, out_rows < M, N, stride_om, FINISH)


def compile_gemv_for_sm90(block_n: int, k_span: int, block_k: int = 32, group: int = 128, symmetric: bool = False,
                          warps: int = 4, ahead: int = 2, finish: bool = True):
    """`gemv_kernel` compiled for sm_90 without a GPU: for the tests."""
    return compile_gluon_for_sm90(gemv_kernel, {"GROUP": group, "SYMMETRIC": symmetric, "ZERO": 8, "BLOCK_N": block_n,
                                                "K_SPAN": k_span, "WARPS": warps, "BLOCK_K": block_k, "AHEAD": ahead,
                                                "FINISH": finish}, warps)


def compile_for_sm90(block_n: int, k_span: int, group: int = 128, symmetric: bool = False, warps: int = 4,
                     fold_zeros: bool = True, ahead: int = 2, finish: bool = True, block_m: int = 16,
                     row_blocks: int = 1):
    """`m16_kernel` compiled for sm_90 without a GPU (the operand-layout conversion is asserted
    trivial while it compiles): for the tests."""
    return compile_gluon_for_sm90(m16_kernel, {"GROUP": group, "SYMMETRIC": symmetric, "ZERO": 8, "BLOCK_N": block_n,
                                               "K_SPAN": k_span, "WARPS": warps, "FOLD_ZEROS": fold_zeros,
                                               "AHEAD": ahead, "FINISH": finish, "BLOCK_M": block_m,
                                               "ROW_BLOCKS": row_blocks}, warps)


def compile_gluon_for_sm90(kernel, constexprs: dict, warps: int, types: dict[str, str] | None = None):
    """A W4A16 Gluon kernel taking m16_kernel's arguments, compiled for sm_90 without a GPU
    (sm90_compile), its pointers, N, K and strides declared aligned. `types` names the signature
    type of arguments m16_kernel lacks (a TMA descriptor's, say)."""
    from lowbit.kernels import sm90_compile

    pointers = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*bf16",
                "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    aligned = (*pointers, "N", "K", "stride_xm", "stride_sg", "stride_om")
    return sm90_compile.compile_for_sm90(kernel, {**pointers, **(types or {})}, constexprs, aligned,
                                         {"num_warps": warps})
