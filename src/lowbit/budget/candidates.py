"""The settings a budget may give a layer: solver x bits x group size, as plain comparable data."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.formats.integer import PER_CHANNEL, IntegerFormat, scale_dtype_from_name
from lowbit.recipes.recipe import LayerOverride

DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZES = (32, 64, PER_CHANNEL)


@dataclass(frozen=True, order=True)
class Candidate:
    """One way to store a layer: `method` (a registered solver) on a b-bit integer grid."""

    method: str
    bits: int
    group_size: int
    symmetric: bool = False

    @property
    def key(self) -> str:
        """Stable text form, used in caches and plan tables: e.g. "gptq:3:64:asym"."""
        return f"{self.method}:{self.bits}:{self.group_size}:{'sym' if self.symmetric else 'asym'}"

    @classmethod
    def from_key(cls, key: str) -> Candidate:
        method, bits, group_size, sym = key.split(":")
        return cls(method, int(bits), int(group_size), sym == "sym")

    def label(self) -> str:
        layout = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"{self.method} int{self.bits} {'sym' if self.symmetric else 'asym'} {layout}"

    def fits(self, in_features: int) -> bool:
        """True when the format exports for this width (groups must divide it)."""
        return self.group_size <= 0 or in_features % self.group_size == 0

    def format(self, scale_dtype: str = "float16") -> IntegerFormat:
        return IntegerFormat(self.bits, self.symmetric, self.group_size, scale_dtype_from_name(scale_dtype))

    def override(self, pattern: str) -> LayerOverride:
        return LayerOverride(
            pattern=pattern, method=self.method, bits=self.bits, symmetric=self.symmetric, group_size=self.group_size
        )


def candidate_grid(
    methods: tuple[str, ...] = ("gptq",),
    bits: tuple[int, ...] = DEFAULT_BITS,
    group_sizes: tuple[int, ...] = DEFAULT_GROUP_SIZES,
    symmetric: bool = False,
) -> list[Candidate]:
    """Every combination, in a fixed order (so caches and plans do not depend on argument order)."""
    return sorted({Candidate(m, b, g, symmetric) for m in methods for b in bits for g in group_sizes})
