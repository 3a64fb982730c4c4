"""Evolutionary refinement of budget plans: budget kept, KL measured honestly, bad plans improved."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lowbit.budget.candidates import candidate_grid
from lowbit.budget.evolve import CandidateBank, EvolutionOptions, _Fitness, _mutate, evolve_plan
from lowbit.budget.plan import Budget, choose_plan
from lowbit.budget.sensitivity import SensitivityTable, measure_sensitivity
from lowbit.budget.size import dense_bytes, linear_bits
from lowbit.models.architectures import architecture_of
from lowbit.solvers.rtn import RTN
from tests.conftest import tiny_llama

CANDIDATES = candidate_grid(("rtn",), (2, 4, 8), (32, -1))


def test_mutation_keeps_the_budget_and_changes_the_plan():
    rng = random.Random(0)
    options = [[0, 1, 2]] * 20
    bits = [[2.0, 4.0, 8.0]] * 20
    parent = [1] * 20
    capacity = 4.0 * 20
    for _ in range(200):
        child = _mutate(parent, options, bits, capacity, rng, max_switches=3)
        if child is None:
            continue
        assert child != parent
        assert sum(bits[l][k] for l, k in enumerate(child)) <= capacity


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model = tiny_llama()
    calibration = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(3))
    table = measure_sensitivity(model, architecture_of(model), calibration, CANDIDATES, lambda n: True,
                                weighting="hessian", cache_dir=tmp_path_factory.mktemp("cache"))
    bank = CandidateBank(model, architecture_of(model), calibration, CANDIDATES, set(table.layers), {}, "float16")
    return model, calibration, table, bank


def test_bank_holds_each_candidates_solution(setting):
    model, _, _, bank = setting
    working = copy.deepcopy(model)
    name = "model.layers.1.mlp.up_proj"
    candidate = next(c for c in CANDIDATES if c.key == "rtn:4:32:asym")
    bank.apply(working, name, candidate)
    expected = RTN().solve(model.get_submodule(name).weight.detach().float(), candidate.format()).dequantize()
    assert torch.equal(working.get_submodule(name).weight, expected)


def _worst_plan(table: SensitivityTable, model, target: float):
    """The DP's plan for the *negated* damages: the most harmful allocation within the budget."""
    negated = SensitivityTable(table.weighting, table.shapes,
                               {n: {k: -v for k, v in d.items()} for n, d in table.damage.items()})
    plan = choose_plan(negated, CANDIDATES, Budget(target_bits=target), dense_bytes(model, set(table.layers)))
    return plan


def test_evolution_improves_a_bad_plan_within_budget(setting):
    model, calibration, table, bank = setting
    target = 4.0
    start = _worst_plan(table, model, target)
    before = {name: p.clone() for name, p in model.named_parameters()}
    working = copy.deepcopy(model)
    capacity = Budget(target_bits=target).capacity_bits(start.weights, 0)
    options = EvolutionOptions(generations=4, offspring=5, survivors=1, fitness_windows=2, seed=0)
    refined = evolve_plan(model, working, bank, start, table, CANDIDATES, capacity, calibration[-2:], options)

    assert refined.linear_bits <= capacity
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # the original is untouched
    assert refined.measured_kl["final"] < refined.measured_kl["start"]
    # The reported KL is the KL of the plan returned, assembled from scratch.
    fresh = copy.deepcopy(model)
    for choice in refined.layers:
        fresh.get_submodule(choice.name).weight.data = RTN().solve(
            model.get_submodule(choice.name).weight.detach().float(), choice.candidate.format()).dequantize()
        assert choice.bits == linear_bits(choice.candidate.format(), *choice.shape)
    kl = _Fitness(model, calibration[-2:])(fresh, 2)
    assert kl == pytest.approx(refined.measured_kl["final"], rel=1e-4)


def test_options_reject_nonsense():
    with pytest.raises(ValueError, match="survivors"):
        EvolutionOptions(offspring=2, survivors=3)
    with pytest.raises(ValueError, match="at least one generation"):
        EvolutionOptions(generations=0)
