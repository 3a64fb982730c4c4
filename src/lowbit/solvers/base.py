"""The contract every solver follows and the registry that the CLI and recipes read."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import QuantizedWeight, WeightFormat


class Solver(ABC):
    """Chooses stored values for one weight matrix under a format.

    `needs_hessian` tells the pipeline whether calibration statistics must be collected for the
    layer; a solver without it runs with no calibration data at all. `rows_independent` says that
    each output row is solved on its own (given the shared statistics), so the pipeline may stack
    the matrices that read one input and solve them in one call: one factorisation of the shared
    Hessian and one pass of per-column work instead of one per matrix. `implied_transforms` names the
    block transforms a method is defined with (AWQ is its scale search followed by rounding), which
    a recipe applies before the solver. `export_problem`, when set, is why compressed-tensors cannot
    hold what the solver produces; exports are refused with it before any work starts.
    `format_families`, when set, are the only format families (formats.families) the solver can
    fill; recipes naming another are refused up front.
    """

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    rows_independent: ClassVar[bool] = False
    implied_transforms: ClassVar[tuple[str, ...]] = ()
    export_problem: ClassVar[str | None] = None
    format_families: ClassVar[tuple[str, ...] | None] = None

    @abstractmethod
    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        """Quantize `weight` ([out_features, in_features]) into `fmt`."""

    def solve_keeping(
        self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None, keep: torch.Tensor
    ) -> QuantizedWeight:
        """Quantize `weight` but store the entries where `keep` (bool, weight's shape) is True exactly,
        in the result's sparse part (dense-and-sparse: solvers.outliers).

        The default zeroes them for an ordinary solve and corrects them afterwards; a solver that
        spreads rounding error over other weights (GPTQ) overrides it so that kept weights cause none.
        """
        from lowbit.solvers.outliers import keep_by_zeroing

        return keep_by_zeroing(self, weight, fmt, stats, keep)


class WrappingSolver(Solver):
    """A solver that adds to another (`self.base`): what can be exported and which transforms the
    method implies are the wrapped solver's."""

    base: Solver

    @property
    def export_problem(self) -> str | None:  # type: ignore[override]
        return self.base.export_problem

    @property
    def implied_transforms(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.base.implied_transforms


SOLVERS: dict[str, type[Solver]] = {}

S = TypeVar("S", bound=type[Solver])


def register_solver(cls: S) -> S:
    """Class decorator: make a solver reachable by name (`--method NAME`, recipes)."""
    SOLVERS[cls.name] = cls
    return cls
