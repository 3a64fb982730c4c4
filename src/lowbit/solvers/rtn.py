"""Round to nearest: every weight to its closest grid point; no calibration data needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import QuantizedWeight, WeightFormat, quantize_matrix
from lowbit.solvers.base import Solver, register_solver
from lowbit.solvers.clipping import ClipSearch


@register_solver
@dataclass
class RTN(Solver):
    """Round to nearest, with the per-group range optionally chosen by an MSE clipping search."""

    name: ClassVar[str] = "rtn"
    rows_independent: ClassVar[bool] = True

    clip_search: bool = False

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None = None) -> QuantizedWeight:
        fmt = fmt.prepare(weight)
        fit = (lambda w: ClipSearch().fit(fmt, w)) if self.clip_search else None
        return quantize_matrix(fmt, weight, fit=fit)
