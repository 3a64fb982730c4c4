"""SqueezeLLM-style non-uniform quantization (Kim et al., 2023), without its sparse outlier part.

Each output row gets its own table of 2^bits values, fitted by k-means in which every weight
counts with the sensitivity of the layer output to it. SqueezeLLM takes that sensitivity from the
Fisher information; here it is the diagonal of the layer Hessian H = 2/n Σ x xᵀ, which is the
second-order cost of perturbing a weight of input column j alone: Δ(output error) = H[j, j] · δ².
Weights are then rounded to their row's nearest table value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import FormatError, QuantizedWeight, WeightFormat, check_finite, quantize_matrix
from lowbit.formats.lookup import LookupFormat
from lowbit.solvers.base import Solver, register_solver


@register_solver
@dataclass
class SqueezeLLM(Solver):
    """Hessian-diagonal-weighted k-means tables per row (format: learned LookupFormat), then nearest rounding."""

    name: ClassVar[str] = "squeezellm"
    needs_hessian: ClassVar[bool] = True

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        if not (isinstance(fmt, LookupFormat) and fmt.learned):
            raise FormatError("squeezellm fits learned lookup tables: use format lut (--format lut)")
        if stats is None:
            raise ValueError("squeezellm needs calibration statistics (a HessianStats for this layer's input)")
        check_finite(weight)
        importance = stats.hessian.diagonal().to(weight.device)
        if importance.shape[0] != weight.shape[1]:
            raise ValueError(f"Hessian of {importance.shape[0]} inputs does not fit a weight with {weight.shape[1]}")
        return quantize_matrix(fmt, weight, importance=importance)
