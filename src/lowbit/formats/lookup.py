"""Lookup-table (non-uniform) formats: a code indexes a table of values, times a per-group scale.

A weight is table[row, code] · scale[row, group], where the scale is the group's absmax (stored in
`scale_dtype`) and the table holds 2^bits values in [-1, 1], sorted ascending:

- NF4 (QLoRA, Dettmers et al. 2023): one fixed table shared by every row, the 16 quantiles of a
  normal distribution normalised to [-1, 1] with an exact zero; blocks of 64 in QLoRA.
- learned tables (SqueezeLLM-style, Kim et al. 2023): one table per output row, fitted by k-means
  on that row's weights (divided by their scale), each weight counted with the importance of its
  input column (e.g. the Hessian diagonal; uniform without calibration data). The scale is the
  row's absmax (one group per row), so GPTQ can still refit it as it updates the row.

Encoding picks the nearest table value; a value exactly halfway between two picks the lower one
(the order `torch.bucketize` gives and `argmin` agrees with).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.formats.base import FormatError, GroupParams, WeightFormat
from lowbit.formats.integer import PER_CHANNEL, scale_dtype_from_name

NF4_TABLE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
"""QLoRA's NF4 code book (the values bitsandbytes and the paper's appendix list)."""

TABLE_DTYPE = torch.float16
"""Learned tables are stored in float16 (SqueezeLLM's choice); they are rounded before any code is picked."""

KMEANS_ITERATIONS = 50
"""Upper bound on Lloyd iterations; fitting stops earlier once no assignment changes."""


@dataclass(frozen=True)
class LookupFormat(WeightFormat):
    """Codes into a sorted table of 2^bits values (shared NF4, or learned per row), times an absmax scale.

    `learned` formats start without tables (`table` None) and get them from `prepare`; a table is
    [1, 2^bits] (shared) or [rows, 2^bits] (per row), float32 holding exactly the stored values.
    """

    name: ClassVar[str] = "lookup"

    bits: int = 4
    group_size: int = 64
    learned: bool = False
    scale_dtype: torch.dtype = torch.float16
    table: torch.Tensor | None = field(default=None, compare=False, repr=False)

    per_tensor: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise FormatError(f"lookup formats support 2..8 bits, got {self.bits}")
        if self.group_size < PER_CHANNEL or self.group_size == 0:
            raise FormatError(f"group size must be positive or {PER_CHANNEL} (per channel), got {self.group_size}")
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise FormatError(f"scales are stored as float16, bfloat16 or float32, not {self.scale_dtype}")
        if not self.learned and self.bits != 4:
            raise FormatError("the fixed NF4 table has 16 values: use bits=4, or learned tables for other widths")
        if self.table is not None and self.table.shape[-1] != 1 << self.bits:
            raise FormatError(f"a {self.bits}-bit table needs {1 << self.bits} values, got {self.table.shape[-1]}")

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def describe(self) -> str:
        layout = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"lut{self.bits} learned per row {layout}" if self.learned else f"nf4 {layout}"

    def group_size_for(self, columns: int) -> int:
        return columns if self.group_size == PER_CHANNEL else self.group_size

    def prepare(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> LookupFormat:
        """NF4: the fixed table. Learned: one table per row by importance-weighted k-means."""
        if self.table is not None:
            if self.learned and self.table.shape[0] != w.shape[0]:
                raise FormatError(f"these tables are for {self.table.shape[0]} rows, the matrix has {w.shape[0]}")
            return self
        if not self.learned:
            return dataclasses.replace(self, table=NF4_TABLE.reshape(1, -1).to(w.device))
        normalized = torch.cat(
            [w[:, s:e].float() / self.fit(w[:, s:e]).scale.float() for s, e in self._groups(w.shape[1])], dim=1
        )
        weights = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float().to(w.device)
        table = weighted_kmeans_rows(normalized, weights.clamp(min=0), self.levels)
        return dataclasses.replace(self, table=table.to(TABLE_DTYPE).float().sort(dim=1).values)

    def _groups(self, columns: int) -> list[tuple[int, int]]:
        size = self.group_size_for(columns)
        return [(start, min(start + size, columns)) for start in range(0, columns, size)]

    def _table(self, rows: int, device: torch.device) -> torch.Tensor:
        if self.table is None:
            raise FormatError("this lookup format has no table yet: call prepare(weight) first")
        return self.table.to(device).expand(rows, -1)

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> GroupParams:
        """Scale = the group's absmax (times `clip`) per row, rounded to its storage dtype."""
        scale = (w.float().abs().amax(dim=1, keepdim=True) * clip).to(self.scale_dtype)
        return GroupParams(torch.clamp(scale, min=torch.finfo(self.scale_dtype).tiny), None)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        table = self._table(w.shape[0], w.device)
        x = (w.float() / params.scale.float()).contiguous()
        midpoints = ((table[:, 1:] + table[:, :-1]) / 2).contiguous()
        return torch.searchsorted(midpoints, x).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        table = self._table(codes.shape[0], codes.device)
        return torch.gather(table, 1, codes.long()) * params.scale.float()

    def bits_per_weight(self, rows: int, columns: int) -> float:
        groups = rows * -(-columns // self.group_size_for(columns))
        param_bits = torch.finfo(self.scale_dtype).bits * groups
        if self.learned:
            param_bits += torch.finfo(TABLE_DTYPE).bits * self.levels * rows
        return self.bits + param_bits / (rows * columns)


def weighted_kmeans_rows(x: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """k centroids per row of `x` [rows, n] minimising Σ_j weights[j] · (x[r, j] - c[r, code])².

    Lloyd's algorithm, all rows at once, started from the k evenly spaced quantiles of each row (so
    every centroid starts where data is). A centroid that loses all its points keeps its place.
    """
    rows, n = x.shape
    levels = torch.linspace(0, 1, k, device=x.device, dtype=x.dtype)
    centroids = torch.quantile(x, levels, dim=1).T.contiguous()  # [rows, k], ascending
    weight = weights.reshape(1, n).expand(rows, n)
    assignment = None
    for _ in range(KMEANS_ITERATIONS):
        centroids = centroids.sort(dim=1).values
        midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        new_assignment = torch.searchsorted(midpoints, x.contiguous())
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        mass = torch.zeros(rows, k, dtype=x.dtype, device=x.device).scatter_add_(1, assignment, weight)
        total = torch.zeros(rows, k, dtype=x.dtype, device=x.device).scatter_add_(1, assignment, weight * x)
        centroids = torch.where(mass > 0, total / mass.clamp(min=torch.finfo(x.dtype).tiny), centroids)
    return centroids


def nf4_format(group_size: int = 64, scale_dtype: str = "float16") -> LookupFormat:
    return LookupFormat(bits=4, group_size=group_size, learned=False, scale_dtype=scale_dtype_from_name(scale_dtype))
