"""The `awq` method: AWQ's channel scales (transforms/awq.py), then rounding with a clip search.

After the scales are folded in, AutoAWQ shrinks each group's range to the ratio that minimises the
group's contribution to the layer *output* error on calibration inputs, rather than the weight
error that the data-free clip search (clipping.py) minimises. With the layer's input Hessian H
that error is exact and cheap: for a group of columns g, row r, it is δ_r H_gg δ_rᵀ with
δ = W_g - Ŵ_g (cross terms between groups are ignored, as in AutoAWQ, so that each group's range
is chosen on its own). The Hessian is that of the rescaled input, collected by the pipeline from
the block after the transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import (
    FormatError,
    GroupParams,
    QuantizedWeight,
    WeightFormat,
    check_finite,
    column_groups,
    quantize_matrix,
)
from lowbit.formats.integer import IntegerFormat
from lowbit.solvers.base import Solver, register_solver
from lowbit.solvers.clipping import ClipSearch


@dataclass(frozen=True)
class OutputClipSearch(ClipSearch):
    """ClipSearch scored by output error δ H δᵀ per row, with `hessian` the group's block of H."""

    hessian: torch.Tensor | None = None

    def _error(self, fmt: IntegerFormat, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        delta = fmt.round_trip(w, params) - w
        err = ((delta @ self.hessian) * delta).sum(dim=1, keepdim=True)
        return err.sum().reshape(1, 1) if fmt.per_tensor else err


@register_solver
@dataclass
class AWQ(Solver):
    """Round to nearest after AWQ scaling; ranges shrunk by an output-error search (AutoAWQ's
    defaults: 20 grid points, at most 50% shrink)."""

    name: ClassVar[str] = "awq"
    needs_hessian: ClassVar[bool] = True
    implied_transforms: ClassVar[tuple[str, ...]] = ("awq",)

    clip_search: bool = True
    grid: int = 20
    max_shrink: float = 0.5

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        if not self.clip_search:
            return quantize_matrix(fmt, weight)
        if not isinstance(fmt, IntegerFormat):
            raise FormatError(f"awq's clip search shrinks integer grid ranges; {fmt.name} is not one")
        if stats is None:
            raise ValueError("awq's clip search needs calibration statistics for this layer's input")
        check_finite(weight)
        w, hessian = weight.float(), stats.hessian.to(weight.device)
        rows, columns = w.shape
        codes = torch.empty(rows, columns, dtype=torch.uint8, device=w.device)
        scales, zeros = [], []
        for start, end in column_groups(columns, fmt.group_size_for(columns)):
            search = OutputClipSearch(self.grid, self.max_shrink, hessian=hessian[start:end, start:end])
            params = search.fit(fmt, w[:, start:end])
            codes[:, start:end] = fmt.encode(w[:, start:end], params)
            scales.append(params.scale)
            zeros.append(params.zero)
        return QuantizedWeight(
            format=fmt,
            codes=codes,
            scale=torch.cat(scales, dim=1),
            zero=None if zeros[0] is None else torch.cat(zeros, dim=1),
            group_index=torch.arange(columns, device=w.device) // fmt.group_size_for(columns),
        )
