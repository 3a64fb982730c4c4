"""Hessian statistics: the triangular accumulation equals the full product."""

import pytest
import torch

from lowbit.calibrate.stats import HessianStats


@pytest.mark.parametrize("columns", [7, 128, 200, 576])
def test_hessian_is_the_full_symmetric_mean_outer_product(columns):
    x = torch.randn(3, 300, columns, generator=torch.Generator().manual_seed(columns))
    stats = HessianStats(columns)
    stats.add(x[0])
    stats.add(x[1:])
    flat = x.reshape(-1, columns).double()
    expected = 2.0 / flat.shape[0] * flat.T @ flat
    assert stats.tokens == 900
    assert torch.equal(stats.hessian, stats.hessian.T)
    assert torch.allclose(stats.hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_no_tokens_and_wrong_width_are_errors():
    stats = HessianStats(8)
    with pytest.raises(ValueError, match="no calibration tokens"):
        stats.hessian
    with pytest.raises(ValueError, match="expected inputs with 8 features"):
        stats.add(torch.randn(4, 9))
