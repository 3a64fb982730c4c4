"""HQQ (Badri & Shaji, 2023): half-quadratic fit of each group's grid, with no calibration data.

Min/max ranges let one outlier coarsen the grid of its whole group. HQQ instead fits the grid
parameters to the weights under a sparsity-promoting error |W - Ŵ|_p^p with p < 1, which cares
little whether a few weights land far from the grid as long as most land close. The problem is
split with an auxiliary error variable E ≈ W - Ŵ (half-quadratic splitting) and solved by
alternating two easy steps:

  * E-step: E = shrink_p(W - Ŵ, β), the proximal operator of the lp norm (a generalised
    soft-threshold: sign(x) · max(|x| - |x|^(p-1) / β, 0));
  * parameter step: the grid parameters that reproduce W - E best in least squares, in closed
    form, then the codes by rounding.

β grows by κ each iteration so that E is pushed towards W - Ŵ. The reference code updates only a
fractional zero point. lowbit stores integer zero points (compressed-tensors does), so a zero-only
update rarely moves; here the parameter step also refits the scale (a per-row linear regression of
W - E on the codes, zero rounded to the grid, then the scale refitted for that zero), which is
where the gain comes from. Iterations stop early when the total lp error stops falling, and each
row keeps the parameters with its lowest lp error, so the result is never worse than min/max RTN
in that objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import FormatError, GroupParams, QuantizedWeight, WeightFormat, quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.solvers.base import Solver, register_solver


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p / beta (p <= 1): shrink every value towards 0, zeros stay 0."""
    magnitude = x.abs()
    threshold = magnitude.clamp(min=torch.finfo(x.dtype).tiny).pow(p - 1) / beta
    return torch.sign(x) * torch.relu(magnitude - threshold)


def lp_error(fmt: IntegerFormat, w: torch.Tensor, params: GroupParams, p: float) -> torch.Tensor:
    """Σ |W - Ŵ|^p per row ([rows, 1]), or over the whole group ([1, 1]) for a per-tensor format."""
    err = (fmt.round_trip(w, params) - w).abs().pow(p)
    return err.sum().reshape(1, 1) if fmt.per_tensor else err.sum(dim=1, keepdim=True)


def _zero_point(fmt: IntegerFormat, params: GroupParams, like: torch.Tensor) -> torch.Tensor:
    if params.zero is not None:
        return params.zero.float()
    return torch.full_like(like, float(1 << (fmt.bits - 1)))


def _storable(fmt: IntegerFormat, scale: torch.Tensor) -> torch.Tensor:
    """Scales as the format stores them (rounded to its scale dtype, never zero), like IntegerFormat.fit."""
    return scale.to(fmt.scale_dtype).clamp(min=torch.finfo(fmt.scale_dtype).tiny)


def refit_params(
    fmt: IntegerFormat, codes: torch.Tensor, target: torch.Tensor, params: GroupParams, scale_too: bool
) -> GroupParams:
    """Closed-form least-squares parameters for which (codes - zero) · scale reproduces `target`.

    Rows (or the whole tensor, per-tensor) are fitted independently. Zero only: zero = mean(codes -
    target / scale), as in HQQ. With `scale_too`: regress target on codes for scale and offset,
    round the zero it implies, then refit the scale for that zero. Rows where the regression is
    degenerate (all codes equal) or gives a non-positive scale keep their scale.
    """
    dims = (0, 1) if fmt.per_tensor else (1,)
    q, t = codes.float(), target.float()
    old_scale = params.scale.float()
    zero = _zero_point(fmt, params, old_scale)
    scale = old_scale
    if scale_too and params.zero is not None:
        q_mean, t_mean = q.mean(dim=dims, keepdim=True), t.mean(dim=dims, keepdim=True)
        q_var = (q - q_mean).square().mean(dim=dims, keepdim=True)
        covariance = ((q - q_mean) * (t - t_mean)).mean(dim=dims, keepdim=True)
        slope = covariance / q_var.clamp(min=1e-12)
        usable = (q_var > 0) & (slope > 0)
        scale = torch.where(usable, slope, old_scale)
        zero = torch.where(usable, q_mean - t_mean / scale, zero)
    elif params.zero is not None:
        zero = (q - t / scale).mean(dim=dims, keepdim=True)
    if params.zero is not None:
        zero = torch.clamp(torch.round(zero), 0, fmt.max_code)
    if scale_too:
        centred = q - zero
        numerator = (centred * t).sum(dim=dims, keepdim=True)
        denominator = centred.square().sum(dim=dims, keepdim=True)
        refitted = numerator / denominator.clamp(min=1e-12)
        scale = torch.where((denominator > 0) & (refitted > 0), refitted, scale)
    return GroupParams(_storable(fmt, scale), None if params.zero is None else zero)


@register_solver
@dataclass
class HQQ(Solver):
    """Half-quadratic quantization of integer grids: lp error (p < 1), data-free.

    Defaults follow the HQQ reference (p = 0.7, β = 10, κ = 1.01, 20 iterations, early stop);
    `optimize_scale` adds the closed-form scale refit explained in the module docstring.
    """

    name: ClassVar[str] = "hqq"

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = True
    early_stop: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1:
            raise ValueError(f"need beta > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}")
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None = None) -> QuantizedWeight:
        if not isinstance(fmt, IntegerFormat):
            raise FormatError(f"hqq fits scales and zero points of integer grids; {fmt.name} is not one")
        return quantize_matrix(fmt, weight, fit=partial(self.fit, fmt))

    def step(self, fmt: IntegerFormat, w: torch.Tensor, params: GroupParams, beta: float) -> GroupParams:
        """One half-quadratic iteration: shrink the error, refit the parameters to W - E."""
        codes = fmt.encode(w, params)
        error = shrink_lp(w - fmt.decode(codes, params), beta, self.lp_norm)
        return refit_params(fmt, codes, w - error, params, self.optimize_scale)

    def fit(self, fmt: IntegerFormat, w: torch.Tensor) -> GroupParams:
        """Parameters of one group: start from min/max, iterate, keep each row's best."""
        w = w.float()
        params = best = fmt.fit(w)
        best_error = lp_error(fmt, w, best, self.lp_norm)
        previous_total = float(best_error.sum())
        beta = self.beta
        for _ in range(self.iters):
            params = self.step(fmt, w, params, beta)
            beta *= self.kappa
            error = lp_error(fmt, w, params, self.lp_norm)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = GroupParams(
                scale=torch.where(better, params.scale, best.scale),
                zero=None if best.zero is None else torch.where(better, params.zero, best.zero),
            )
            total = float(error.sum())
            if self.early_stop and total >= previous_total:
                break
            previous_total = total
        return best
