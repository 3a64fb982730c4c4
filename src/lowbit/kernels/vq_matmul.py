"""y = x Wᵀ for a vector-quantized W (formats/vector.py) without keeping W dense.

Two CPU paths, and the Triton kernel (kernels/vq_triton.py) on CUDA:
  * `gather`: decode W (gather codebook rows by index, times the row scales), then one matmul;
  * `lut` (lookup-table GEMV): for each vector slot v the dot products x_v · c_k with every
    codeword k are one small matmul ([M, n_vectors, K]); y[m, r] is then the sum over v of the
    entry codes[r, v], a gather of rows·n_vectors values instead of rows·columns weights.
    It pays off while M·n_vectors·K (the table) is small next to rows·columns (the weight).
`vq_matmul` picks by M: `lut` up to LUT_MAX_M rows of x, `gather` beyond
(benchmarks/vq.py --decode measures both; see docs/formats.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.formats.vector import gather_codewords

LUT_MAX_M = 2
"""Largest M for which the lookup-table path is used on CPU. Measured (benchmarks/vq.py --decode,
one thread, d=4, K=2^9): at M=1 the table path took 0.47 ms against 3.6 ms for gather on a
1536 x 576 layer; at M=4 the two were within 2x either way, at M=16 gather was 3-30x faster."""

DecodePath = Literal["gather", "lut", "triton"]


@dataclass(frozen=True)
class PackedVQ:
    """What a VQ matmul reads: codes int32 [stages, rows, n_vectors], one codebook per stage
    [groups, K_s, dim] (float32, or fp16 on GPU), scale float32 [rows, 1]."""

    codes: torch.Tensor
    codebooks: tuple[torch.Tensor, ...]
    scale: torch.Tensor
    dim: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    @property
    def in_features(self) -> int:
        return self.codes.shape[2] * self.dim

    @property
    def vectors_per_group(self) -> int:
        return self.codes.shape[2] // self.codebooks[0].shape[0]

    def dequantize(self) -> torch.Tensor:
        books = tuple(book.float() for book in self.codebooks)
        return gather_codewords(self.codes, books, self.vectors_per_group) * self.scale.float()


def vq_matmul_gather(x: torch.Tensor, packed: PackedVQ) -> torch.Tensor:
    return (x.float() @ packed.dequantize().T).to(x.dtype)


def vq_matmul_lut(x: torch.Tensor, packed: PackedVQ) -> torch.Tensor:
    m = x.shape[0]
    groups = packed.codebooks[0].shape[0]
    vectors = x.float().reshape(m, groups, packed.vectors_per_group, packed.dim)
    y = None
    slot = torch.arange(packed.codes.shape[2], device=x.device)
    for stage, book in enumerate(packed.codebooks):
        k = book.shape[1]
        table = (vectors @ book.float().transpose(1, 2)).reshape(m, -1)  # [M, n_vectors·K]
        picked = table[:, slot * k + packed.codes[stage].long()]  # [M, rows, n_vectors]
        part = picked.sum(dim=2)
        y = part if y is None else y + part
    return (y * packed.scale.float().T).to(x.dtype)


def choose_path(x: torch.Tensor) -> DecodePath:
    from lowbit.kernels.w4a16 import triton_available

    if x.is_cuda and triton_available():
        return "triton"
    return "lut" if x.shape[0] <= LUT_MAX_M else "gather"


def vq_matmul(x: torch.Tensor, packed: PackedVQ, path: DecodePath | None = None) -> torch.Tensor:
    """x [..., in_features] @ Wᵀ -> [..., out_features], in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    path = path or choose_path(x2)
    if path == "triton":
        from lowbit.kernels.vq_triton import vq_matmul_triton

        y = vq_matmul_triton(x2, packed)
    elif path == "lut":
        y = vq_matmul_lut(x2, packed)
    else:
        y = vq_matmul_gather(x2, packed)
    return y.reshape(*shape[:-1], packed.out_features)
