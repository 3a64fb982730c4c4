"""Dense-and-sparse outliers around any solver: selection, bookkeeping and GPTQ's exact variant."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.integer import IntegerFormat
from lowbit.recipes import Recipe
from lowbit.solvers.gptq import GPTQ
from lowbit.solvers.outliers import DenseAndSparse, hessian_saliency, outlier_mask
from lowbit.solvers.rtn import RTN


def correlated_stats(columns: int, tokens: int = 512, seed: int = 0) -> HessianStats:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=generator, dtype=torch.float64) / columns**0.5
    x = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) @ (torch.eye(columns) + mix)
    stats = HessianStats(columns)
    stats.add((x * torch.linspace(0.2, 3.0, columns, dtype=torch.float64)).float())
    return stats


def test_hessian_saliency_matches_explicit_inverse():
    torch.manual_seed(0)
    w = torch.randn(5, 12, dtype=torch.float64)
    h = correlated_stats(12).hessian.double()
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    inverse = torch.linalg.inv(damped)
    expected = torch.tensor([[w[i, j] ** 2 / inverse[j, j] for j in range(12)] for i in range(5)])
    assert torch.allclose(hessian_saliency(w, h).double(), expected, rtol=1e-5)


def test_sparse_bookkeeping_is_exact_for_rtn():
    torch.manual_seed(1)
    w = torch.randn(24, 64) * torch.rand(24, 64).pow(4) * 4
    fmt = IntegerFormat(bits=3, symmetric=False, group_size=32)
    fraction = 0.01
    qweight = DenseAndSparse(RTN(), fraction, "magnitude").solve(w, fmt, None)
    keep = outlier_mask(w, fraction)
    assert qweight.sparse.count == math.ceil(fraction * w.numel()) == int(keep.sum())
    # Kept weights come back to fp16 precision; the rest is RTN of the matrix with them zeroed.
    dense = qweight.dequantize()
    assert torch.allclose(dense[keep], w[keep], rtol=1e-3, atol=1e-3)
    rtn = RTN().solve(w.masked_fill(keep, 0.0), fmt, None).dequantize()
    assert torch.equal(dense[~keep], rtn[~keep])
    grid_bits = fmt.bits_per_weight(24, 64) * w.numel()
    sparse_bits = qweight.sparse.count * (16 + 16) + 32 * (24 + 1)
    assert qweight.bits_per_weight() == pytest.approx((grid_bits + sparse_bits) / w.numel())


def reference_gptq_keeping(w, fmt, hessian, keep, damp=0.01):
    """Column-by-column Optimal Brain Surgeon with an explicit inverse: kept weights add no error."""
    W = w.double().clone()
    columns = W.shape[1]
    H = hessian + damp * hessian.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    grid = torch.zeros_like(W)
    exact = torch.zeros_like(W)
    params = None
    for q in range(columns):
        if q % fmt.group_size == 0:
            group = W[:, q : q + fmt.group_size].masked_fill(keep[:, q : q + fmt.group_size], 0.0)
            params = fmt.fit(group)
        column = W[:, q : q + 1]
        grid[:, q : q + 1] = fmt.round_trip(column, params).double()
        err = (column - grid[:, q : q + 1]).masked_fill(keep[:, q : q + 1], 0.0)
        exact[:, q : q + 1] = column.masked_fill(~keep[:, q : q + 1], 0.0)
        W[:, q + 1 :] -= err / Hinv[q, q] * Hinv[q, q + 1 :]
        Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return torch.where(keep, exact, grid)


def test_gptq_keeping_matches_slow_reference():
    torch.manual_seed(2)
    w = torch.randn(16, 48, dtype=torch.float64)
    stats = correlated_stats(48)
    fmt = IntegerFormat(bits=3, symmetric=True, group_size=16, scale_dtype=torch.float32)
    keep = outlier_mask(w, 0.03, hessian_saliency(w, stats.hessian))
    qweight = GPTQ(block_size=8).solve_keeping(w, fmt, stats, keep)
    expected = reference_gptq_keeping(w, fmt, stats.hessian.double(), keep)
    # Kept values go through fp16 (the sparse part's storage); the rest is exact.
    assert torch.allclose(qweight.dequantize().double(), expected, atol=2e-3)
    assert torch.allclose(qweight.dequantize().double()[~keep], expected[~keep], atol=1e-9)
    assert qweight.sparse.count == int(keep.sum())


def test_outliers_lower_the_layer_error_of_gptq_and_recipe_wires_them():
    torch.manual_seed(3)
    w = torch.randn(32, 64) * (1 + 8 * (torch.rand(32, 64) < 0.01))
    stats = correlated_stats(64)
    fmt = IntegerFormat(bits=2, symmetric=False, group_size=32)

    def error(qweight):
        delta = (w.double() - qweight.dequantize().double())
        return float(((delta @ stats.hessian.double()) * delta).sum())

    plain = error(GPTQ().solve(w, fmt, stats))
    recipe = Recipe(method="gptq", bits=2, symmetric=False, group_size=32, outliers=0.01)
    solver = recipe.solver()
    assert isinstance(solver, DenseAndSparse) and solver.needs_hessian and not solver.rows_independent
    assert error(solver.solve(w, fmt, stats)) < 0.8 * plain
    assert not Recipe(method="rtn", outliers=0.01, outlier_criterion="magnitude").needs_calibration()
    assert "outliers" not in Recipe().model_dump()
    with pytest.raises(ValueError):
        Recipe(outliers=0.5)
