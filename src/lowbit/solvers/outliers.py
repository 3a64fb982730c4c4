"""Dense-and-sparse quantization (SqueezeLLM, Kim et al. 2023; SpQR, Dettmers et al. 2023).

A small fraction of weights decides most of the quantization damage: the largest ones widen the
range of their groups, and the ones the layer's inputs are most sensitive to cost most when rounded.
Keeping those few exactly, as fp16 values in a sparse matrix, and quantizing the rest with any
solver buys a large accuracy gain for a small cost in bits (16 per value, plus its column index and
the row offsets: see SparseOutliers).

Two ways to rank weights:
- "magnitude": |w|, data-free (SqueezeLLM's sparse part, EasyQuant);
- "hessian": the Optimal Brain Surgeon saliency w² / [H⁻¹]_jj, the increase of the layer's output
  error if weight w (in input column j) were set to zero with the rest re-fitted; SpQR's criterion.

How the rest is quantized depends on the solver (Solver.solve_keeping): by default the outliers are
set to zero (zero lies on every grid this project has, so they neither widen a range nor add
error), the solver runs, and the sparse part stores the difference to the original. GPTQ does better:
an outlier contributes no rounding error, so no other weight is changed to compensate for it, and it
keeps the value GPTQ's updates gave it (see GPTQ.solve_keeping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import QuantizedWeight, SparseOutliers, WeightFormat, check_finite
from lowbit.solvers.base import Solver, WrappingSolver

OutlierCriterion = Literal["magnitude", "hessian"]

MAX_OUTLIER_FRACTION = 0.05
"""Beyond a few percent the sparse part costs more bits than a finer grid would."""

SALIENCY_DAMP = 0.01
"""Relative damping of H before it is inverted for the saliency (as GPTQ's default)."""


def outlier_mask(weight: torch.Tensor, fraction: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """True at the ceil(fraction · numel) entries with the largest score (default |weight|)."""
    count = math.ceil(fraction * weight.numel())
    scores = weight.abs() if scores is None else scores
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    if count:
        mask[torch.topk(scores.flatten(), count, sorted=False).indices] = True
    return mask.reshape(weight.shape)


def sparse_from_mask(mask: torch.Tensor, values: torch.Tensor) -> SparseOutliers:
    """CSR form of `values` at the True positions of `mask` (row-major order)."""
    rows, columns = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=mask.shape[0])
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return SparseOutliers(offsets, columns, values[rows, columns].to(torch.float16))


def hessian_saliency(weight: torch.Tensor, hessian: torch.Tensor, damp: float = SALIENCY_DAMP) -> torch.Tensor:
    """w_ij² / [H⁻¹]_jj for every weight, with H damped by `damp` · mean(diag H) so that it inverts."""
    h = hessian.to(device=weight.device, dtype=torch.float64)
    h = h + damp * h.diagonal().mean().clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inverse_diagonal = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()
    return (weight.double().square() / inverse_diagonal).float()


def keep_by_zeroing(
    solver: Solver, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None, keep: torch.Tensor
) -> QuantizedWeight:
    """Any solver with the `keep` weights held exactly: they are zeroed for the solve, and the sparse
    part restores their original values on top of whatever the grid gives there."""
    w = weight.float()
    qweight = solver.solve(w.masked_fill(keep, 0.0), fmt, stats)
    if keep.any():
        qweight.sparse = sparse_from_mask(keep, w - qweight.dequantize())
    return qweight


@dataclass
class DenseAndSparse(WrappingSolver):
    """Keeps the `fraction` most sensitive weights in fp16 (sparse) and lets `base` quantize the rest.

    Built by a recipe's `outliers` field around its method; not a method of its own.
    """

    base: Solver
    fraction: float = 0.005
    criterion: OutlierCriterion = "hessian"

    name = "dense-and-sparse"

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= MAX_OUTLIER_FRACTION:
            raise ValueError(f"outliers must be a fraction in (0, {MAX_OUTLIER_FRACTION}], got {self.fraction}")
        if self.criterion not in ("magnitude", "hessian"):
            raise ValueError(f"outlier criterion must be magnitude or hessian, got {self.criterion!r}")

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.base.needs_hessian or self.criterion == "hessian"

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        check_finite(weight)
        scores = None
        if self.criterion == "hessian":
            if stats is None:
                raise ValueError("outlier criterion 'hessian' needs calibration statistics; pass --calib")
            scores = hessian_saliency(weight.float(), stats.hessian)
        keep = outlier_mask(weight, self.fraction, scores)
        return self.base.solve_keeping(weight, fmt, stats, keep)
