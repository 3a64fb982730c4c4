"""Binary format and BiLLM-style solver: optimal scales, exact split, salient columns, bit counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.binary import BinaryFormat, two_means
from lowbit.recipes import Recipe
from lowbit.solvers.binary import Binary, salient_columns
from lowbit.solvers.gptq import GPTQ, inverse_hessian_factor


def test_mean_magnitude_is_the_optimal_binarization_scale():
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    fmt = BinaryFormat(split=False, group_size=32, scale_dtype=torch.float32)
    params = fmt.fit(w)
    best = ((fmt.round_trip(w, params) - w) ** 2).sum(dim=1)
    for alpha in torch.linspace(0.01, 3, 300):
        candidate = (w - alpha * torch.sign(w)).square().sum(dim=1)
        assert (best <= candidate + 1e-5).all()


def test_split_is_the_best_two_magnitude_partition():
    torch.manual_seed(1)
    magnitude = torch.randn(3, 9).abs()
    inner, outer = two_means(magnitude)
    for row in range(3):
        values = magnitude[row].double()
        best = min(
            sum(float((values[[i for i in range(9) if m[i] == g]] - values[[i for i in range(9) if m[i] == g]].mean())
                      .square().sum()) for g in (0, 1) if g in m)
            for m in itertools.product((0, 1), repeat=9)
        )
        got = torch.minimum((values - inner[row].double()).square(), (values - outer[row].double()).square()).sum()
        assert float(got) == pytest.approx(best, rel=1e-6)
    assert (inner <= outer).all()


def test_salient_levels_are_residual_binarization():
    w = torch.tensor([[0.9, -1.1, 0.2, -0.1, 2.0, -0.4]])
    fmt = BinaryFormat(group_size=-1, scale_dtype=torch.float32)
    params = fmt.fit_residual(w)
    first = w.abs().mean()
    second = (w - first * torch.sign(w)).abs().mean()
    residual = w - first * torch.sign(w)
    expected = first * torch.sign(w) + second * torch.sign(residual)
    assert torch.allclose(fmt.round_trip(w, params), expected)


def hessian(columns: int, seed: int = 0) -> HessianStats:
    generator = torch.Generator().manual_seed(seed)
    stats = HessianStats(columns)
    stats.add(torch.randn(512, columns, generator=generator) * torch.linspace(0.1, 3, columns))
    return stats


def test_binary_without_salient_columns_is_gptq_on_the_binary_format():
    torch.manual_seed(2)
    w, stats = torch.randn(16, 64), hessian(64)
    fmt = BinaryFormat(split=True, group_size=32)
    ours = Binary(salient_fraction=0.0).solve(w, fmt, stats)
    gptq = GPTQ(block_size=32).solve(w, fmt, stats)
    assert torch.equal(ours.codes, gptq.codes) and torch.allclose(ours.dequantize(), gptq.dequantize())


def test_salient_columns_and_bit_count():
    torch.manual_seed(3)
    w, stats = torch.randn(16, 80), hessian(80)
    fmt = BinaryFormat(split=False, group_size=32)
    qweight = Binary(salient_fraction=0.1).solve(w, fmt, stats)
    salient = qweight.format.salient
    assert salient.shape == (80,) and [int(c.sum()) for c in salient.split(32)] == [3, 3, 2]
    # The first group's salient columns are those of largest Σ w² / d² (nothing updated them yet).
    U, _ = inverse_hessian_factor(stats.hessian, 0.01)
    assert torch.equal(salient[:32], salient_columns(w[:, :32], U.diagonal()[:32], 0.1))
    # Only salient columns use the outer bit when unsplit.
    assert not (qweight.codes[:, ~salient] & 2).any() and (qweight.codes[:, salient] & 2).any()
    expected = 16 * 80 + 16 * 8 + 80 + 16 * 16 * 6 + 16 * 16 * 3  # signs, outer, mask, α, salient β
    assert qweight.bits_per_weight() == pytest.approx(expected / (16 * 80))
    layer = lambda q: float((((w - q.dequantize()).double() @ stats.hessian.double()) * (w - q.dequantize()).double()).sum())  # noqa: E731
    assert layer(qweight) < layer(Binary(salient_fraction=0.0).solve(w, fmt, stats))


def test_binary_family_and_refusals():
    recipe = Recipe(method="binary", format="binary", bits=1, group_size=64)
    fmt = recipe.format_for(576)
    assert isinstance(fmt, BinaryFormat) and not fmt.split and fmt.group_size == 64
    assert Recipe(method="binary", format="binary", bits=2).format_for(576).split
    with pytest.raises(ValueError, match="bits"):
        Recipe(format="binary", bits=3)
    with pytest.raises(ValueError, match="format binary"):
        Binary().solve(torch.randn(4, 8), Recipe(bits=4).format_for(8), hessian(8))
