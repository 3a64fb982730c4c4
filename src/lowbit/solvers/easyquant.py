"""EasyQuant-style (Tang et al., 2023) data-free quantization: isolate outliers, then fit the range.

A handful of very large weights decide the min/max range of their groups and so the step size of
every other weight there. Keeping the largest `outlier_fraction` of weights (by magnitude) exactly,
as fp16 corrections in a sparse matrix, lets the grid be fitted to the remaining weights only; the
range is then chosen by a search over shrink ratios that minimises the squared error of those
non-outlier weights. The dequantized weight is the grid value plus the sparse correction, so an
outlier is reproduced to fp16 precision of its rounding error. The sparse part is counted in bits
per weight (values, column indices and row offsets; see SparseOutliers).

compressed-tensors has no place for the sparse part, so this method's exports use lowbit's own
layout (export.extras_layout), as every dense-and-sparse weight does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import (
    FormatError,
    QuantizedWeight,
    WeightFormat,
    check_finite,
    quantize_matrix,
)
from lowbit.formats.integer import IntegerFormat
from lowbit.solvers.base import Solver, register_solver
from lowbit.solvers.clipping import ClipSearch
from lowbit.solvers.outliers import outlier_mask, sparse_from_mask

MAX_OUTLIER_FRACTION = 0.01
"""The method's premise is that outliers are rare; more than 1% costs more bits than a finer grid."""


@register_solver
@dataclass
class EasyQuant(Solver):
    """Largest-magnitude weights kept in fp16 (sparse), MSE range search on the rest; no data needed."""

    name: ClassVar[str] = "easyquant"

    outlier_fraction: float = 0.005
    grid: int = 100
    max_shrink: float = 0.8

    def __post_init__(self) -> None:
        if not 0 <= self.outlier_fraction <= MAX_OUTLIER_FRACTION:
            raise ValueError(
                f"outlier_fraction must be in [0, {MAX_OUTLIER_FRACTION}], got {self.outlier_fraction}"
            )

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None = None) -> QuantizedWeight:
        if not isinstance(fmt, IntegerFormat):
            raise FormatError(f"easyquant searches ranges of integer grids; {fmt.name} is not one")
        check_finite(weight)
        w = weight.float()
        mask = outlier_mask(w, self.outlier_fraction)
        # Zeros sit exactly on every integer grid (fit keeps 0 in range), so zeroed outliers neither
        # widen the range nor add to the search's error: the range is fitted to the others only.
        inliers = w.masked_fill(mask, 0.0)
        search = ClipSearch(grid=self.grid, max_shrink=self.max_shrink, norm=2.0)
        qweight = quantize_matrix(fmt, inliers, fit=partial(search.fit, fmt))
        if mask.any():
            qweight.sparse = sparse_from_mask(mask, w - qweight.dequantize())
        return qweight
