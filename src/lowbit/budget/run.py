"""The budget job: calibration, sensitivity table (cached), allocation. Used by the CLI and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.budget.candidates import Candidate
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
            fisher_samples=options.fisher_samples, scale_dtype=base.scale_dtype, method_options=solver_options,
            cache_dir=options.cache_dir,
        )
    finally:
        model.to(original)


def plan_budget(
    model: nn.Module, table: SensitivityTable, base: Recipe, budget: Budget, options: PlanOptions
) -> tuple[BudgetPlan, Recipe]:
    """The least-damage plan within `budget` and the recipe that replays it."""
    plan = choose_plan(table, list(options.candidates), budget, dense_bytes(model, set(table.layers)),
                       base.scale_dtype, options.allocator)
    return plan, plan.recipe(base)
