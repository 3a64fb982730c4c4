"""The budget job: calibration, sensitivity table (cached), allocation. Used by the CLI and benchmarks."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.budget.candidates import Candidate
from lowbit.budget.bank import CandidateBank
from lowbit.budget.evolve import EvolutionOptions, evolve_plan
from lowbit.budget.plan import Budget, BudgetPlan, choose_plan
from lowbit.budget.sensitivity import SensitivityTable, measure_sensitivity
from lowbit.budget.size import dense_bytes
from lowbit.models.architectures import architecture_of
from lowbit.recipes.recipe import Recipe


@dataclass(frozen=True)
class PlanOptions:
    """How candidates are scored and chosen."""

    candidates: tuple[Candidate, ...]
    weighting: str = "fisher"
    fisher_samples: int = 8
    cache_dir: Path | None = None
    allocator: str = "dp"
    evolution: EvolutionOptions | None = None
    """When set, the DP plan is refined by an evolutionary search scored by measured KL."""


def sensitivity_for(
    model: nn.Module, calibration: torch.Tensor, base: Recipe, options: PlanOptions, device: torch.device | str = "cpu"
) -> SensitivityTable:
    """The damage table of every layer `base` does not ignore (the model is moved to `device` and back)."""
    solver_options = {base.method: dict(base.method_options)}
    original = next(model.parameters()).device
    model.to(device)
    try:
        return measure_sensitivity(
            model, architecture_of(model), calibration.to(device), list(options.candidates),
            lambda name: not base.is_ignored(name), weighting=options.weighting,
            fisher_samples=options.fisher_samples, scale_dtype=base.stored_scale_dtype(), method_options=solver_options,
            cache_dir=options.cache_dir,
        )
    finally:
        model.to(original)


def plan_budget(
    model: nn.Module, table: SensitivityTable, base: Recipe, budget: Budget, options: PlanOptions,
    calibration: torch.Tensor | None = None, device: torch.device | str = "cpu",
) -> tuple[BudgetPlan, Recipe]:
    """The least-damage plan within `budget` and the recipe that replays it.

    With `options.evolution`, the knapsack's plan is the starting point of an evolutionary search
    on `calibration` (needed then) that keeps the plan whose assembled model has the least KL.
    """
    dense = dense_bytes(model, set(table.layers))
    plan = choose_plan(table, list(options.candidates), budget, dense, base.stored_scale_dtype(), options.allocator)
    if options.evolution is not None:
        if calibration is None:
            raise ValueError("the evolutionary refinement needs calibration windows")
        plan = refine_plan(model, calibration, table, plan, base, options, budget.capacity_bits(plan.weights, dense),
                           device)
    return plan, plan.recipe(base)


def refine_plan(
    model: nn.Module, calibration: torch.Tensor, table: SensitivityTable, plan: BudgetPlan, base: Recipe,
    options: PlanOptions, capacity_bits: float, device: torch.device | str = "cpu",
) -> BudgetPlan:
    """`plan` improved by measured KL (budget.evolve); works on a copy, `model` is left as it was."""
    original_device = next(model.parameters()).device
    model.to(device)
    working = copy.deepcopy(model)
    try:
        bank = CandidateBank(model, architecture_of(model), calibration.to(device), list(options.candidates),
                             set(table.layers), {base.method: dict(base.method_options)}, base.stored_scale_dtype())
        fitness = calibration[-options.evolution.fitness_windows:].to(device)
        return evolve_plan(model, working, bank, plan, table, list(options.candidates), capacity_bits, fitness,
                           options.evolution, base.stored_scale_dtype())
    finally:
        del working
        model.to(original_device)
