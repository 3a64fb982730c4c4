"""Evolutionary refinement of a budget plan, scored by the measured KL of the assembled model.

The knapsack adds estimated layer damages, but layer errors do not add up: two layers' errors can
compound or cancel. EvoPress (Sieberling et al., 2024) showed that a plain evolutionary search over
per-layer choices, scored by the real model's divergence from the original on a few calibration
windows, finds better allocations than any additive estimate. This module does that, starting from
the DP plan:

- every candidate of every layer is solved once, on the float Hessians, and kept compact (a
  `CandidateBank` of QuantizedWeights: ~1 byte per weight per candidate in memory);
- an offspring is the parent with a few random level switches: one layer moves to another
  candidate, and random layers move to cheaper candidates until the plan fits the budget again;
- each generation scores all offspring on one calibration window (cheap), re-scores the best few on
  every fitness window, and keeps the best of those and the parent (multi-fidelity selection, so
  most of the evaluation budget goes to promising plans).

The fitness windows are calibration windows (never evaluation text); the search runs for a fixed
number of generations, so its cost is known up front: generations x (offspring + survivors x windows)
forward passes of one window.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.budget.bank import CandidateBank, KLFitness
from lowbit.budget.candidates import Candidate
from lowbit.budget.plan import BudgetPlan, LayerChoice
from lowbit.budget.sensitivity import SensitivityTable
from lowbit.budget.size import linear_bits


@dataclass(frozen=True)
class EvolutionOptions:
    """How long and how widely to search. Defaults suit a 100M-parameter model on a CPU in minutes."""

    generations: int = 20
    offspring: int = 6
    survivors: int = 2
    fitness_windows: int = 4
    max_switches: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations < 1 or self.offspring < 1 or self.fitness_windows < 1:
            raise ValueError("evolution needs at least one generation, one offspring and one fitness window")
        if not 1 <= self.survivors <= self.offspring:
            raise ValueError(f"survivors must be between 1 and offspring ({self.offspring}), got {self.survivors}")
        if self.max_switches < 1:
            raise ValueError(f"max_switches must be >= 1, got {self.max_switches}")


def _mutate(
    parent: list[int], options: list[list[Candidate]], bits: list[list[float]], capacity: float,
    rng: random.Random, max_switches: int,
) -> list[int] | None:
    """The parent with 1..max_switches random level switches, repaired to fit `capacity` (None if it cannot)."""
    child = list(parent)
    for _ in range(rng.randint(1, max_switches)):
        layer = rng.randrange(len(child))
        others = [k for k in range(len(options[layer])) if k != child[layer]]
        if others:
            child[layer] = rng.choice(others)
    total = sum(b[k] for b, k in zip(bits, child))
    attempts = 0
    while total > capacity:
        attempts += 1
        if attempts > 10 * len(child):
            return None
        layer = rng.randrange(len(child))
        cheaper = [k for k in range(len(options[layer])) if bits[layer][k] < bits[layer][child[layer]]]
        if cheaper:
            k = rng.choice(cheaper)
            total += bits[layer][k] - bits[layer][child[layer]]
            child[layer] = k
    return child if child != parent else None


def evolve_plan(
    original: nn.Module,
    working: nn.Module,
    bank: CandidateBank,
    plan: BudgetPlan,
    table: SensitivityTable,
    candidates: list[Candidate],
    capacity_bits: float,
    fitness_windows: torch.Tensor,
    options: EvolutionOptions = EvolutionOptions(),
    scale_dtype: str = "float16",
    on_generation: Callable[[int, float], None] | None = None,
) -> BudgetPlan:
    """A plan within the same budget whose assembled model has a KL no larger than the DP plan's.

    `working` is a copy of `original` whose planned linears `bank` rewrites; `capacity_bits` is the
    budget in bits over the planned linears. `plan.layers` gives the starting choice. Returns the
    plan with the best measured KL on all fitness windows (the DP plan if no offspring beat it).
    """
    rng = random.Random(options.seed)
    names = [choice.name for choice in plan.layers]
    layer_options = [[c for c in candidates if c.key in table.damage[name]] for name in names]
    layer_bits = [[linear_bits(c.format(scale_dtype), *table.shapes[name]) for c in opts]
                  for name, opts in zip(names, layer_options)]
    current = [opts.index(choice.candidate) for opts, choice in zip(layer_options, plan.layers)]
    applied = [-1] * len(names)

    def assemble(choice: list[int]) -> None:
        for layer, (name, k) in enumerate(zip(names, choice)):
            if applied[layer] != k:
                bank.apply(working, name, layer_options[layer][k])
                applied[layer] = k

    fitness = KLFitness(original, fitness_windows[: options.fitness_windows])
    everything = fitness.windows.shape[0]
    assemble(current)
    best_kl = fitness(working, everything)
    start_kl = best_kl
    progress = tqdm(range(options.generations), desc="evolving the plan", unit="generation")
    for generation in progress:
        children = [c for c in (_mutate(current, layer_options, layer_bits, capacity_bits, rng, options.max_switches)
                                for _ in range(options.offspring)) if c is not None]
        scored = []
        for child in children:
            assemble(child)
            scored.append((fitness(working, 1), child))
        scored.sort(key=lambda pair: pair[0])
        for _, child in scored[: options.survivors]:
            assemble(child)
            kl = fitness(working, everything)
            if kl < best_kl:
                best_kl, current = kl, child
        progress.set_postfix(kl=f"{best_kl:.4f}", start=f"{start_kl:.4f}")
        if on_generation is not None:
            on_generation(generation, best_kl)
    assemble(current)
    layers = [
        LayerChoice(name, table.shapes[name], opts[k], bits[k], table.damage[name][opts[k].key])
        for name, opts, bits, k in zip(names, layer_options, layer_bits, current)
    ]
    return replace(plan, layers=layers, measured_kl={"start": start_kl, "final": best_kl,
                                                      "evaluations": fitness.calls})
