"""b-bit codes packed into bytes, so that a quantized cache really holds b bits per entry.

Codes are unsigned (0 .. 2^b - 1) and packed along the last axis, 8 / b codes per byte with the
first code in the lowest bits. Packing along the axis a group spans keeps every group a
contiguous run of bytes, so chunks quantized at different times concatenate as bytes.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)
"""Widths that divide a byte; 3-bit codes would straddle bytes and cost a gather to unpack."""


class PackingError(ValueError):
    """Codes that cannot be packed at this width; the message says which length to use."""


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, device=device, dtype=torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] -> uint8 bytes [..., n * bits / 8]."""
    if bits not in PACKABLE_BITS:
        raise PackingError(f"codes pack at {', '.join(map(str, PACKABLE_BITS))} bits, not {bits}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per_byte = 8 // bits
    length = codes.shape[-1]
    if length % per_byte:
        raise PackingError(f"{length} codes of {bits} bits do not fill whole bytes; use a multiple of {per_byte}")
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], length // per_byte, per_byte)
    return (grouped << _shifts(bits, codes.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes [..., m] -> uint8 codes [..., m * 8 / bits]; the inverse of pack_codes."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))
