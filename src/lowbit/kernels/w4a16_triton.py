"""Triton W4A16 matmul: y = x Wᵀ with W in the PackedInt4 layout, dequantized on the fly.

Three kernels, chosen by M (rows of x):
  * M = 1, `_gemv_kernel`: no tensor cores; per weight only a mask, an add and one FMA
    (int4_unpack.nibble: int-to-float conversions, at an eighth of the FMA rate on Hopper, held
    the first version to about half the memory bandwidth), or with F16_PAIRS half of each, two
    weights per packed fp16 operation (int4_unpack.f16_word_dot);
  * 2 <= M <= 64, `_mma_kernel` with split-K: the work is reading the weight, K·N/2 bytes, so
    splitting K gives enough programs to keep every SM's loads in flight even where N / BLOCK_N
    alone is below the SM count. `SWAP_AB` computes (W xᵀ)ᵀ instead of x Wᵀ, putting the
    dequantized weight on the tensor cores' M side (64 rows and up) and the few rows of x on the
    narrow N side, so no MMA work is spent on padding rows;
  * M > 64, `_mma_kernel` without split: a tiled GEMM whose B tile is unpacked and scaled in
    registers right before `tl.dot`, so the bf16 weight never exists in global memory.
    (w4a16_dispatch.py may pick dequantize-then-cuBLAS instead where that measured faster.)

Split-K without extra launches: each program adds its partial sums into a float32 workspace and
then bumps its output tile's counter (release: the adds are visible before the count); the program
that takes the count to SPLIT_K (acquire: it sees every add) writes the output in x's dtype and
resets the workspace and the counter to zero for the next call. (A counter per element instead
cost a fence per element and tripled the M = 16/64 times on H100.) So a call is one
launch into an uninitialised output: no zero fill before, no cast after. The workspace is per
(device, stream): two streams never share one.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from lowbit.kernels.int4_pack import PackedInt4
from lowbit.kernels.int4_unpack import (biased_code, f16_word_dot, f16x2, nibble, paired_codes, paired_offset,
                                        stage_f16_rows)
from lowbit.kernels import sm90_compile
from lowbit.kernels.autotune import autotune, chosen_config, pinned, with_settings
from lowbit.kernels.w4a16 import DECODE_MAX_M, bucket

CODE_MASK = 0xF
"""Passed to the kernels as a run-time argument, not written as a literal: a LOP3 takes one
immediate (the float exponent bits), and ptxas rematerialised a literal mask into a register
before nearly every unpack: one extra SASS instruction for most codes in the GEMV (gemv_sass.py)."""

ARGUMENT_TYPES = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*bf16",
                  "ws_ptr": "*fp32", "cnt_ptr": "*i32", "stage_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                  "stride_xm": "i32", "stride_qk": "i32", "stride_sg": "i32", "stride_om": "i32", "M_BUCKET": "i32",
                  "code_mask": "i32", "SPLIT_K": "i32"}
"""The run-time arguments of `_gemv_kernel` and `_mma_kernel` as Triton types (bf16 activations, fp16
scales), for `compile_for_sm90`."""

ALIGNED_ARGUMENTS = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "stage_ptr", "N", "K",
                     "stride_xm", "stride_qk", "stride_sg", "stride_om")
"""The arguments Triton's JIT finds to be multiples of 16 on model shapes (it specialises each call on
that): a compile ahead of time must say so too, or it builds the kernel with unvectorised loads."""

_WORKSPACE: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
_STAGING: dict[tuple[str, int], torch.Tensor] = {}


def _config(bm: int, bn: int, bk: int, split: int, warps: int, stages: int, swap: bool = False,
            **flags: bool) -> triton.Config:
    # SPLIT_K is a run-time argument (one compiled variant serves every split count); SPLIT says
    # whether the split-K reduction is compiled in at all. `flags`: a kernel's other constexpr switches.
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "SPLIT": split > 1,
                          "SWAP_AB": swap, **flags},
                         num_warps=warps, num_stages=stages)


GEMV_WARPS = tl.constexpr(4)


def _gemv_config(bn: int, bk: int, split: int, biased: bool = False, pipeline: int = 0) -> triton.Config:
    """A GEMV candidate: float32 unpack (biased or not), or with `pipeline` stages the F16_PAIRS one."""
    if pipeline:
        return _config(1, bn, bk, split, GEMV_WARPS.value, 3, F16_PAIRS=True, PIPELINE=pipeline)
    return _config(1, bn, bk, split, GEMV_WARPS.value, 3, BIASED=biased)


# Wide N tiles give each thread more columns per row of words, so the per-row work on x (loads,
# conversions, sums) is shared by more codes. F16_PAIRS (`int4_unpack.f16_word_dot`) needs a
# thread to hold its word rows: 2.3-2.5 SASS instructions per code at 512 and 1024 columns against
# 3.2-3.7 for the biased float32 unpack, a third of the integer-pipe work (gemv_sass_sm90.md), so
# the float32 unpacks keep only the narrow tiles, for small N, where only they (with split-K) give
# every SM work (in gpu_kernels_h200.md and gpu_kernels_h200_m1_pipeline.md, with the wide biased
# tiles still on offer, the narrow ones took the k/v rows and the wide ones no row).
# F16_PAIRS's loop is software-pipelined (see _gemv_kernel): in the
# sm_90 compile, with the words in shared memory rather than registers, the 512 x 32 tile at 3
# stages needs 56 registers and holds 9 blocks per SM, against 80 and 6 where the next tile's
# words were prefetched into registers, 512 x 64 72 and 6 against 167 and 3 (gemv_sass_sm90.md,
# and the same file of commit 6b9e585 for the prefetching loop, since removed). On an H200 the
# tuner took it on seven of the eight M = 1 shapes: 70B down 43.4 -> 36.6 us, 70B gate/up 41.9 ->
# 38.8, 8B gate/up 15.3 -> 13.5 (gpu_kernels_h200_m1_pipeline.md against gpu_kernels_h200.md of
# commit 6b9e585, whose best F16_PAIRS tiles prefetched into registers).
_GEMV_SPLITS = (1, 2, 4, 8, 16, 32)
F16_MIN_BLOCK_N = 32 * GEMV_WARPS.value
"""F16_PAIRS needs a thread to hold every word row of its columns (ROWS_IN_THREAD in `_gemv_kernel`)."""
_NARROW_TILES = ((64, 128), (128, 128), (256, 64))
_F16_TILES = ((128, 128), (256, 64), (512, 32), (512, 64), (1024, 32))
_PIPELINE_STAGES = (3, 2, 4)
"""The F16_PAIRS loop's depths, the first the tuner's base setting. The others are tried on its
finalists only (`_other_pipelines`): the depth moves a tile's time by a few percent, less than
the tiles and splits differ, and offered on every candidate it tripled the F16_PAIRS timings."""
_GEMV_CONFIGS = ([_gemv_config(bn, bk, s, biased) for bn, bk in _NARROW_TILES
                  for s in _GEMV_SPLITS for biased in (False, True)]
                 + [_gemv_config(bn, bk, s, pipeline=_PIPELINE_STAGES[0]) for bn, bk in _F16_TILES
                    for s in _GEMV_SPLITS])


def _other_pipelines(config: triton.Config) -> list[triton.Config]:
    """An F16_PAIRS candidate at the other pipeline depths (autotune's finalist variants)."""
    if not config.kwargs.get("F16_PAIRS"):
        return []
    return with_settings(config, *({"PIPELINE": stages} for stages in _PIPELINE_STAGES[1:]))


# PAIRED_DOTS (see _mma_kernel) is an autotuning candidate beside the reshaped tile: the tuner keeps
# whichever is faster per shape. Split 16 won at the k/v shapes at M = 16 and 64 and 70B down at
# M = 16 (70B k/v M = 16: 10.2 -> 8.4 us, gpu_kernels_h200_512x32.md).
_DECODE_SPLITS = (1, 2, 4, 8, 16)
_DECODE_CONFIGS = [_config(bm, bn, 128, s, 4, 4, swap, PAIRED_DOTS=paired)
                   for bm in (16, 64) for bn in (64, 128) for s in _DECODE_SPLITS for swap in (False, True)
                   for paired in (False, True)]
# Large M swaps A and B: the unpacked weight becomes wgmma's A operand, which it reads from
# registers, where as B it would be stored to shared memory after its unpack and read back (sm_90,
# 128x128x128 reshaped tile: 0.34 shared-memory operations per code against 1.11,
# mma_sass_sm90_large_m.md). Offered both ways on an H200, the swapped
# tile won all eight M = 256 rows, the fused kernel 10-25% faster
# (gpu_kernels_h200_m256_swap.md), so only it is offered: the autotuner's first call per shape costs
# no more than before.
_PREFILL_CONFIGS = [
    _config(bm, bn, 128, 1, warps, stages, True, PAIRED_DOTS=paired)
    for bm, bn, warps, stages in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (64, 256, 8, 3))
    for paired in (False, True)
]
PAIRED_MIN_K = 128
"""PAIRED_DOTS splits a K tile into eight dots of BLOCK_K / 8; tensor-core dots need K >= 16."""
_K_TILES = (128, 64, 32)
_MIN_PROGRAMS, _MAX_PROGRAMS = 96, 4096
"""Split-K configs are kept only where they give the grid this many programs (132 SMs on H100)."""


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Fit the configs to this shape; drop split-K configs that leave the GPU idle or flood it with atomics.

    Tensor-core tiles take the largest K tile (128, 64, 32) that divides the group, so a tile needs
    one row of scales; the GEMV's K tiles may be smaller but must divide the group too, and its
    split-K spans whole groups (it applies scales once per group). A split count that does not
    divide K's spans becomes the nearest one that does: an MLP's K often has an odd factor (14336
    = 112 groups of 128, 18944 = 148), where the powers of two above 16 (or 4) would otherwise all
    drop out, and with them the wide GEMV tiles' only way to fill the GPU on a narrow N.
    """
    args = {**named_args, **kwargs}
    m, n, k, group = args["M_BUCKET"], args["N"], args["K"], args["GROUP"]
    group_tile = next(t for t in _K_TILES if group % t == 0)
    kept, seen = [], set()
    for config in configs:
        kw = dict(config.kwargs)
        bm, bn, split = kw["BLOCK_M"], kw["BLOCK_N"], kw["SPLIT_K"]
        if bm > 1 or group % kw["BLOCK_K"]:
            kw["BLOCK_K"] = group_tile
        span = group if bm == 1 else kw["BLOCK_K"]
        if k % span == 0 and (k // span) % split:
            split = _nearest_divisor(k // span, split)
            kw["SPLIT_K"], kw["SPLIT"] = split, split > 1
        if k % (span * split) or (kw.get("PAIRED_DOTS") and kw["BLOCK_K"] < PAIRED_MIN_K):
            continue
        if 1 < m <= DECODE_MAX_M and bm != (16 if m <= 16 else 64):
            continue  # 16-row tiles serve M = 2..16, 64-row tiles M = 17..64
        programs = triton.cdiv(n, bn) * (1 if m == 1 else triton.cdiv(m, bm)) * split
        if split > 1 and not _MIN_PROGRAMS <= programs <= _MAX_PROGRAMS:
            continue
        ident = (tuple(sorted(kw.items())), config.num_warps, config.num_stages)
        if ident not in seen:
            seen.add(ident)
            kept.append(triton.Config(kw, num_warps=config.num_warps, num_stages=config.num_stages))
    return kept


def _nearest_divisor(count: int, wanted: int) -> int:
    """The divisor of `count` closest to `wanted` (the smaller of two as close)."""
    return min((d for d in range(1, count + 1) if count % d == 0), key=lambda d: (abs(d - wanted), d))


@triton.jit
def _group_scale_zero(s_ptr, z_ptr, row, n_mask, SYMMETRIC: tl.constexpr):
    """One group's scales and zero points for the tile's columns, as float32 (zero 8 when symmetric)."""
    scale = tl.load(s_ptr + row, mask=n_mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        zero = tl.full(scale.shape, 8.0, tl.float32)
    else:
        zero = tl.load(z_ptr + row, mask=n_mask, other=0).to(tl.float32)
    return scale, zero


@triton.jit
def _store(result, out_ptrs, ws_ptrs, cnt_ptr, mask, SPLIT_K, SPLIT: tl.constexpr):
    """Write float32 `result` to out (x's dtype); with SPLIT the last of the SPLIT_K programs of this tile does.

    The tile's programs add into the workspace, then (after a barrier, so every thread's add is
    issued) bump the tile's counter once with release semantics; the program whose bump completes
    the count acquires, reads the sums from L2, writes the output and zeroes what it used.
    """
    if not SPLIT:
        tl.store(out_ptrs, result.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptrs, result, mask=mask, sem="relaxed")
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.store(ws_ptrs, tl.zeros(result.shape, tl.float32), mask=mask)
            tl.store(cnt_ptr, 0)


@triton.jit
def _f16_tile(words, zero, pairs_ptr, inv_ptr, rows, BLOCK_K: tl.constexpr):
    """Σ x·(q - z) per word row and column of one K tile, from x's staged fp16 pairs (F16_PAIRS)."""
    pairs = tl.load(pairs_ptr + rows[:, None] * 4 + tl.arange(0, 4)[None, :])
    even, odd = tl.split(tl.reshape(pairs, (BLOCK_K // 8, 2, 2)))  # pairs 0, 2 | 1, 3
    x04, x26 = tl.split(even)
    x15, x37 = tl.split(odd)
    plus_1024_z = f16x2(1024.0 + zero, 1024.0 + zero)[None, :]
    minus_64_z = f16x2(-64.0 - zero, -64.0 - zero)[None, :]
    dots = f16_word_dot(words, x04[:, None], x15[:, None], x26[:, None], x37[:, None], plus_1024_z, minus_64_z)
    return dots * tl.load(inv_ptr + rows)[:, None]


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, stage_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_om,
    M_BUCKET, code_mask,
    GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr,
    SWAP_AB: tl.constexpr, BIASED: tl.constexpr = False, F16_PAIRS: tl.constexpr = False,
    PIPELINE: tl.constexpr = 2,
):
    """M = 1. Per column n and group g, Σ_k (q_k - z)·s·x_k = s·(Σ_k q_k·x_k - z·Σ_k x_k): the codes'
    sums over a whole group are taken first and the scale and zero point applied once per group
    (per word row and column), so the main loop holds only the unpack and one FMA per code
    (BLOCK_K divides GROUP). F16_PAIRS subtracts the zero point in the unpack instead and sums a
    word's eight products in packed fp16 (int4_unpack.f16_word_dot): the scale alone is left.

    F16_PAIRS walks the span's K tiles in one loop that Triton software-pipelines, PIPELINE tiles'
    words in flight through shared memory (cp.async), loading the scale and zero point per tile.
    A loop per group would pipeline nothing: a group holds only GROUP / BLOCK_K tiles.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    k_span = K // SPLIT_K
    k_begin = tl.multiple_of(pid_k * k_span, GROUP)  # whole groups (_prune)
    k_end = k_begin + k_span
    word_ptrs = qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :]
    # Where a thread holds every word row of its columns (BLOCK_N >= 32 x warps), the rows are
    # summed per group, in registers. Narrower tiles spread rows over warps, where summing them
    # per group costs a shared-memory reduction each time: their sums stay per row and column and
    # are reduced once, at the end. (H200, M = 1: per-group sums for every tile left 70B k/v_proj
    # at 10.4 us, per-row sums for every tile slowed 70B gate/up_proj from 50 to 55 us.)
    ROWS_IN_THREAD: tl.constexpr = BLOCK_N >= 32 * GEMV_WARPS
    if ROWS_IN_THREAD:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    if F16_PAIRS:
        tl.static_assert(ROWS_IN_THREAD, "F16_PAIRS needs BLOCK_N >= F16_MIN_BLOCK_N")
        # This program's x as fp16 pairs and row factors, in its own part of the staging buffer.
        n_rows = k_span // 8
        pairs_ptr = stage_ptr + tl.multiple_of((pid_n * SPLIT_K + pid_k) * n_rows * 5, 4)  # 16-byte rows
        inv_ptr = (pairs_ptr + 4 * n_rows).to(tl.pointer_type(tl.float32), bitcast=True)
        stage_f16_rows(x_ptr, pairs_ptr, inv_ptr, k_begin, k_span)
        tl.debug_barrier()  # the rows are read back by other threads of this program
        for k in tl.range(k_begin, k_end, BLOCK_K, num_stages=PIPELINE):
            words = tl.load(word_ptrs + (k // 8) * stride_qk, mask=n_mask[None, :], other=0)
            scale, zero = _group_scale_zero(s_ptr, z_ptr, (k // GROUP) * stride_sg + offs_n, n_mask, SYMMETRIC)
            rows = tl.multiple_of((k - k_begin) // 8, BLOCK_K // 8) + offs_w
            acc += scale * tl.sum(_f16_tile(words, zero, pairs_ptr, inv_ptr, rows, BLOCK_K), axis=0)
    else:
        for group_begin in range(k_begin, k_end, GROUP):
            partial = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            x_bias = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)  # Σ_j x_j·2^(23-P_j), BIASED only
            for k in range(group_begin, group_begin + GROUP, BLOCK_K):
                words = tl.load(word_ptrs + (k // 8) * stride_qk, mask=n_mask[None, :], other=0)
                for j in tl.static_range(8):
                    xj = tl.load(x_ptr + k + offs_w * 8 + j).to(tl.float32)
                    if BIASED:
                        partial += biased_code(words, j, code_mask) * xj[:, None]
                        x_bias += xj * (2048.0 if j != 1 and j != 4 and j != 6 else 128.0)
                    else:
                        partial += nibble(words, j, code_mask) * xj[:, None]
                    x_sum += xj
            # Loaded after the tiles: fewer registers live through them.
            row = (group_begin // GROUP) * stride_sg + offs_n
            scale, zero = _group_scale_zero(s_ptr, z_ptr, row, n_mask, SYMMETRIC)
            if ROWS_IN_THREAD:
                column = tl.sum(partial, axis=0) - tl.sum(x_bias, axis=0)
                acc += scale * (column - zero * tl.sum(x_sum, axis=0))
            else:
                acc += scale[None, :] * (partial - (zero[None, :] * x_sum[:, None] + x_bias[:, None]))
    if ROWS_IN_THREAD:
        result = acc
    else:
        result = tl.sum(acc, axis=0)
    _store(result, out_ptr + offs_n, ws_ptr + offs_n, cnt_ptr + pid_n, n_mask, SPLIT_K, SPLIT)


@triton.jit
def _mma_add(acc, a, w, SWAP_AB: tl.constexpr):
    """acc + a·w on tensor cores; SWAP_AB: acc is the transposed [BLOCK_N, BLOCK_M] product w_T·a_T."""
    if SWAP_AB:
        acc += tl.dot(tl.trans(w), tl.trans(a))
    else:
        acc += tl.dot(a, w)
    return acc


@triton.jit
def _paired_dots(a, words, zero, acc, SYMMETRIC: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Σ x·(q - z) over one K tile in eight dots: dot j pairs code j of every word row with x's
    columns j, j + 8, j + 16, ...; q - z is exact in x's 16-bit type."""
    tile = tl.zeros_like(acc)
    offset = paired_offset(zero, a.dtype, SYMMETRIC)[None, :]
    # x's tile, loaded whole (contiguous, vectorised), is split in registers into the eight
    # [BLOCK_M, BLOCK_K / 8] column sets: eight strided 2-byte loads instead kept L1 90% busy
    # (gpu_profile_h200.log, 8B gate/up_proj M = 16).
    a0246, a1357 = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 8, 2, 2, 2)))  # by bit 0 of j
    a04, a26 = tl.split(a0246)
    a15, a37 = tl.split(a1357)
    x_cols = (tl.split(a04), tl.split(a15), tl.split(a26), tl.split(a37))  # j = 0..3: (x_j, x_j+4)
    for j in tl.static_range(4):
        low, high = paired_codes(words, j, a.dtype)
        tile = _mma_add(tile, x_cols[j][0], low - offset, SWAP_AB)
        tile = _mma_add(tile, x_cols[j][1], high - offset, SWAP_AB)
    return tile


