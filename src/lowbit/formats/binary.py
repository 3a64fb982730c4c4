"""Binarized weights for the extreme low-bit regime (BiLLM, Huang et al. 2024; PB-LLM, Shang et al. 2023).

Every weight is stored as a sign times one of at most two magnitudes shared by its row within a
group: value = ±α (inner) or ±β (outer). A code is two bits: bit 0 the sign (1 = positive),
bit 1 "outer". Three kinds of groups use this one decoder:

- plain binarization (`split=False`, one bit per weight): β = α = mean |w| of the row's group, the
  scale that minimises ||w − α·sign(w)||² (its derivative vanishes there), so the outer bit is
  never set and is not stored;
- split binarization (`split=True`, BiLLM's bell-shaped split; two bits per weight): the row's
  |w| are divided at a break point into a concentrated and a sparse part, each binarized with its
  own mean magnitude. The break point is the best one (exact 1-D two-means on |w|), and a weight
  is encoded with the nearer level, which is the same split;
- salient columns (`salient`, a bool mask over the input columns set by the binary solver): a
  residual binarization w ≈ α₁·s₁ + α₂·s₂ (α₁ = mean |w|, s₂ the sign of what is left, α₂ its mean
  magnitude), whose four values ±(α₁ ± α₂) are the same ±α/±β levels with α = α₁ − α₂, β = α₁ + α₂.

Groups: `group_size` consecutive columns; with a salient mask, the salient columns of each group
form a group of their own (group 2b + 1; the others are group 2b), so `group_index` is not j //
group_size. In a QuantizedWeight of this format `scale` holds α and `zero` holds β per group
(there is no zero point: the grid is symmetric).

Storage per matrix (`bits_per_weight`, and exactly what lowbit's layout writes): the sign plane,
the outer plane where it can be set (every weight when split, salient columns otherwise), the
column mask, and fp16 scales (α for every group, β for split and salient groups).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.formats.base import FormatError, GroupParams, WeightFormat
from lowbit.formats.integer import PER_CHANNEL

SIGN_BIT = 1
OUTER_BIT = 2


@dataclass(frozen=True)
class BinaryFormat(WeightFormat):
    """Sign codes with one (α) or two (α, β) magnitudes per row and group; optional salient columns."""

    name: ClassVar[str] = "binary"
    clippable: ClassVar[bool] = False

    split: bool = False
    group_size: int = 128
    scale_dtype: torch.dtype = torch.float16
    salient: torch.Tensor | None = field(default=None, compare=False, repr=False)

    per_tensor: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.group_size < PER_CHANNEL or self.group_size == 0:
            raise FormatError(f"group size must be positive or {PER_CHANNEL} (per channel), got {self.group_size}")
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise FormatError(f"scales are stored as float16, bfloat16 or float32, not {self.scale_dtype}")
        if self.salient is not None:
            width = self.group_size_for(self.salient.numel())
            per_group = [bool(chunk.any()) for chunk in self.salient.split(width)]
            if not all(per_group):
                raise FormatError("every group needs at least one salient column when a salient mask is set")

    @property
    def bits(self) -> int:
        """Code bits of a non-salient weight."""
        return 2 if self.split else 1

    @property
    def rows_independent(self) -> bool:
        return True

    def describe(self) -> str:
        layout = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        salient = "" if self.salient is None else f" + {int(self.salient.sum())} salient columns"
        return f"binary{' split' if self.split else ''} {layout}{salient}"

    def group_size_for(self, columns: int) -> int:
        return columns if self.group_size == PER_CHANNEL else self.group_size

    def with_salient(self, salient: torch.Tensor | None) -> BinaryFormat:
        return dataclasses.replace(self, salient=None if salient is None else salient.bool().cpu())

    def group_index(self, columns: int) -> torch.Tensor:
        """The group of each column: j // group_size, or 2·(j // group_size) + salient[j] with a mask."""
        block = torch.arange(columns) // self.group_size_for(columns)
        return block if self.salient is None else 2 * block + self.salient.long()

    def fit(self, w: torch.Tensor) -> GroupParams:
        """α (= β) = mean |w| per row, or with `split` the best two-magnitude split of |w|."""
        magnitude = w.float().abs()
        if magnitude.shape[1] == 0:
            ones = torch.ones(w.shape[0], 1, device=w.device)
            return GroupParams(self._storable(ones), self._storable(ones))
        if not self.split:
            alpha = self._storable(magnitude.mean(dim=1, keepdim=True))
            return GroupParams(alpha, alpha)
        inner, outer = two_means(magnitude)
        return GroupParams(self._storable(inner), self._storable(outer))

    def fit_residual(self, w: torch.Tensor) -> GroupParams:
        """Residual binarization of salient columns: α₁ = mean |w|, α₂ = mean ||w| − α₁|; stored as
        the levels α = α₁ − α₂ and β = α₁ + α₂."""
        magnitude = w.float().abs()
        first = magnitude.mean(dim=1, keepdim=True)
        second = (magnitude - first).abs().mean(dim=1, keepdim=True)
        return GroupParams(self._storable(first - second), self._storable(first + second))

    def _storable(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.scale_dtype)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """The code of the nearest of -α, +α, -β, +β (in that order on ties, so α == β never sets the outer bit)."""
        assert params.zero is not None, "binary parameters carry β in `zero`"
        alpha, beta = params.scale.float(), params.zero.float()
        levels = torch.stack([-alpha.expand_as(w), alpha.expand_as(w), -beta.expand_as(w), beta.expand_as(w)])
        return (levels - w.float()).abs().argmin(dim=0).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        assert params.zero is not None, "binary parameters carry β in `zero`"
        magnitude = torch.where((codes & OUTER_BIT).bool(), params.zero.float(), params.scale.float())
        return torch.where((codes & SIGN_BIT).bool(), magnitude, -magnitude)

    def storage(self, rows: int, columns: int) -> dict[str, int]:
        """Bits of each stored part of a [rows, columns] matrix (see the module docstring)."""
        blocks = -(-columns // self.group_size_for(columns))
        salient_columns = 0 if self.salient is None else int(self.salient.sum())
        groups = blocks if self.salient is None else 2 * blocks
        outer_groups = groups if self.split else (0 if self.salient is None else blocks)
        scale_bits = torch.finfo(self.scale_dtype).bits
        return {
            "signs": rows * columns,
            "outer": rows * (columns if self.split else salient_columns),
            "salient": 0 if self.salient is None else columns,
            "scale": scale_bits * rows * groups,
            "scale_outer": scale_bits * rows * outer_groups,
        }

    def bits_per_weight(self, rows: int, columns: int) -> float:
        return sum(self.storage(rows, columns).values()) / (rows * columns)


def two_means(magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the split of non-negative values into a lower and an upper part (at a break point)
    with the least Σ (x − mean of its part)²; returns the two means ([rows, 1] each).

    In one dimension an optimal two-means partition is contiguous in sorted order, so trying every
    break point (with prefix sums) is exact. A row best left whole gets β = α."""
    values = magnitude.double().sort(dim=1).values
    n = values.shape[1]
    prefix = torch.cumsum(values, dim=1)  # sum of the k smallest, k = 1..n
    prefix_sq = torch.cumsum(values.square(), dim=1)
    total, total_sq = prefix[:, -1:], prefix_sq[:, -1:]
    k = torch.arange(1, n + 1, dtype=values.dtype, device=values.device)
    upper_count = (n - k).clamp(min=1)
    error = (total_sq - prefix.square() / k - (total - prefix).square() / upper_count)
    best = error.argmin(dim=1, keepdim=True)
    count = best + 1
    inner = prefix.gather(1, best) / count
    upper = (total - prefix.gather(1, best)) / (n - count).clamp(min=1)
    outer = torch.where(count == n, inner, upper)
    return inner.float(), outer.float()
