"""Triton VQ matmul: y = x Wᵀ with W's codebook entries gathered while multiplying (M = 1..16 and up).

Each program owns BLOCK_N output rows and BLOCK_M rows of x and walks the input axis BLOCK_K
columns at a time. Column k of the tile belongs to vector k // DIM, coordinate k % DIM: the
program loads that vector's index for each of its rows (each index is read DIM times, from cache),
gathers codebook[group(k), index, k % DIM] (the codebook, a few KiB to a few MiB, stays in L2),
sums the stages, and feeds the decoded [BLOCK_N, BLOCK_K] tile to `tl.dot` with the x tile.
The dense weight never exists in memory; only int32 indices (bits/DIM per weight of reading,
as stored unpacked) and x are streamed. Row scales are applied to the accumulator at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.vq_matmul import PackedVQ


@triton.jit
def _vq_kernel(
    x_ptr, codes_ptr, book0_ptr, book1_ptr, scale_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, codes_stage_stride, n_vectors, vectors_per_group, k0_size, k1_size,
    DIM: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows_m < M
    mask_n = rows_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K)
        mask_k = cols < K
        vector = cols // DIM
        coordinate = cols % DIM
        group = vector // vectors_per_group
        tile_mask = mask_n[:, None] & mask_k[None, :]
        code_offsets = rows_n[:, None] * n_vectors + vector[None, :]
        index = tl.load(codes_ptr + code_offsets, mask=tile_mask, other=0)
        w = tl.load(book0_ptr + (group[None, :] * k0_size + index) * DIM + coordinate[None, :],
                    mask=tile_mask, other=0.0).to(tl.float32)
        if STAGES == 2:
            index1 = tl.load(codes_ptr + codes_stage_stride + code_offsets, mask=tile_mask, other=0)
            w += tl.load(book1_ptr + (group[None, :] * k1_size + index1) * DIM + coordinate[None, :],
                         mask=tile_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    scale = tl.load(scale_ptr + rows_n, mask=mask_n, other=0.0)
    acc = acc * scale[None, :]
    tl.store(y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def vq_matmul_triton(x: torch.Tensor, packed: PackedVQ, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [M, in] (contiguous rows) @ Wᵀ in x's dtype; the codebooks are read in x's dtype."""
    m, k = x.shape
    n = packed.out_features
    if k != packed.in_features:
        raise ValueError(f"x has {k} features, the weight expects {packed.in_features}")
    x = x.contiguous()
    codes = packed.codes.contiguous()
    books = [book.to(x.dtype).contiguous() for book in packed.codebooks]
    second = books[1] if len(books) > 1 else books[0]
    scale = packed.scale.reshape(-1).float().contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _vq_kernel[grid](
        x, codes, books[0], second, scale, y, m, n, k, x.stride(0), y.stride(0), codes.stride(0),
        codes.shape[2], packed.vectors_per_group, books[0].shape[1], second.shape[1],
        DIM=packed.dim, STAGES=len(books), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y
