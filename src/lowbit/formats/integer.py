"""Uniform integer grids: b-bit codes with a scale (and, if asymmetric, a zero point) per group.

Codes are unsigned, 0 .. 2^b - 1, and stand for (code - zero) * scale. The symmetric variant fixes
zero = 2^(b-1) and scales by absmax / ((2^b - 1) / 2), so the grid spans [-absmax, absmax] while
using all 2^b codes; this is the convention of GPTQ and of compressed-tensors' signed layout, so
exported checkpoints need no re-rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.base import FormatError, GroupParams, WeightFormat

PER_CHANNEL = -1
"""group_size value meaning one group spanning every input column of a row."""

PER_TENSOR = 0
"""group_size value meaning a single scale (and zero point) for the whole matrix."""

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class IntegerFormat(WeightFormat):
    """b-bit integers, symmetric or asymmetric, per tensor / per channel / per group of columns."""

    name: ClassVar[str] = "int"

    bits: int = 4
    symmetric: bool = False
    group_size: int = 128
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise FormatError(f"integer formats support 2..8 bits, got {self.bits}")
        if self.group_size < PER_CHANNEL:
            raise FormatError(
                f"group size must be positive, {PER_CHANNEL} (per channel) or {PER_TENSOR} "
                f"(per tensor), got {self.group_size}"
            )
        if self.scale_dtype not in _SCALE_DTYPES.values():
            raise FormatError(f"scales are stored as float16, bfloat16 or float32, not {self.scale_dtype}")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_tensor(self) -> bool:
        return self.group_size == PER_TENSOR

    def group_size_for(self, columns: int) -> int:
        return columns if self.group_size in (PER_CHANNEL, PER_TENSOR) else self.group_size

    @property
    def rows_independent(self) -> bool:
        return not self.per_tensor

    def describe(self) -> str:
        if self.per_tensor:
            layout = "per-tensor"
        elif self.group_size == PER_CHANNEL:
            layout = "per-channel"
        else:
            layout = f"g{self.group_size}"
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {layout}"

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> GroupParams:
        """Min/max parameters for one group, the range shrunk by `clip` (per row, or a scalar).

        The range always contains 0 so that exact zeros (padding, pruned weights) stay exact.
        """
        w = w.float()
        if self.per_tensor:
            lo, hi = w.min().reshape(1, 1), w.max().reshape(1, 1)
        else:
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        lo = torch.clamp(lo, max=0.0) * clip
        hi = torch.clamp(hi, min=0.0) * clip
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / (self.max_code / 2)
        else:
            scale = (hi - lo) / self.max_code
        scale = self._storable(scale)
        if self.symmetric:
            return GroupParams(scale, None)
        zero = torch.clamp(torch.round(-lo / scale.float()), 0, self.max_code)
        return GroupParams(scale, zero)

    def _storable(self, scale: torch.Tensor) -> torch.Tensor:
        """Round scales to their storage dtype; an all-zero group gets the smallest positive scale."""
        stored = scale.to(self.scale_dtype)
        tiny = torch.finfo(self.scale_dtype).tiny
        return torch.clamp(stored, min=tiny)

    def _zero(self, params: GroupParams) -> torch.Tensor | float:
        return float(1 << (self.bits - 1)) if params.zero is None else params.zero.float()

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        q = torch.round(w.float() / params.scale.float()) + self._zero(params)
        return torch.clamp(q, 0, self.max_code).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return (codes.float() - self._zero(params)) * params.scale.float()

    def bits_per_weight(self, rows: int, columns: int) -> float:
        group_size = self.group_size_for(columns)
        groups_per_row = -(-columns // group_size)
        param_bits = torch.finfo(self.scale_dtype).bits + (0 if self.symmetric else self.bits)
        param_count = 1 if self.per_tensor else rows * groups_per_row
        return self.bits + param_bits * param_count / (rows * columns)


def scale_dtype_from_name(name: str) -> torch.dtype:
    try:
        return _SCALE_DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown scale dtype {name!r}; choose one of {', '.join(_SCALE_DTYPES)}") from None
