"""Evolutionary refinement of budget plans: budget kept, KL measured honestly, bad plans improved."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lowbit.budget import sensitivity
from lowbit.budget.candidates import candidate_grid
from lowbit.budget.curvature import hutchinson_traces
from lowbit.budget.bank import CandidateBank, KLFitness
from lowbit.budget.evolve import EvolutionOptions, _mutate, evolve_plan
from lowbit.budget.plan import Budget, choose_plan
from lowbit.budget.sensitivity import SensitivityTable, measure_sensitivity
from lowbit.budget.size import dense_bytes, linear_bits
from lowbit.models.architectures import architecture_of
from lowbit.solvers.rtn import RTN
from tests.conftest import tiny_llama, tiny_llama_config
from transformers import LlamaForCausalLM

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
    kl = KLFitness(model, calibration[-2:])(fresh, 2)
    assert kl == pytest.approx(refined.measured_kl["final"], rel=1e-4)


def test_options_reject_nonsense():
    with pytest.raises(ValueError, match="survivors"):
        EvolutionOptions(offspring=2, survivors=3)
    with pytest.raises(ValueError, match="at least one generation"):
        EvolutionOptions(generations=0)


def test_hutchinson_trace_is_the_mean_of_probe_quadratic_forms_of_the_exact_hessian():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=16, intermediate_size=16, num_attention_heads=2,
                                               num_key_value_heads=1, num_hidden_layers=1)).eval()
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight
    windows = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))

    model.set_attn_implementation("eager")  # second derivatives of the reference itself
    hessians = [
        torch.func.hessian(
            lambda w, ids=ids: torch.func.functional_call(model, {name + ".weight": w}, (ids[None],),
                                                          {"labels": ids[None]}).loss
        )(weight.detach().clone()).reshape(weight.numel(), -1)
        for ids in windows
    ]
    model.set_attn_implementation("sdpa")
    generator = torch.Generator().manual_seed(0)  # the estimator's probes, drawn in the same order
    forms = []
    for hessian in hessians:
        probe = (torch.randint(0, 2, weight.shape, generator=generator) * 2 - 1).float().reshape(-1)
        forms.append(float(probe @ hessian @ probe))
    expected = sum(forms) / len(forms) / weight.numel()

    estimate = hutchinson_traces(model, [name], windows, windows=2)[name]
    assert estimate == pytest.approx(expected, rel=1e-3)
    assert model.config._attn_implementation == "sdpa"  # the eager switch is undone
    assert all(p.requires_grad for p in model.parameters())  # gradient flags restored


def test_kl_weighting_is_the_measured_kl_of_one_quantized_layer(tmp_path):
    model = tiny_llama()
    calibration = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    candidates = candidate_grid(("rtn",), (2, 8), (-1,))
    table = measure_sensitivity(model, architecture_of(model), calibration, candidates, lambda n: "layers.1" in n,
                                weighting="kl", fisher_samples=2, cache_dir=tmp_path)
    fitness = KLFitness(model, calibration[:2])
    name = "model.layers.1.mlp.gate_proj"
    for candidate in candidates:
        quantized = copy.deepcopy(model)
        quantized.get_submodule(name).weight.data = RTN().solve(
            model.get_submodule(name).weight.detach().float(), candidate.format()).dequantize()
        assert table.damage[name][candidate.key] == pytest.approx(fitness(quantized, 2), rel=1e-5)
    assert table.damage[name]["rtn:2:-1:asym"] > table.damage[name]["rtn:8:-1:asym"]
    assert set(table.layers) == {n for n in table.layers if "layers.1" in n}


def test_trace_weighting_scales_weight_error_by_curvature(tmp_path, monkeypatch):
    model = tiny_llama()
    calibration = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(sensitivity, "hutchinson_traces", lambda m, names, *a, **k: {n: 2.0 for n in names})
    candidates = candidate_grid(("rtn",), (4,), (-1,))
    table = measure_sensitivity(model, architecture_of(model), calibration, candidates, lambda n: True,
                                weighting="trace", fisher_samples=1, cache_dir=tmp_path)
    name = "model.layers.0.self_attn.o_proj"
    weight = model.get_submodule(name).weight.detach().float()
    error = weight - RTN().solve(weight, candidates[0].format()).dequantize()
    assert table.damage[name][candidates[0].key] == pytest.approx(0.5 * 2.0 * float(error.square().sum()), rel=1e-5)
