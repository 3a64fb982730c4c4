"""Float8 KV entries: float8 e4m3 codes with one float32 scale per token and head.

Where the integer layouts (quantizer.py) group keys along tokens, which a cache can only quantize
a whole group of tokens at a time, every float8 entry is quantized on its own row of head_dim
numbers the moment it is written: scale = max|row| / 448 (e4m3's largest finite value), code =
row / scale rounded to nearest even (clamped to ±448). A fixed-shape decoder can then write each new position
straight into its cache slot, and attention reads one byte a number instead of two. e4m3's
exponent gives every number of a row about the same relative precision (3 mantissa bits), so a
key channel ten times larger than the rest costs the others nothing, unlike an integer grid
spanning that row.

Entry = code · scale, computed in float32 and rounded once to the activations' dtype. The torch
paths here, the eval cache layer (float8_layer.py) and the decoder's write kernel
(kernels/decode_ops.py) store the same bytes; the decoder's attention (kernels/decode_attention.py)
applies the scales after its products, without the entries' rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODE_DTYPE = torch.float8_e4m3fn
CODE_MAX = torch.finfo(CODE_DTYPE).max
"""448: a row's largest magnitude maps here."""
INVERSE_MAX = 1.0 / CODE_MAX
"""scale = max|row| · (1/448) in float32: a product, which every device rounds alike (torch on
CUDA turns a division by a number into this product, and on CPUs does not)."""
SCALE_DTYPE = torch.float32
"""One scale per row (4 bytes against 128 of codes at head_dim 128)."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [..., D] (CODE_DTYPE) and scales [...] (float32) of x [..., D], one scale a row; a
    row of zeros gets scale 0 and codes 0."""
    rows = x.float()
    scale = rows.abs().amax(dim=-1) * INVERSE_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (rows / safe.unsqueeze(-1)).clamp(-CODE_MAX, CODE_MAX).to(CODE_DTYPE)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """code · scale in float32, rounded once to `dtype`."""
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


@dataclass(frozen=True, eq=False)
class Float8Cache:
    """One layer's keys or values in a fixed-shape decoder: codes [batch, kv_heads, max_len, D],
    scales [batch, kv_heads, max_len], and `latest` [batch, kv_heads, D], the exact entries of the
    position written last. Attention reads `latest` at that position instead of its codes: a
    position attends to itself exactly, as through the eval cache (float8_layer.py), so decoding
    and `lowbit eval --kv-cache fp8` score the same arithmetic."""

    codes: torch.Tensor
    scales: torch.Tensor
    latest: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, dim: int, device: torch.device,
              dtype: torch.dtype) -> Float8Cache:
        return cls(torch.zeros(batch, kv_heads, max_len, dim, device=device, dtype=CODE_DTYPE),
                   torch.zeros(batch, kv_heads, max_len, device=device, dtype=SCALE_DTYPE),
                   torch.zeros(batch, kv_heads, dim, device=device, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype, in which entries are read."""
        return self.latest.dtype

    def write(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Quantize x [batch, kv_heads, T, D] into `positions` [T]; its last position becomes `latest`."""
        codes, scales = quantize_rows(x)
        # as bytes: index_copy_ has no float8 kernel on CPUs
        self.codes.view(torch.uint8).index_copy_(2, positions, codes.view(torch.uint8))
        self.scales.index_copy_(2, positions, scales)
        self.latest.copy_(x[:, :, -1])

    def read(self, length: int, exact: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Entries [batch, kv_heads, length, D]: dequantized, except at `positions` [T], which read
        `exact` [batch, kv_heads, T, D] (the entries just written: a chunk attends to itself exactly)."""
        entries = dequantize_rows(self.codes[:, :, :length], self.scales[:, :, :length], self.dtype)
        return entries.index_copy_(2, positions, exact.to(self.dtype))

    def read_at(self, pos: torch.Tensor) -> torch.Tensor:
        """Entries [batch, kv_heads, max_len, D] as a step at `pos` (a 1-element tensor) reads
        them: dequantized, `latest` at pos. Positions after pos are whatever they hold; the
        attention masks them."""
        entries = dequantize_rows(self.codes, self.scales, self.dtype)
        return entries.index_copy_(2, pos, self.latest.unsqueeze(2))
