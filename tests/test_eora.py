"""EoRA: the correction is the best rank-r fit of the error in the layer's output norm."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.integer import IntegerFormat
from lowbit.recipes import Recipe
from lowbit.solvers.lowrank import LowRankCompensation, eora_factors
from lowbit.solvers.rtn import RTN


def weighted_error(e: torch.Tensor, h: torch.Tensor) -> float:
    return float(torch.trace(e @ h @ e.T))


def alternating_least_squares(e: torch.Tensor, h: torch.Tensor, rank: int, steps: int = 3000) -> float:
    """Brute-force reference: minimise tr((E − BA) H (E − BA)ᵀ) by exact alternating solves from a
    random start (low-rank problems have no spurious local minima, so this reaches the optimum)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rank, e.shape[1], generator=generator, dtype=torch.float64)
    for _ in range(steps):
        b = e @ h @ a.T @ torch.linalg.inv(a @ h @ a.T)  # best B for this A
        a = torch.linalg.lstsq(b, e).solution  # best A for this B (H-weighted or not, same minimiser)
    return weighted_error(e - b @ a, h)


@pytest.mark.parametrize("rank", [1, 3])
def test_eora_is_the_optimal_rank_r_correction_in_the_hessian_norm(rank):
    torch.manual_seed(0)
    e = torch.randn(7, 6, dtype=torch.float64)
    x = torch.randn(40, 6, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3, 2.0, 0.1, 1.0], dtype=torch.float64)
    h = x.T @ x / 40
    b, a = eora_factors(e, h, rank)
    got = weighted_error(e - b.double() @ a.double(), h)
    # Closed form: the tail singular values of E·L with H = L Lᵀ (any square root gives the same).
    singular = torch.linalg.svdvals(e @ torch.linalg.cholesky(h))
    assert got == pytest.approx(float(singular[rank:].square().sum()), rel=1e-4)
    assert got == pytest.approx(alternating_least_squares(e, h, rank), rel=1e-4)
    # A plain SVD of E, blind to the inputs, does worse.
    u, s, vt = torch.linalg.svd(e)
    plain = weighted_error(e - u[:, :rank] * s[:rank] @ vt[:rank], h)
    assert got < plain


def test_eora_wrapper_adds_its_factors_and_bits():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    stats = HessianStats(64)
    stats.add(torch.randn(256, 64) * torch.linspace(0.1, 2, 64))
    fmt = IntegerFormat(bits=2, symmetric=False, group_size=32)
    base = RTN().solve(w, fmt, None)
    qweight = LowRankCompensation(RTN(), rank=4).solve(w, fmt, stats)
    assert qweight.lowrank.rank == 4 and qweight.lowrank.a.dtype == torch.float16
    assert torch.allclose(qweight.dequantize(), base.dequantize() + qweight.lowrank.to_dense())
    extra = 16 * 4 * (32 + 64) / w.numel()
    assert qweight.bits_per_weight() == pytest.approx(base.bits_per_weight() + extra)
    h = stats.hessian.double()
    assert weighted_error((w - qweight.dequantize()).double(), h) < 0.8 * weighted_error(
        (w - base.dequantize()).double(), h
    )
    # Full rank recovers the weight up to fp16 rounding of the factors.
    full = LowRankCompensation(RTN(), rank=64).solve(w, fmt, stats)
    assert torch.allclose(full.dequantize(), w, atol=2e-2)


def test_recipe_wraps_any_method_with_eora_and_outliers():
    recipe = Recipe(method="rtn", bits=3, eora_rank=8, outliers=0.005, outlier_criterion="magnitude")
    solver = recipe.solver()
    assert isinstance(solver, LowRankCompensation) and solver.needs_hessian and recipe.needs_calibration()
    assert "eora r8" in recipe.describe() and "0.50% magnitude outliers" in recipe.describe()
    with pytest.raises(ValueError, match="eora"):
        LowRankCompensation(RTN(), rank=4).solve(torch.randn(4, 8), IntegerFormat(4), None)
