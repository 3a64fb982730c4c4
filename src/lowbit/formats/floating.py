"""Floating-point weight formats: minifloat elements times a scale per tensor, channel, group or block.

Three families, all symmetric (no zero point) with codes that are the elements' raw bit patterns
(see `minifloat`):

- `FloatFormat` ("fp8_e4m3", "fp8_e5m2", also FP4): one scale per tensor, output channel or group of
  columns, absmax / element max, rounded to its storage dtype (float32 by default, as compressed-
  tensors' FP8 checkpoints store it).
- `MXFormat` ("mxfp4"; OCP Microscaling spec v1.0): blocks of 32, the scale a power of two stored as
  an E8M0 byte, X = 2^(floor(log2 amax) - emax_elem) with emax_elem = floor(log2 element max) (2 for
  E2M1). amax / X lies in [4, 8), so the largest values of a block can exceed 6 and saturate: the
  spec's choice, which keeps X a pure function of amax.
- `NVFP4Format` ("nvfp4"): blocks of 16 E2M1 values, an FP8 E4M3 scale per block and one float32
  per-tensor scale, in compressed-tensors' convention: global = 448 · 6 / amax(W) (fitted once per
  matrix by `prepare`), block scale = fp8(global · amax(block) / 6), and a weight is
  e2m1 · (block scale / global) computed in float32, exactly as compressed-tensors dequantizes.

Every scaled value is rounded with the element's saturating round-to-nearest-even. Scales are
floored at the smallest normal value of their dtype (the smallest positive E4M3 value for NVFP4
block scales): an all-zero group stays finite with all-zero codes, and a group whose scale would
underflow keeps its relative precision, the element grid being the same in every binade above
its subnormals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.formats.base import FormatError, GroupParams, WeightFormat
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR, scale_dtype_from_name
from lowbit.formats.minifloat import E2M1, E4M3, ELEMENTS, Minifloat

E8M0_MIN_EXPONENT = -127
"""E8M0 stores 2^(byte - 127); byte 255 is NaN, so exponents span -127 .. 127."""
E8M0_MAX_EXPONENT = 127


def _layout_name(group_size: int) -> str:
    if group_size == PER_TENSOR:
        return "per-tensor"
    if group_size == PER_CHANNEL:
        return "per-channel"
    return f"g{group_size}"


def _absmax(w: torch.Tensor, per_tensor: bool) -> torch.Tensor:
    w = w.float().abs()
    return w.amax().reshape(1, 1) if per_tensor else w.amax(dim=1, keepdim=True)


@dataclass(frozen=True)
class FloatFormat(WeightFormat):
    """Minifloat codes times a scale per tensor (group_size 0), channel (-1) or group of columns."""

    name: ClassVar[str] = "float"

    element: Minifloat = E4M3
    group_size: int = PER_CHANNEL
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.group_size < PER_CHANNEL:
            raise FormatError(
                f"group size must be positive, {PER_CHANNEL} (per channel) or {PER_TENSOR} "
                f"(per tensor), got {self.group_size}"
            )
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise FormatError(f"scales are stored as float16, bfloat16 or float32, not {self.scale_dtype}")

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def per_tensor(self) -> bool:
        return self.group_size == PER_TENSOR

    def group_size_for(self, columns: int) -> int:
        return columns if self.group_size in (PER_CHANNEL, PER_TENSOR) else self.group_size

    def describe(self) -> str:
        return f"fp{self.bits} {self.element.name} {_layout_name(self.group_size)}"

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> GroupParams:
        """Scale = absmax · clip / element max, so the largest kept magnitude lands on ±max."""
        scale = (_absmax(w, self.per_tensor) * clip / self.element.max).to(self.scale_dtype)
        return GroupParams(torch.clamp(scale, min=torch.finfo(self.scale_dtype).tiny), None)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.element.encode(w.float() / params.scale.float())

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.element.decode(codes) * params.scale.float()

    def bits_per_weight(self, rows: int, columns: int) -> float:
        groups = 1 if self.per_tensor else rows * -(-columns // self.group_size_for(columns))
        return self.bits + torch.finfo(self.scale_dtype).bits * groups / (rows * columns)


@dataclass(frozen=True)
class MXFormat(WeightFormat):
    """OCP microscaling: blocks of `block_size` minifloats sharing a power-of-two (E8M0) scale."""

    name: ClassVar[str] = "mx"

    element: Minifloat = E2M1
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise FormatError(f"MX block size must be positive, got {self.block_size}")

    @property
    def bits(self) -> int:
        return self.element.bits

    per_tensor: ClassVar[bool] = False

    def group_size_for(self, columns: int) -> int:
        return self.block_size

    def describe(self) -> str:
        return f"mxfp{self.bits} ({self.element.name}, blocks of {self.block_size}, e8m0 scale)"

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> GroupParams:
        """X = 2^(floor(log2(amax · clip)) - emax_elem), the exponent clamped to E8M0's range."""
        amax = _absmax(w, per_tensor=False) * clip
        _, k = torch.frexp(amax)  # amax = f · 2^k, f in [0.5, 1): floor(log2 amax) = k - 1 (exact)
        exponent = torch.where(amax > 0, k - 1 - self.element.max_exponent, E8M0_MIN_EXPONENT)
        exponent = torch.clamp(exponent, E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
        return GroupParams(torch.ldexp(torch.ones_like(amax), exponent), None)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.element.encode(w.float() / params.scale.float())

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.element.decode(codes) * params.scale.float()

    def bits_per_weight(self, rows: int, columns: int) -> float:
        return self.bits + 8 * rows * -(-columns // self.block_size) / (rows * columns)


@dataclass(frozen=True)
class NVFP4Format(WeightFormat):
    """E2M1 in blocks of 16 with an E4M3 scale per block and a float32 scale per tensor.

    `global_scale` is None until `prepare` fits it to a matrix; `fit` refuses to run without it.
    """

    name: ClassVar[str] = "nvfp4"

    block_size: int = 16
    global_scale: float | None = field(default=None)

    per_tensor: ClassVar[bool] = False
    element: ClassVar[Minifloat] = E2M1
    scale_element: ClassVar[Minifloat] = E4M3
    bits: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise FormatError(f"NVFP4 block size must be positive, got {self.block_size}")
        if self.global_scale is not None and not (0 < self.global_scale < float("inf")):
            raise FormatError(f"the NVFP4 per-tensor scale must be positive and finite, got {self.global_scale}")

    def prepare(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> NVFP4Format:
        """Fit the per-tensor scale so the largest block's scale is the largest FP8 value, 448."""
        if self.global_scale is not None:
            return self
        amax = float(w.float().abs().max())
        global_scale = torch.tensor(self.scale_element.max * self.element.max, dtype=torch.float32)
        global_scale = global_scale / torch.tensor(max(amax, torch.finfo(torch.float32).tiny))
        value = float(global_scale)
        # An all-zero (or absurdly tiny) matrix: any scale represents it; 1 keeps it finite.
        return dataclasses.replace(self, global_scale=value if value < float("inf") else 1.0)

    def group_size_for(self, columns: int) -> int:
        return self.block_size

    def describe(self) -> str:
        return f"nvfp4 (e2m1, blocks of {self.block_size}, e4m3 scale x fp32 tensor scale)"

    def _global(self) -> torch.Tensor:
        if self.global_scale is None:
            raise FormatError("NVFP4 needs its per-tensor scale: call prepare(weight) before fitting groups")
        return torch.tensor(self.global_scale, dtype=torch.float32)

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> GroupParams:
        """Block scales as stored: E4M3 values of global · amax · clip / 6 (not yet divided by global)."""
        amax = _absmax(w, per_tensor=False) * clip
        stored = self.scale_element.round(self._global() * amax / self.element.max)
        smallest = float(self.scale_element.code_values[1])  # the smallest positive subnormal
        return GroupParams(torch.clamp(stored, min=smallest), None)

    def effective_scale(self, stored: torch.Tensor) -> torch.Tensor:
        """Block scale / per-tensor scale in float32: what multiplies the E2M1 values."""
        return stored.float() / self._global().to(stored.device)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.element.encode(w.float() / self.effective_scale(params.scale))

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.element.decode(codes) * self.effective_scale(params.scale)

    def bits_per_weight(self, rows: int, columns: int) -> float:
        blocks = rows * -(-columns // self.block_size)
        return self.bits + (8 * blocks + 32) / (rows * columns)


def float_format(element: str, group_size: int = PER_CHANNEL, scale_dtype: str = "float32") -> FloatFormat:
    """A FloatFormat by element name ("e4m3", "e5m2", "e2m1"); FormatError for an unknown one."""
    try:
        minifloat = ELEMENTS[element]
    except KeyError:
        raise FormatError(f"unknown minifloat {element!r}; choose one of {', '.join(ELEMENTS)}") from None
    return FloatFormat(minifloat, group_size, scale_dtype_from_name(scale_dtype))
