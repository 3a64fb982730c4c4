"""EoRA (Liu et al., 2024): a rank-r correction of any solver's error, fitted where the inputs live.

After a solver stores Ŵ, the error E = W − Ŵ is what the layer gets wrong. The correction B·A
(B: [out, r], A: [r, in]) that minimises the layer's output error ||(E − BA) X||², i.e.
tr((E − BA) H (E − BA)ᵀ) with the calibration Hessian H = U Λ Uᵀ, is found in closed form: in the
coordinates E' = E U Λ^{1/2} the objective is the plain Frobenius norm ||E' − B A'||², whose best
rank-r fit is the truncated SVD E' ≈ P_r S_r Q_rᵀ (Eckart–Young); mapping back gives B = P_r S_r^{1/2}
and A = S_r^{1/2} Q_rᵀ Λ^{-1/2} Uᵀ. A plain SVD of E would spend the rank on directions the inputs never visit.

Eigenvalues below `EIGEN_FLOOR` · λ_max are raised to it: directions with (almost) no input energy
cost nothing to get wrong, and dividing by their root would blow A up. The factors are stored in
fp16 and applied as a side branch y += (x·Aᵀ)·Bᵀ; they cost 16 · r · (in + out) bits per matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import LowRankCorrection, QuantizedWeight, WeightFormat
from lowbit.solvers.base import Solver, WrappingSolver

EIGEN_FLOOR = 1e-6
"""Smallest eigenvalue of H kept, relative to the largest."""


def eora_factors(error: torch.Tensor, hessian: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) minimising tr((error − BA) H (error − BA)ᵀ), in float32."""
    e = error.double()
    h = hessian.to(device=e.device, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((h + h.T) / 2)
    eigenvalues = eigenvalues.clamp(min=EIGEN_FLOOR * float(eigenvalues.max().clamp(min=1e-30)))
    root = eigenvalues.sqrt()
    projected = (e @ eigenvectors) * root  # E U Λ^{1/2}
    left, singular, right_t = torch.linalg.svd(projected, full_matrices=False)
    rank = min(rank, singular.numel())
    # S is split evenly between the factors so that both stay well inside the fp16 range.
    half = singular[:rank].sqrt()
    b = left[:, :rank] * half
    a = ((half[:, None] * right_t[:rank]) / root) @ eigenvectors.T  # S^{1/2} Q_rᵀ Λ^{-1/2} Uᵀ
    return b.float(), a.float()


@dataclass
class LowRankCompensation(WrappingSolver):
    """Runs `base`, then fits an EoRA correction of rank `rank` to its error (stored fp16).

    Built by a recipe's `eora_rank` field around its method (including dense-and-sparse); not a
    method of its own. The correction is fitted to the final stored error, sparse outliers included.
    """

    base: Solver
    rank: int = 32

    name = "eora"
    needs_hessian = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"eora rank must be at least 1, got {self.rank}")

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        if stats is None:
            raise ValueError("eora fits its correction on calibration statistics; pass --calib")
        qweight = self.base.solve(weight, fmt, stats)
        if qweight.lowrank is not None:
            raise ValueError("the weight already carries a low-rank correction; apply eora once")
        b, a = eora_factors(weight.float() - qweight.dequantize(), stats.hessian, self.rank)
        qweight.lowrank = LowRankCorrection(a.to(torch.float16), b.to(torch.float16))
        return qweight

    def solve_keeping(
        self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None, keep: torch.Tensor
    ) -> QuantizedWeight:
        raise ValueError("apply outliers inside eora (eora wraps dense-and-sparse), not the other way round")
