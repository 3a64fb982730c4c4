"""Minifloat element types (FP8 E4M3 / E5M2, FP4 E2M1): their grids, codes and exact rounding.

A minifloat with E exponent bits, M mantissa bits and bias 2^(E-1) - 1 stands for
(-1)^s · 2^(e - bias) · (1 + m / 2^M) when the exponent field e > 0, and (-1)^s · 2^(1 - bias) · m / 2^M
(subnormal) when e = 0. Codes are the raw bit patterns (sign in the top bit), the layout that
torch.float8_* and compressed-tensors' packed FP4 use, so they are stored without translation.

Rounding is round-to-nearest-even onto that grid with **saturation**: a magnitude above the largest
finite value becomes ±max (OCP "satfinite"), never Inf or NaN. That is what torch does for
float8_e4m3fn (which has no Inf) but not for float8_e5m2, whose cast overflows to Inf from
61440 up; scaled weights never need Inf, so both are saturated here. The sign of a value that
rounds to zero is kept (-0 has its own code), as torch's casts do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class Minifloat:
    """One element type. `max` is the largest finite value; codes reserved for NaN/Inf are never produced."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float
    torch_dtype: torch.dtype | None = field(default=None, compare=False)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def max_exponent(self) -> int:
        """floor(log2(max)): the exponent of the largest binade (2 for E2M1, 8 for E4M3, 15 for E5M2)."""
        return int(torch.tensor(self.max).log2().floor())

    @cached_property
    def code_values(self) -> torch.Tensor:
        """float32 value of every code 0 .. 2^bits - 1; codes beyond ±max (NaN/Inf patterns) are NaN."""
        codes = torch.arange(1 << self.bits)
        sign = torch.where(codes >> (self.bits - 1) == 1, -1.0, 1.0)
        exponent = (codes >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
        mantissa = (codes & ((1 << self.mantissa_bits) - 1)).float() / (1 << self.mantissa_bits)
        normal = torch.ldexp(1.0 + mantissa, exponent - self.bias)
        subnormal = torch.ldexp(mantissa, torch.full_like(exponent, 1 - self.bias))
        magnitude = torch.where(exponent > 0, normal, subnormal)
        magnitude = torch.where(magnitude <= self.max, magnitude, torch.nan)
        return (sign * magnitude).float()

    @cached_property
    def _positive_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted non-negative values, their codes) of the positive half of the code space."""
        half = self.code_values[: 1 << (self.bits - 1)]
        finite = torch.isfinite(half)
        return half[finite], torch.arange(len(half))[finite].to(torch.uint8)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """x (float32) rounded to the nearest grid value, ties to even mantissa, saturated at ±max."""
        x = x.float()
        magnitude = x.abs()
        # frexp: magnitude = f · 2^k with f in [0.5, 1), so floor(log2(magnitude)) = k - 1, exactly.
        _, k = torch.frexp(magnitude)
        exponent = torch.clamp(k - 1, min=1 - self.bias)  # below the normal range: subnormal spacing
        step_exponent = exponent - self.mantissa_bits
        # Dividing and multiplying by a power of two is exact, so torch.round (half to even) sees the
        # exact quotient and the result is the exact grid value.
        rounded = torch.ldexp(torch.round(torch.ldexp(magnitude, -step_exponent)), step_exponent)
        return torch.copysign(torch.clamp(rounded, max=self.max), x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of x after `round`."""
        rounded = self.round(x)
        values, codes = self._positive_grid
        values, codes = values.to(x.device), codes.to(x.device)
        index = torch.searchsorted(values, rounded.abs().contiguous())
        sign = torch.signbit(rounded).to(torch.uint8) << (self.bits - 1)
        return codes[index] | sign

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of codes."""
        return self.code_values.to(codes.device)[codes.long()]


E4M3 = Minifloat("e4m3", 4, 3, 448.0, torch.float8_e4m3fn)
"""FP8 E4M3 "fn": no Inf, only S.1111.111 is NaN, so the top binade reaches 448."""
E5M2 = Minifloat("e5m2", 5, 2, 57344.0, torch.float8_e5m2)
"""FP8 E5M2: IEEE-like, the top exponent is Inf/NaN, largest finite 57344."""
E2M1 = Minifloat("e2m1", 2, 1, 6.0)
"""FP4 E2M1: values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; no Inf or NaN."""

ELEMENTS: dict[str, Minifloat] = {element.name: element for element in (E4M3, E5M2, E2M1)}
