"""From a damage table and a budget to a per-layer plan, and from a plan to a replayable recipe."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from lowbit.budget.allocate import BudgetError, solve_dp, solve_milp
from lowbit.budget.candidates import Candidate
from lowbit.budget.sensitivity import SensitivityTable
from lowbit.budget.size import linear_bits
from lowbit.recipes.recipe import Recipe

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in "6GB", "500MB", "1.5GiB" or "123456" (decimal units are powers of 10, *iB of 2)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 6GB, 500MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(count: float) -> str:
    """Bytes in the largest decimal unit that keeps the number >= 1, with enough digits to compare budgets."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3f} {unit}"
    return f"{count:.0f} B"


@dataclass(frozen=True)
class Budget:
    """Either bits per weight over the planned linears, or bytes of all tensors of the checkpoint."""

    target_bits: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.target_bits is None) == (self.max_bytes is None):
            raise ValueError("give exactly one of a target in bits per weight and a maximum size")
        if self.target_bits is not None and self.target_bits <= 0:
            raise ValueError(f"target bits per weight must be positive, got {self.target_bits}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"maximum size must be positive, got {self.max_bytes} bytes")

    def describe(self) -> str:
        if self.target_bits is not None:
            return f"{self.target_bits:g} bits/weight"
        return format_bytes(self.max_bytes)

    def capacity_bits(self, weights: int, dense_bytes: int) -> float:
        """Bits the planned linears may take: the target times their weights, or what the size
        limit leaves after the tensors that stay unquantized (`dense_bytes`)."""
        if self.target_bits is not None:
            return self.target_bits * weights
        return (self.max_bytes - dense_bytes) * 8


@dataclass(frozen=True)
class LayerChoice:
    name: str
    shape: tuple[int, int]
    candidate: Candidate
    bits: float
    """Bits of this layer's weight in the chosen format (scales and zero points included)."""
    damage: float


@dataclass
class BudgetPlan:
    """The chosen candidate of every planned layer and what it adds up to."""

    budget: Budget
    layers: list[LayerChoice]
    dense_bytes: int
    """Bytes of the tensors left unquantized (embeddings, norms, head)."""
    weighting: str
    measured_kl: dict[str, float] | None = None
    """Set by the evolutionary refinement: KL on its fitness windows of the start and final plans."""

    @property
    def weights(self) -> int:
        return sum(c.shape[0] * c.shape[1] for c in self.layers)

    @property
    def linear_bits(self) -> float:
        return sum(c.bits for c in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return self.linear_bits / self.weights

    @property
    def total_bytes(self) -> float:
        """Predicted bytes of all tensors of the checkpoint (headers, config and tokenizer excluded)."""
        return self.linear_bits / 8 + self.dense_bytes

    @property
    def damage(self) -> float:
        return sum(c.damage for c in self.layers)

    def recipe(self, base: Recipe) -> Recipe:
        """`base` (scale dtype, ignore list, solver options) with this plan as per-layer overrides.

        The most common choice becomes the recipe's own setting; every other layer gets an override
        naming it exactly, so the recipe replays this plan and nothing else.
        """
        common = Counter(c.candidate for c in self.layers).most_common(1)[0][0]

        def options(method: str) -> dict:
            return dict(base.method_options) if method == base.method else {}

        recipe = base.model_copy(update={
            "method": common.method, "bits": common.bits, "group_size": common.group_size,
            "symmetric": common.symmetric, "method_options": options(common.method), "overrides": [],
        })
        overrides = [
            choice.candidate.override(_exact(choice.name)).model_copy(
                update={"method_options": options(choice.candidate.method)}
                if choice.candidate.method != common.method else {})
            for choice in self.layers if choice.candidate != common
        ]
        return recipe.model_copy(update={"overrides": overrides})


def _exact(name: str) -> str:
    """A pattern that matches `name` only (glob metacharacters escaped)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def choose_plan(
    table: SensitivityTable,
    candidates: list[Candidate],
    budget: Budget,
    dense_bytes: int,
    scale_dtype: str = "float16",
    solver: str = "dp",
) -> BudgetPlan:
    """The plan of least estimated damage within `budget` (`solver`: "dp" or "milp")."""
    options: list[list[Candidate]] = []
    costs, damages = [], []
    for name in table.layers:
        rows, columns = table.shapes[name]
        usable = [c for c in candidates if c.key in table.damage[name]]
        if not usable:
            raise BudgetError(f"{name}: no candidate fits a layer of {columns} inputs; add a group size that divides it")
        options.append(usable)
        costs.append(np.array([linear_bits(c.format(scale_dtype), rows, columns) for c in usable]))
        damages.append(np.array([table.damage[name][c.key] for c in usable]))
    weights = sum(rows * columns for rows, columns in table.shapes.values())
    capacity = budget.capacity_bits(weights, dense_bytes)
    if budget.target_bits is not None:
        describe = lambda bits: f"{bits / weights:.3f} bits/weight"  # noqa: E731
    else:
        describe = lambda bits: format_bytes(bits / 8 + dense_bytes)  # noqa: E731
    smallest = float(sum(c.min() for c in costs))
    largest = float(sum(c.max() for c in costs))
    if capacity < smallest:
        raise BudgetError(
            f"a budget of {budget.describe()} is below the smallest plan these candidates allow "
            f"({describe(smallest)}); choose a budget between {describe(smallest)} and {describe(largest)} "
            "(or add lower-bit candidates)",
            smallest, largest,
        )
    capacity = min(capacity, largest)  # a larger budget buys nothing more; keeps the DP's units fine
    choice = (solve_dp if solver == "dp" else solve_milp)(costs, damages, capacity)
    layers = [
        LayerChoice(name, table.shapes[name], opts[k], float(cost[k]), float(damage[k]))
        for name, opts, k, cost, damage in zip(table.layers, options, choice.indices, costs, damages)
    ]
    return BudgetPlan(budget, layers, dense_bytes, table.weighting)
