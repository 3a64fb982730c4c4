"""Triton W4A16 matmul: y = x Wᵀ with W in the PackedInt4 layout, dequantized on the fly.

A GEMV for M = 1 (see _w4a16_gemv_kernel) and one tiled kernel body in two autotuned families:
  * small M (decode, M <= 64): the work is reading the weight, K·N/2 bytes. A 16- or 64-row tile
    keeps the tensor cores' minimum shape, and split-K (each program one slice of K, partial sums
    added with float32 atomics into a zeroed buffer) gives enough programs to keep every SM's loads
    in flight even when N / BLOCK_N alone is below the SM count (N = 1024 .. 8192 here);
  * large M: a classic tiled GEMM whose B tile is unpacked and scaled in registers right before
    `tl.dot`, so the bf16 weight never exists in global memory; no split, the output written once.
Every K tile lies inside one quantization group (BLOCK_K divides the group size), so a tile needs
one row of scales (and of zero points) per column of the tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.int4_pack import PackedInt4

DECODE_MAX_M = 64
"""Largest M the split-K (atomic) family handles; above it the output is written directly."""

_K_TILES = (128, 64, 32)
"""BLOCK_K candidates, largest first; each launch uses the largest that divides the group size."""


def _config(bm: int, bn: int, split: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split}, num_warps=warps, num_stages=stages)


_DECODE_CONFIGS = [_config(16, 128, s, 4, 4) for s in (1, 2, 4, 8, 16)] + [
    _config(16, 64, s, 4, 4) for s in (4, 8)
] + [_config(64, 128, s, 4, 4) for s in (1, 2, 4)] + [_config(64, 64, s, 4, 4) for s in (4, 8)]
_PREFILL_CONFIGS = [
    _config(64, 128, 1, 4, 4),
    _config(128, 128, 1, 8, 3),
    _config(128, 256, 1, 8, 3),
    _config(64, 256, 1, 8, 3),
]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep configs whose row tile suits M, and give each the K tile the group size allows."""
    args = {**named_args, **kwargs}
    m, k, group = args["M_BUCKET"], args["K"], args["GROUP"]
    block_k = next(t for t in _K_TILES if group % t == 0)
    kept = []
    for config in configs:
        kwargs = dict(config.kwargs)
        bm, split = kwargs["BLOCK_M"], kwargs["SPLIT_K"]
        if bm == 1:
            del kwargs["BLOCK_M"]  # the GEMV kernel has no row tile
        elif bm <= DECODE_MAX_M and (bm == 16) != (m <= 16):
            continue  # decode family: 16-row tiles serve M = 2..16, 64-row tiles M = 17..64
        if k % (block_k * split):
            continue
        kept.append(triton.Config({**kwargs, "BLOCK_K": block_k}, num_warps=config.num_warps,
                                  num_stages=config.num_stages))
    return kept


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_om,
    M_BUCKET,
    GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
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
    k_begin = pid_k * k_span

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :]
    q_ptrs = qw_ptr + (k_begin // 8 + offs_w)[:, None] * stride_qk + offs_n[None, :]
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_span, BLOCK_K):
        a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        words = tl.load(q_ptrs, mask=n_mask[None, :], other=0)
        nibbles = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        codes = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)).to(tl.float32)
        group = (k_begin + k) // GROUP
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            w = (codes - 8.0) * scale[None, :]
        else:
            zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0).to(tl.float32)
            w = (codes - zero[None, :]) * scale[None, :]
        acc += tl.dot(a, w.to(a.dtype))
        x_ptrs += BLOCK_K
        q_ptrs += (BLOCK_K // 8) * stride_qk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    N, K,
    stride_qk, stride_sg,
    M_BUCKET,
    GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """M = 1: no tensor cores. Inside a K tile the group's scale and zero point are constants, so
    Σ_k (q_k - z)·s·x_k = s·(Σ_k q_k·x_k - z·Σ_k x_k): per weight only unpack, convert and one FMA."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    k_span = K // SPLIT_K
    k_begin = pid_k * k_span
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(k_begin, k_begin + k_span, BLOCK_K):
        words = tl.load(qw_ptr + (k // 8 + offs_w)[:, None] * stride_qk + offs_n[None, :], mask=n_mask[None, :], other=0)
        partial = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + k + offs_w * 8 + j).to(tl.float32)
            partial += ((words >> (4 * j)) & 0xF).to(tl.float32) * xj[:, None]
            x_sum += xj
        group = k // GROUP
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            zero = 8.0
        else:
            zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0).to(tl.float32)
        acc += scale * (tl.sum(partial, axis=0) - zero * tl.sum(x_sum, axis=0))
    tl.atomic_add(out_ptr + offs_n, acc, mask=n_mask, sem="relaxed")


def _bench(kernel_call, quantiles):
    # Short autotuning runs: a few ms per config is enough to rank them, and keeps first calls fast.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_GEMV_CONFIGS = [_config(1, bn, s, 4, 4) for bn, s in
                 ((128, 1), (128, 2), (128, 4), (128, 8), (64, 4), (64, 8), (64, 16), (256, 2), (256, 4), (256, 8))]
_KEY = ["M_BUCKET", "N", "K", "GROUP", "SYMMETRIC"]
_decode = triton.autotune(_DECODE_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                          reset_to_zero=["out_ptr"], do_bench=_bench)(_w4a16_kernel)
_gemv = triton.autotune(_GEMV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                        reset_to_zero=["out_ptr"], do_bench=_bench)(_w4a16_gemv_kernel)
_prefill = triton.autotune(_PREFILL_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                           do_bench=_bench)(_w4a16_kernel)


def supports(packed: PackedInt4) -> bool:
    """Whether this kernel handles the layout (group size a multiple of 32; K a multiple of it)."""
    return packed.group_size % 32 == 0 and packed.in_features % packed.group_size == 0 and packed.qweight.is_cuda


def _bucket(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 64 if m <= DECODE_MAX_M else 1 << (m - 1).bit_length()


def matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [M, K] (bf16/fp16, CUDA) @ Wᵀ -> [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.out_features
    zeros = packed.zeros if packed.zeros is not None else packed.scales  # unused when symmetric
    common = dict(GROUP=packed.group_size, SYMMETRIC=packed.zeros is None)
    if m == 1:
        out = torch.zeros(1, n, device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _gemv[grid](x, packed.qweight, packed.scales, zeros, out, n, k, packed.qweight.stride(0),
                    packed.scales.stride(0), 1, **common)
        return out.to(x.dtype)
    if m <= DECODE_MAX_M:
        out = torch.zeros(m, n, device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _decode[grid](x, packed.qweight, packed.scales, zeros, out, m, n, k,
                      x.stride(0), packed.qweight.stride(0), packed.scales.stride(0), out.stride(0),
                      _bucket(m), ATOMIC=True, **common)
        return out.to(x.dtype)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)  # noqa: E731
    _prefill[grid](x, packed.qweight, packed.scales, zeros, out, m, n, k,
                   x.stride(0), packed.qweight.stride(0), packed.scales.stride(0), out.stride(0),
                   _bucket(m), ATOMIC=False, **common)
    return out

