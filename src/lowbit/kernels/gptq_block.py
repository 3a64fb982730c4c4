"""GPTQ's inner loop over one block of columns as a single Triton kernel (CUDA only).

In solvers/gptq.py each column of a block costs a dozen small torch ops (encode, decode, error,
a rank-1 update of the rest of the block): on a GPU that is launch latency, about a second per
4096 columns, more than the rest of the solve. Rows are independent given U, so here one program
owns a tile of rows and walks the block's columns with the tile held in registers: fit the
group's scale / zero point when a group starts (min-max, exactly IntegerFormat.fit) or load the
given ones (static groups, fitted by the solver beforehand, with or without a clipping search),
round the column, divide its error by U[i, i], subtract err ⊗ U[i, i+1:]. The lazy update of the
columns after the block stays a torch matmul in the solver.

Supported: IntegerFormat groups that tile the block (block_size % group_size == 0), either fitted
here on the weights as updated so far (dynamic groups, no clipping search) or given. The solver
keeps its torch loop for everything else and on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lowbit.formats.base import GroupParams
from lowbit.formats.integer import IntegerFormat

_SCALE_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _rint(x):
    """Round half to even, as torch.round: the rounding of IntegerFormat.encode."""
    return libdevice.rint(x)


@triton.jit
def _gptq_block_kernel(
    w_ptr, u_ptr, codes_ptr, err_ptr, scale_ptr, zero_ptr,
    rows, columns,
    stride_w, stride_u, stride_c, stride_e, stride_s,
    max_code, tiny,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    SCALE_TYPE: tl.constexpr, GIVEN: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    r_mask = offs_r < rows
    c_mask = offs_c < columns
    tile_mask = r_mask[:, None] & c_mask[None, :]
    W = tl.load(w_ptr + offs_r[:, None] * stride_w + offs_c[None, :], mask=tile_mask, other=0.0)
    codes = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    errors = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    scale = tl.zeros((BLOCK_R,), dtype=tl.float32)
    zero = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(0, columns):
        if i % GROUP == 0:
            if GIVEN:  # static groups: the solver's parameters, read once per group
                scale = tl.load(scale_ptr + offs_r * stride_s + i // GROUP, mask=r_mask, other=1.0)
                zero = tl.load(zero_ptr + offs_r * stride_s + i // GROUP, mask=r_mask, other=0.0)
            else:
                in_group = (offs_c[None, :] >= i) & (offs_c[None, :] < i + GROUP) & c_mask[None, :]
                lo = tl.minimum(tl.min(tl.where(in_group, W, float("inf")), axis=1), 0.0)
                hi = tl.maximum(tl.max(tl.where(in_group, W, float("-inf")), axis=1), 0.0)
                if SYMMETRIC:
                    scale = tl.maximum(-lo, hi) / (max_code / 2)
                else:
                    scale = (hi - lo) / max_code
                scale = tl.maximum(scale.to(SCALE_TYPE).to(tl.float32), tiny)  # the stored value
                if SYMMETRIC:
                    zero = tl.zeros((BLOCK_R,), dtype=tl.float32) + (max_code + 1) / 2
                else:
                    zero = tl.minimum(tl.maximum(_rint(-lo / scale), 0.0), max_code)
                tl.store(scale_ptr + offs_r * stride_s + i // GROUP, scale, mask=r_mask)
                tl.store(zero_ptr + offs_r * stride_s + i // GROUP, zero, mask=r_mask)
        here = offs_c[None, :] == i
        w = tl.sum(tl.where(here, W, 0.0), axis=1)
        q = tl.minimum(tl.maximum(_rint(w / scale) + zero, 0.0), max_code)
        err = (w - (q - zero) * scale) / tl.load(u_ptr + i * stride_u + i)
        u_row = tl.load(u_ptr + i * stride_u + offs_c, mask=(offs_c > i) & c_mask, other=0.0)
        W -= err[:, None] * u_row[None, :]
        codes = tl.where(here, q.to(tl.int32)[:, None], codes)
        errors = tl.where(here, err[:, None], errors)
    tl.store(codes_ptr + offs_r[:, None] * stride_c + offs_c[None, :], codes.to(tl.uint8), mask=tile_mask)
    tl.store(err_ptr + offs_r[:, None] * stride_e + offs_c[None, :], errors, mask=tile_mask)


def supports(fmt: object, columns: int, block_size: int, weight: torch.Tensor) -> bool:
    """Whether gptq_block can replace the torch loop for this format and matrix."""
    return (
        weight.is_cuda
        and weight.dtype == torch.float32
        and isinstance(fmt, IntegerFormat)
        and not fmt.per_tensor
        and fmt.group_size_for(columns) <= block_size
        and block_size % fmt.group_size_for(columns) == 0
        and block_size <= 256
    )


def gptq_block(
    W1: torch.Tensor, U1: torch.Tensor, fmt: IntegerFormat, given: GroupParams | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize the block W1 [rows, b] (float32, CUDA) with U1 = U[block, block] (upper, float32).

    `given` holds the block's group parameters when they are fixed beforehand (static groups:
    scales [rows, groups], zero points or None); without it each group is fitted when reached.
    Returns (codes uint8 [rows, b], errors [rows, b] = (w - ŵ) / U[i, i] per column, scales
    [rows, groups] in fmt.scale_dtype, zero points [rows, groups] float32 or None if symmetric).
    """
    rows, columns = W1.shape
    group = fmt.group_size_for(columns)
    groups = -(-columns // group)
    W1 = W1.contiguous()
    U1 = U1.contiguous()
    codes = torch.empty(rows, columns, dtype=torch.uint8, device=W1.device)
    errors = torch.empty(rows, columns, dtype=torch.float32, device=W1.device)
    if given is None:
        scales = torch.empty(rows, groups, dtype=torch.float32, device=W1.device)
        zeros = torch.empty(rows, groups, dtype=torch.float32, device=W1.device)
    else:
        scales = given.scale.float().contiguous()
        zeros = (torch.full_like(scales, (fmt.max_code + 1) / 2) if given.zero is None
                 else given.zero.float().contiguous())
        if scales.shape != (rows, groups) or zeros.shape != (rows, groups):
            raise ValueError(f"given parameters of shape {tuple(scales.shape)} do not fit {rows} rows x {groups} groups")
    block_r = 16
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        W1, U1, codes, errors, scales, zeros, rows, columns,
        W1.stride(0), U1.stride(0), codes.stride(0), errors.stride(0), scales.stride(0),
        float(fmt.max_code), float(torch.finfo(fmt.scale_dtype).tiny),
        BLOCK_R=block_r, BLOCK_C=triton.next_power_of_2(columns), GROUP=group, SYMMETRIC=fmt.symmetric,
        SCALE_TYPE=_SCALE_TYPES[fmt.scale_dtype], GIVEN=given is not None, num_warps=4,
    )
    return codes, errors, scales.to(fmt.scale_dtype), None if fmt.symmetric else zeros
