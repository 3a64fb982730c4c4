"""Choose one candidate per layer: least total damage with total storage within a budget.

This is a multiple-choice knapsack. It is solved exactly, up to the discretisation of costs, by
dynamic programming over the budget: best[c] is the least damage of the layers seen so far using
at most c cost units. Costs are rounded *up* to units of budget / resolution, so a plan the DP
returns never exceeds the real budget; the rounding can only leave at most one unit per layer
unused (with the default 100 000 units and a few hundred layers, well under 1% of the budget).
`solve_milp` gives the exact optimum without discretisation (scipy's HiGHS), as a cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESOLUTION = 100_000


class BudgetError(ValueError):
    """A budget no choice of candidates meets; `smallest`/`largest` give the achievable range."""

    def __init__(self, message: str, smallest: float | None = None, largest: float | None = None) -> None:
        super().__init__(message)
        self.smallest = smallest
        self.largest = largest


@dataclass(frozen=True)
class Choice:
    """The chosen candidate index per layer, with the total cost and damage of that choice."""

    indices: tuple[int, ...]
    cost: float
    damage: float


def _check(costs: list[np.ndarray], damages: list[np.ndarray], budget: float) -> tuple[float, float]:
    if len(costs) != len(damages) or not costs:
        raise ValueError("need one cost and one damage array per layer, and at least one layer")
    for cost, damage in zip(costs, damages):
        if len(cost) != len(damage) or len(cost) == 0:
            raise ValueError("every layer needs at least one candidate, with as many damages as costs")
    smallest = float(sum(c.min() for c in costs))
    largest = float(sum(c.max() for c in costs))
    if budget < smallest:
        raise BudgetError(f"budget {budget:g} is below the smallest plan ({smallest:g})", smallest, largest)
    return smallest, largest


def _total(costs, damages, indices) -> Choice:
    return Choice(tuple(int(i) for i in indices), float(sum(c[i] for c, i in zip(costs, indices))),
                  float(sum(d[i] for d, i in zip(damages, indices))))


def solve_dp(
    costs: list[np.ndarray], damages: list[np.ndarray], budget: float, resolution: int = DEFAULT_RESOLUTION
) -> Choice:
    """Least total damage with total cost <= budget; `costs[l][k]`, `damages[l][k]` for layer l, candidate k.

    Raises BudgetError when even the cheapest candidate of every layer costs more than `budget`.
    """
    _check(costs, damages, budget)
    unit = budget / resolution
    units = [np.ceil(np.asarray(c, dtype=np.float64) / unit - 1e-9).astype(np.int64) for c in costs]
    best = np.zeros(resolution + 1)  # best[c]: least damage within c units (layers so far)
    picks = np.empty((len(costs), resolution + 1), dtype=np.int16)
    for layer, (weight, damage) in enumerate(zip(units, damages)):
        new = np.full(resolution + 1, np.inf)
        pick = picks[layer]
        for k, (w, d) in enumerate(zip(weight, np.asarray(damage, dtype=np.float64))):
            if w > resolution:
                continue
            shifted = np.full(resolution + 1, np.inf)
            shifted[w:] = best[: resolution + 1 - w] + d
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = k
        best = new
    if not np.isfinite(best[-1]):
        # Feasible in real costs (checked above) but not after rounding up: the cheapest plan fits.
        return _total(costs, damages, [int(np.argmin(c)) for c in costs])
    indices = []
    capacity = resolution
    for layer in range(len(costs) - 1, -1, -1):
        k = int(picks[layer][capacity])
        indices.append(k)
        capacity -= int(units[layer][k])
    return _total(costs, damages, indices[::-1])


def solve_milp(costs: list[np.ndarray], damages: list[np.ndarray], budget: float) -> Choice:
    """The exact optimum as a 0/1 integer program (one binary per layer and candidate)."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise ValueError("the milp allocator needs scipy (pip install scipy); or use the dp allocator") from None

    _check(costs, damages, budget)
    sizes = [len(c) for c in costs]
    n = sum(sizes)
    one_each = np.zeros((len(costs), n))
    offset = 0
    for layer, size in enumerate(sizes):
        one_each[layer, offset : offset + size] = 1
        offset += size
    flat_cost = np.concatenate(costs).astype(np.float64)
    # Costs are scaled to ~1 so that the solver's feasibility tolerance is relative to the budget.
    scale = 1.0 / budget
    result = milp(
        c=np.concatenate(damages).astype(np.float64),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(flat_cost[None] * scale, -np.inf, 1.0)],
    )
    if result.x is None:
        raise BudgetError(f"no plan within budget {budget:g} ({result.message})")
    chosen = np.round(result.x).astype(bool)
    indices, offset = [], 0
    for size in sizes:
        indices.append(int(np.flatnonzero(chosen[offset : offset + size])[0]))
        offset += size
    return _total(costs, damages, indices)


__all__ = ["BudgetError", "Choice", "DEFAULT_RESOLUTION", "solve_dp", "solve_milp"]
