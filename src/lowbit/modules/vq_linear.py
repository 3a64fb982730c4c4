"""VQLinear: an nn.Linear whose weight stays as codebook indices (formats/vector.py).

Buffers hold the int32 indices, the float16 codebooks and the row scales; forward runs
`lowbit.kernels.vq_matmul` (Triton on CUDA, the faster measured CPU path elsewhere), so the dense
weight is never materialised in the module.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.base import FormatError, QuantizedWeight
from lowbit.formats.vector import CODEBOOK_DTYPE, VectorFormat
from lowbit.kernels.vq_matmul import PackedVQ, vq_matmul


class VQLinear(nn.Module):
    """y = x Wᵀ + b with W = scale · Σ_s codebook_s[codes_s] (one or two codebook stages)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        fmt = qweight.format
        if not isinstance(fmt, VectorFormat) or fmt.codebooks is None:
            raise FormatError("VQLinear holds vector-quantized weights (format vq, codebooks fitted)")
        self.out_features, self.in_features = qweight.shape
        self.dim = fmt.dim
        self.register_buffer("codes", qweight.codes.to(torch.int32).contiguous())
        for stage, book in enumerate(fmt.codebooks):
            self.register_buffer(f"codebook_{stage}", book.to(CODEBOOK_DTYPE).contiguous())
        self.stages = len(fmt.codebooks)
        self.register_buffer("scale", qweight.scale.float().reshape(-1, 1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def packed(self) -> PackedVQ:
        books = tuple(getattr(self, f"codebook_{stage}") for stage in range(self.stages))
        return PackedVQ(self.codes, books, self.scale, self.dim)

    def dequantized_weight(self) -> torch.Tensor:
        return self.packed.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = vq_matmul(x, self.packed)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        books = "+".join(str(getattr(self, f"codebook_{s}").shape[1]) for s in range(self.stages))
        return f"in_features={self.in_features}, out_features={self.out_features}, vq d{self.dim} K={books}"