@triton.jit
def _mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_om,
    M_BUCKET, code_mask,
    GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr,
    SWAP_AB: tl.constexpr, PAIRED_DOTS: tl.constexpr = False,
):
    """M > 1: tensor cores on bf16/fp16 tiles; every K tile lies inside one group (BLOCK_K <= GROUP).

    Code j of word row r is weight row 8r + j, so the unpacked words are a [BLOCK_K / 8, 8, BLOCK_N]
    tensor whose reshape to [BLOCK_K, BLOCK_N] costs a layout conversion through shared memory.
    PAIRED_DOTS skips the reshape: eight dots per K tile, dot j pairing code j of every word row
    with x's columns j, j + 8, j + 16, ... (split from x's tile in registers), and the codes
    unpacked two at a time in 16-bit halves (`int4_unpack.paired_codes`).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Programs that share a weight column tile run close together (L2 reuse across M tiles).
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = 8 * num_n
    first_m = (pid // width) * 8
    size_m = tl.minimum(num_m - first_m, 8)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_span = K // SPLIT_K
    # A whole number of K tiles (_prune): said, so x's and the words' loads can be vectorised.
    k_begin = tl.multiple_of(pid_k * k_span, BLOCK_K)

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + k_begin
    q_ptrs = qw_ptr + (k_begin // 8 + offs_w)[:, None] * stride_qk + offs_n[None, :]
    shifts = tl.arange(0, 8) * 4
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_span, BLOCK_K):
        words = tl.load(q_ptrs, mask=n_mask[None, :], other=0)
        group = (k_begin + k) // GROUP
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            zero = tl.full((BLOCK_N,), 8, tl.int32)
        else:  # as an integer: the unpacks below take it into floats by its bit pattern
            zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0).to(tl.int32)
        a = tl.load(x_ptrs + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        if PAIRED_DOTS:
            tile = _paired_dots(a, words, zero, acc, SYMMETRIC, SWAP_AB, BLOCK_M, BLOCK_K)
            if SWAP_AB:
                acc += scale[:, None] * tile
            else:
                acc += scale[None, :] * tile
        else:
            # 2^23 + code, exactly (see int4_unpack.nibble): shift, mask-and-or, no int-to-float conversion.
            bits = ((words[:, None, :] >> shifts[None, :, None]) & code_mask) | 0x4B000000  # [BLOCK_K / 8, 8, BLOCK_N]
            codes = tl.reshape(bits, (BLOCK_K, BLOCK_N)).to(tl.float32, bitcast=True)
            big_zero = (zero | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + z, as the codes
            w = ((codes - big_zero[None, :]) * scale[None, :]).to(a.dtype)
            acc = _mma_add(acc, a, w, SWAP_AB)
        x_ptrs += BLOCK_K
        q_ptrs += (BLOCK_K // 8) * stride_qk

    if SWAP_AB:
        result = tl.trans(acc)
    else:
        result = acc
    index = offs_m[:, None] * N + offs_n[None, :]
    _store(result, out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], ws_ptr + index, cnt_ptr + pid,
           m_mask[:, None] & n_mask[None, :], SPLIT_K, SPLIT)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, stride_qk, stride_sg,
                    GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Wᵀ [K, N] in w's dtype, one [BLOCK_K, BLOCK_N] tile per program (BLOCK_K divides the group)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_w = tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    words = tl.load(qw_ptr + (k0 // 8 + offs_w)[:, None] * stride_qk + offs_n[None, :], mask=n_mask[None, :], other=0)
    bits = ((words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF) | 0x4B000000
    codes = tl.reshape(bits, (BLOCK_K, BLOCK_N)).to(tl.float32, bitcast=True)
    scale = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        w = (codes - (8388608.0 + 8.0)) * scale[None, :]
    else:
        zero = tl.load(z_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=n_mask, other=0).to(tl.float32)
        w = (codes - (8388608.0 + zero[None, :])) * scale[None, :]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=n_mask[None, :])


_KEY = ["M_BUCKET", "N", "K", "GROUP", "SYMMETRIC"]
# Compiled on a thread pool at a shape's first call, each choice kept on disk (kernels/autotune.py).
_gemv = autotune(_GEMV_CONFIGS, _KEY, _prune, _gemv_kernel, finalist_variants=_other_pipelines)
_decode = autotune(_DECODE_CONFIGS, _KEY, _prune, _mma_kernel)
_prefill = autotune(_PREFILL_CONFIGS, _KEY, _prune, _mma_kernel)


def compile_for_sm90(kernel, constexprs: dict, warps: int, stages: int, activations: str = "bf16"):
    """`_gemv_kernel` or `_mma_kernel` compiled for sm_90 without a GPU (sm90_compile): for the
    compile tests and gemv_sass.py. Activations and output are `activations` ("bf16" or "fp16")."""
    types = {**ARGUMENT_TYPES, "x_ptr": f"*{activations}", "out_ptr": f"*{activations}"}
    return sm90_compile.compile_for_sm90(kernel, types, constexprs, ALIGNED_ARGUMENTS,
                                         {"num_warps": warps, "num_stages": stages})


def supports(packed: PackedInt4) -> bool:
    """Whether this kernel handles the layout (group size a multiple of 32; K a multiple of it)."""
    return packed.group_size % 32 == 0 and packed.in_features % packed.group_size == 0 and packed.qweight.is_cuda


def _autotuned(m: int):
    return _gemv if m == 1 else _decode if m <= DECODE_MAX_M else _prefill


def _describe(config: triton.Config) -> str:
    """A config as the benchmark tables name it, e.g. "16x128x128 split 4 swap paired"."""
    kw = config.kwargs
    flags = [name for name, on in (("swap", kw.get("SWAP_AB")), ("paired", kw.get("PAIRED_DOTS")),
                                   ("biased", kw.get("BIASED")), ("f16", kw.get("F16_PAIRS"))) if on]
    if kw.get("F16_PAIRS"):
        flags.append(f"pipeline {kw['PIPELINE']}")
    return " ".join([f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}", f"split {kw['SPLIT_K']}", *flags])


def tuned_config(m: int, packed: PackedInt4) -> str | None:
    """The tile config the autotuner chose for this shape and M bucket (None before the first call),
    e.g. "16x128x128 split 4 swap paired": which candidate won is what a benchmark row must say."""
    key = (bucket(m), packed.out_features, packed.in_features, packed.group_size, packed.zeros is None)  # _KEY's order
    config = chosen_config(_autotuned(m), key)
    return None if config is None else _describe(config)


def pinned_config(m: int, name: str):
    """Within the block, M's kernel has one candidate, the one `tuned_config` would call `name`: a
    profiler can then look at the config a benchmark chose without re-tuning under the profiler,
    whose timings differ."""
    return pinned(_autotuned(m), name, _describe, f"tuned_config() gives the names of M={m}'s W4A16 configs")


def _stream_key(device: torch.device) -> tuple[str, int]:
    """Buffers a launch writes are kept per (device, stream): two streams never share one."""
    return str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def staging(device: torch.device, n: int, k: int) -> torch.Tensor:
    """The GEMV's buffer for x staged as fp16 pairs (F16_PAIRS): five int32 per eight of K for each
    column tile, per (device, stream) like the workspace; nothing in it outlives a call."""
    size = triton.cdiv(n, F16_MIN_BLOCK_N) * k * 5 // 8
    key = _stream_key(device)
    held = _STAGING.get(key)
    if held is None or held.numel() < size:
        held = torch.empty(size, device=device, dtype=torch.int32)
        _STAGING[key] = held
    return held


def split_k_workspace(device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed float32 sums and int32 counters split-K programs share (kept zero by the kernels;
    w4a16_gluon's kernel meets through the same ones)."""
    key = _stream_key(device)
    held = _WORKSPACE.get(key)
    if held is None or held[0].numel() < size:
        held = (torch.zeros(size, device=device, dtype=torch.float32),
                torch.zeros(size, device=device, dtype=torch.int32))
        _WORKSPACE[key] = held
    return held


def matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [M, K] (bf16/fp16, CUDA) @ Wᵀ -> [M, N] in x's dtype, one kernel launch."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.out_features
    zeros = packed.zeros if packed.zeros is not None else packed.scales  # unused when symmetric
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    ws, counters = split_k_workspace(x.device, m * n if m <= DECODE_MAX_M else 1)
    buffers = (x, packed.qweight, packed.scales, zeros, out, ws, counters)
    sizes = (m, n, k, x.stride(0), packed.qweight.stride(0), packed.scales.stride(0), out.stride(0), bucket(m),
             CODE_MASK)
    common = dict(GROUP=packed.group_size, SYMMETRIC=packed.zeros is None)
    if m == 1:
        _gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
            *buffers, staging(x.device, n, k), *sizes, **common)
    else:
        kernel = _autotuned(m)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        kernel[grid](*buffers, *sizes, **common)
    return out


def dequantize_transposed(packed: PackedInt4, dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ [K, N] in `dtype` (columns in the packed order), one launch: for dequantize-then-cuBLAS."""
    k, n = packed.in_features, packed.out_features
    block_k = next(t for t in _K_TILES if packed.group_size % t == 0)
    out = torch.empty(k, n, device=packed.qweight.device, dtype=dtype)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    _dequant_kernel[(triton.cdiv(n, 128), k // block_k)](
        packed.qweight, packed.scales, zeros, out, n, packed.qweight.stride(0), packed.scales.stride(0),
        GROUP=packed.group_size, SYMMETRIC=packed.zeros is None, BLOCK_N=128, BLOCK_K=block_k)
    return out


def dequantize_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [M, K] @ Wᵀ by dequantizing to x's dtype, then cuBLAS: wins over the fused kernel at large M."""
    return torch.mm(x, dequantize_transposed(packed, x.dtype))
