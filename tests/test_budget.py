"""Budget: knapsack against brute force, sensitivity against obvious references, plans that replay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lowbit.budget import sensitivity
from lowbit.budget.allocate import BudgetError, solve_dp, solve_milp
from lowbit.budget.candidates import Candidate, candidate_grid
from lowbit.budget.plan import Budget, choose_plan, parse_size
from lowbit.budget.sensitivity import SensitivityTable, measure_sensitivity, row_errors
from lowbit.budget.size import dense_bytes, linear_bits
from lowbit.models.architectures import architecture_of
from lowbit.recipes import Recipe
from lowbit.solvers.rtn import RTN
from tests.conftest import tiny_llama


def brute_force(costs, damages, budget):
    """The optimum by enumeration: (least damage, its cost)."""
    best = None
    for indices in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[i] for c, i in zip(costs, indices))
        damage = sum(d[i] for d, i in zip(damages, indices))
        if cost <= budget and (best is None or damage < best[0]):
            best = (damage, cost)
    return best


def random_instance(rng, layers, integer):
    costs = [rng.integers(1, 20, size=rng.integers(1, 4)).astype(float) if integer
             else rng.uniform(1, 20, size=rng.integers(1, 4)) for _ in range(layers)]
    damages = [rng.uniform(0, 10, size=len(c)) for c in costs]
    return costs, damages


@pytest.mark.parametrize("seed", range(30))
def test_dp_and_milp_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs, damages = random_instance(rng, layers=int(rng.integers(1, 6)), integer=True)
    lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
    budget = int(rng.integers(int(lo), int(hi) + 1))
    expected_damage, _ = brute_force(costs, damages, budget)
    # Integer costs with one unit per cost step: the DP is exact.
    dp = solve_dp(costs, damages, budget, resolution=budget)
    assert dp.damage == pytest.approx(expected_damage) and dp.cost <= budget
    pytest.importorskip("scipy")
    milp = solve_milp(costs, damages, budget)
    assert milp.damage == pytest.approx(expected_damage) and milp.cost <= budget + 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_dp_with_real_costs_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(100 + seed)
    costs, damages = random_instance(rng, layers=5, integer=False)
    budget = float(rng.uniform(sum(c.min() for c in costs), sum(c.max() for c in costs)))
    dp = solve_dp(costs, damages, budget, resolution=10_000)
    optimum, _ = brute_force(costs, damages, budget)
    assert dp.cost <= budget
    assert dp.damage >= optimum - 1e-9
    # Rounding costs up can only lose the choices within 5 units (one per layer) of the budget.
    assert dp.damage <= brute_force(costs, damages, budget * (1 - 5 / 10_000))[0] + 1e-9


def test_infeasible_budget_says_the_range():
    with pytest.raises(BudgetError) as info:
        solve_dp([np.array([3.0, 5.0]), np.array([2.0])], [np.array([1.0, 0.0]), np.array([0.0])], 4.0)
    assert (info.value.smallest, info.value.largest) == (5.0, 7.0)


def test_parse_size():
    assert parse_size("6GB") == 6 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("80 mb") == 80 * 10**6
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError, match="6GB"):
        parse_size("six gigs")


def test_row_errors_is_the_mean_squared_output_error():
    torch.manual_seed(0)
    w, x = torch.randn(5, 16), torch.randn(40, 16)
    w_hat = RTN().solve(w, Candidate("rtn", 3, 8).format()).dequantize()
    hessian = 2 / x.shape[0] * x.T @ x
    expected = 2 * ((x @ (w - w_hat).T) ** 2).mean(dim=0)
    assert torch.allclose(row_errors(w, w_hat, hessian).float(), expected, rtol=1e-5)


CANDIDATES = candidate_grid(("rtn",), (2, 4, 8), (32, -1))


def _calibration():
    return torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))


def _inputs_and_output_grads(model, name, calibration):
    """Reference statistics of one linear: its inputs, and d(summed loss)/d(outputs), window by window."""
    linear = model.get_submodule(name)
    xs, grads = [], []
    for window in calibration:
        captured = {}

        def hook(module, args, output):
            captured["x"] = args[0].detach()
            captured["y"] = output

        handle = linear.register_forward_hook(hook)
        embeds = model.get_input_embeddings()(window[None]).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=window[None]).loss * (window.numel() - 1)
        handle.remove()
        grads.append(torch.autograd.grad(loss, captured["y"])[0].reshape(-1, linear.out_features))
        xs.append(captured["x"].reshape(-1, linear.in_features))
    return torch.cat(xs), torch.cat(grads)


@pytest.mark.parametrize("weighting", ["hessian", "fisher"])
def test_sensitivity_matches_a_direct_computation(tmp_path, weighting):
    model = tiny_llama()
    calibration = _calibration()
    table = measure_sensitivity(model, architecture_of(model), calibration, CANDIDATES, lambda n: True,
                                weighting=weighting, fisher_samples=3, cache_dir=tmp_path)
    assert len(table.layers) == 2 * 7 and all(p.grad is None for p in model.parameters())
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        x, grads = _inputs_and_output_grads(model, name, calibration)
        hessian = 2 / x.shape[0] * x.T @ x
        weight = model.get_submodule(name).weight.detach()
        for candidate in CANDIDATES:
            if not candidate.fits(weight.shape[1]):
                assert candidate.key not in table.damage[name]
                continue
            errors = row_errors(weight, RTN().solve(weight, candidate.format()).dequantize(), hessian)
            fisher = grads.square().mean(dim=0).double()
            expected = errors.sum() if weighting == "hessian" else 0.25 * (fisher * errors).sum()
            assert table.damage[name][candidate.key] == pytest.approx(float(expected), rel=1e-4), candidate
        damage = table.damage[name]
        assert damage["rtn:8:-1:asym"] < damage["rtn:4:-1:asym"] < damage["rtn:2:-1:asym"]


def test_fisher_weighting_needs_gradient_windows(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="--fisher-samples"):
        measure_sensitivity(model, architecture_of(model), _calibration(), CANDIDATES, lambda n: True,
                            weighting="fisher", fisher_samples=0, cache_dir=tmp_path)


def test_sensitivity_is_cached(tmp_path, monkeypatch):
    model, calibration = tiny_llama(), _calibration()
    args = (model, architecture_of(model), calibration, CANDIDATES, lambda n: "mlp" in n)
    first = measure_sensitivity(*args, weighting="hessian", cache_dir=tmp_path)
    monkeypatch.setattr(sensitivity, "collect_statistics", lambda *a, **k: pytest.fail("recomputed"))
    assert measure_sensitivity(*args, weighting="hessian", cache_dir=tmp_path).damage == first.damage
    other = calibration.clone()
    other[0, 0] += 1
    monkeypatch.undo()
    assert measure_sensitivity(model, architecture_of(model), other, CANDIDATES, lambda n: "mlp" in n,
                               weighting="hessian", cache_dir=tmp_path).meta["key"] != first.meta["key"]


def _table() -> tuple[SensitivityTable, torch.nn.Module]:
    model = tiny_llama()
    return measure_sensitivity(model, architecture_of(model), _calibration(), CANDIDATES, lambda n: True,
                               weighting="hessian", cache_dir=None), model


@pytest.fixture(scope="module")
def table_and_model(tmp_path_factory):
    import os

    os.environ["LOWBIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return _table()


@pytest.mark.parametrize("target", [2.3, 3.0, 4.6, 8.6])
def test_plan_meets_the_target_and_replays_as_a_recipe(table_and_model, target):
    table, model = table_and_model
    plan = choose_plan(table, CANDIDATES, Budget(target_bits=target), dense_bytes(model, set(table.layers)))
    assert plan.bits_per_weight <= target
    assert plan.bits_per_weight >= target * 0.98 or plan.bits_per_weight == pytest.approx(
        sum(max(linear_bits(c.format(), *table.shapes[n]) for c in CANDIDATES if c.key in table.damage[n])
            for n in table.layers) / plan.weights)  # the budget is used, unless even all-best fits
    recipe = plan.recipe(Recipe(method="rtn", symmetric=False))
    choose = recipe.plan()
    for choice in plan.layers:
        fmt, solver = choose(choice.name, model.get_submodule(choice.name))
        assert (solver.name, fmt.bits, fmt.group_size, fmt.symmetric) == (
            choice.candidate.method, choice.candidate.bits, choice.candidate.group_size, False)
    # A larger budget never gives a plan of more damage.
    larger = choose_plan(table, CANDIDATES, Budget(target_bits=target + 0.5), 0)
    assert larger.damage <= plan.damage + 1e-12


def test_budget_in_bytes_counts_unquantized_tensors(table_and_model):
    table, model = table_and_model
    dense = dense_bytes(model, set(table.layers))
    # Tied embeddings are counted once: embeddings + norms, all float32.
    assert dense == 4 * (256 * 64 + 2 * 2 * 64 + 64)
    weights = sum(rows * columns for rows, columns in table.shapes.values())
    plan = choose_plan(table, CANDIDATES, Budget(max_bytes=dense + weights * 3 // 8), dense)
    assert dense + weights * 2.9 / 8 <= plan.total_bytes <= dense + weights * 3 / 8
    with pytest.raises(BudgetError, match=r"between \d+\.\d+ kB and \d+\.\d+ kB"):
        choose_plan(table, CANDIDATES, Budget(max_bytes=dense + 100), dense)
    with pytest.raises(BudgetError, match=r"choose a budget between 2\.\d+ bits/weight and 8\.\d+ bits/weight"):
        choose_plan(table, CANDIDATES, Budget(target_bits=1.5), dense)
