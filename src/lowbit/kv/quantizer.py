"""Asymmetric min/max integer quantization of KV entries, one scale and minimum per group.

A group is `group_size` consecutive entries along the last axis. Its range is exactly
[min, max] (not widened to contain 0 as weight grids are): a key channel that sits at +5 ± 0.5
for every token would otherwise spend most of its codes on values it never takes. The scale and
minimum are rounded to float16 before any code is chosen, so decoding uses the stored numbers.
Entry = code * scale + minimum, code in 0 .. 2^bits - 1.

Keys are quantized per channel (groups run along tokens) and values per token (groups run along
channels), as KIVI found best: key outliers live in fixed channels, value errors matter per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kv.packing import pack_codes, unpack_codes

PARAM_DTYPE = torch.float16
"""Storage of every group's scale and minimum (2 bytes each)."""


@dataclass
class PackedGroups:
    """Packed codes [..., n * bits / 8] with a scale and minimum [..., n / group_size] per group."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int

    @property
    def length(self) -> int:
        """Entries along the grouped axis."""
        return self.scale.shape[-1] * self.group_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_codes(self.codes, self.bits)
        grouped = codes.reshape(*self.scale.shape, self.group_size).float()
        values = grouped * self.scale.float().unsqueeze(-1) + self.minimum.float().unsqueeze(-1)
        return values.reshape(*self.scale.shape[:-1], self.length).to(dtype)

    def append(self, other: PackedGroups, dim: int) -> PackedGroups:
        """These entries followed by `other`'s along axis `dim` (-1: the grouped axis, whole groups
        at a time; an earlier axis: more rows of groups). Same bits and group size."""
        return PackedGroups(
            torch.cat([self.codes, other.codes], dim=dim),
            torch.cat([self.scale, other.scale], dim=dim),
            torch.cat([self.minimum, other.minimum], dim=dim),
            self.bits,
            self.group_size,
        )

    def select_batch(self, index: torch.Tensor) -> PackedGroups:
        """Rows `index` of the leading (batch) axis: beam reordering and batch selection."""
        return PackedGroups(self.codes[index], self.scale[index], self.minimum[index], self.bits, self.group_size)


def quantize_groups(x: torch.Tensor, bits: int, group_size: int) -> PackedGroups:
    """Quantize `x` [..., n] in groups of `group_size` consecutive entries of the last axis."""
    length = x.shape[-1]
    if length % group_size:
        raise ValueError(f"{length} entries do not split into groups of {group_size}")
    grouped = x.float().reshape(*x.shape[:-1], length // group_size, group_size)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    max_code = (1 << bits) - 1
    scale = ((high - low) / max_code).to(PARAM_DTYPE).clamp(min=torch.finfo(PARAM_DTYPE).tiny)
    minimum = low.to(PARAM_DTYPE)
    codes = torch.round((grouped - minimum.float().unsqueeze(-1)) / scale.float().unsqueeze(-1))
    codes = codes.clamp(0, max_code).to(torch.uint8).reshape(x.shape)
    return PackedGroups(pack_codes(codes, bits), scale, minimum, bits, group_size)


def quantize_per_channel(states: torch.Tensor, bits: int, group_size: int) -> PackedGroups:
    """[batch, heads, tokens, head_dim] with groups of `group_size` tokens per channel.

    Stored channel-major ([batch, heads, head_dim, packed tokens]) so each group is contiguous and
    later chunks append along the last axis."""
    return quantize_groups(states.transpose(-1, -2), bits, group_size)


def dequantize_per_channel(groups: PackedGroups, dtype: torch.dtype) -> torch.Tensor:
    return groups.dequantize(dtype).transpose(-1, -2)
