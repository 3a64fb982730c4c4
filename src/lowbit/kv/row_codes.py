"""KV entries coded a row at a time: 8-bit codes with one float32 scale per token and head.

Where the integer layouts (quantizer.py) group keys along tokens, which a cache can only quantize
a whole group of tokens at a time, every row of head_dim numbers here is quantized on its own the
moment it is written, so a fixed-shape decoder can write each new position straight into its
cache slot and attention reads one byte a number instead of two. Two codes:

- "int8-token": symmetric int8, scale = max|row| / 127, code = row / scale rounded to nearest even;
- "fp8": float8 e4m3, scale = max|row| / 448 (e4m3's largest finite value), code = row / scale
  rounded to the nearest e4m3 value (ties to even). e4m3 gives every number of a row about the
  same relative precision (3 mantissa bits); int8 gives every number the same absolute step.

On SmolLM2-135M the int8 rows cost a tenth of the fp8 rows' KL at the same bytes (0.0002 against
0.0021, benchmarks/results/kv_cache_rows.md): most rows are not dominated by one outlier, and
there int8's 8 bits of uniform steps beat e4m3's 3 of mantissa.

Entry = code · scale, computed in float32 and rounded once to the activations' dtype. The scale is
max|row| times the float32 reciprocal of the code's maximum (a product, which torch rounds alike on
CPUs and CUDA, where it turns a division by a number into this product). The torch paths here, the
eval cache layer (row_layer.py) and the decoder's write kernel (kernels/decode_ops.py) store the
same bytes; the decoder's attention (kernels/decode_attention.py) applies the scales after its
products, without the entries' rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODES = {"int8-token": torch.int8, "fp8": torch.float8_e4m3fn}
"""Each row-coded cache kind's code dtype."""
SCALE_DTYPE = torch.float32
"""One scale per row (4 bytes against 128 of codes at head_dim 128)."""


def code_max(codes: torch.dtype) -> float:
    """The largest code magnitude: 127 for int8 (symmetric), 448 for e4m3."""
    return 127.0 if codes == torch.int8 else torch.finfo(codes).max


def quantize_rows(x: torch.Tensor, codes: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [..., D] of dtype `codes` and scales [...] (float32) of x [..., D], one scale a row;
    a row of zeros gets scale 0 and codes 0."""
    rows = x.float()
    largest = code_max(codes)
    scale = rows.abs().amax(dim=-1) * (1.0 / largest)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (rows / safe.unsqueeze(-1)).clamp(-largest, largest)
    return (torch.round(scaled) if codes == torch.int8 else scaled).to(codes), scale


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """code · scale in float32, rounded once to `dtype`."""
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


@dataclass(frozen=True, eq=False)
class CodedCache:
    """One layer's keys or values in a fixed-shape decoder: codes [batch, kv_heads, max_len, D]
    (int8 or e4m3), scales [batch, kv_heads, max_len], and `latest` [batch, kv_heads, D], the exact
    entries of the position written last. Attention reads `latest` at that position instead of its
    codes: a position attends to itself exactly, as through the eval cache (row_layer.py), so
    decoding and `lowbit eval --kv-cache KIND` score the same cache."""

    codes: torch.Tensor
    scales: torch.Tensor
    latest: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, dim: int, device: torch.device | str,
              dtype: torch.dtype, codes: torch.dtype) -> CodedCache:
        return cls(torch.zeros(batch, kv_heads, max_len, dim, device=device, dtype=codes),
                   torch.zeros(batch, kv_heads, max_len, device=device, dtype=SCALE_DTYPE),
                   torch.zeros(batch, kv_heads, dim, device=device, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype, in which entries are read."""
        return self.latest.dtype

    def write(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Quantize x [batch, kv_heads, T, D] into `positions` [T]; its last position becomes `latest`."""
        codes, scales = quantize_rows(x, self.codes.dtype)
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
