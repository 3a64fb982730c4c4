"""Range search: shrink each row's min/max to the ratio that minimises the rounding error.

Min/max ranges waste grid points on rare outliers; a grid search over shrink ratios with an
lp error (p = 2.4 as in the GPTQ reference code) trades a little clipping for finer steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import FormatError, GroupParams
from lowbit.formats.integer import IntegerFormat


@dataclass(frozen=True)
class ClipSearch:
    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4

    def fit(self, fmt: IntegerFormat, w: torch.Tensor) -> GroupParams:
        """The parameters, among `grid * max_shrink` shrink ratios, with the least lp error per row."""
        if not fmt.clippable:
            raise FormatError(f"the clipping search does not apply to {fmt.name} weights (their parameters are "
                              "fitted in closed form); drop --clip-search")
        w = w.float()
        best = fmt.fit(w)
        best_err = self._error(fmt, w, best)
        for step in range(1, int(self.max_shrink * self.grid)):
            ratio = 1.0 - step / self.grid
            candidate = fmt.fit(w, clip=ratio)
            err = self._error(fmt, w, candidate)
            better = err < best_err
            if not better.any():
                continue
            best_err = torch.where(better, err, best_err)
            best = GroupParams(
                scale=torch.where(better, candidate.scale, best.scale),
                zero=None if best.zero is None else torch.where(better, candidate.zero, best.zero),
            )
        return best

    def _error(self, fmt: IntegerFormat, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        err = (fmt.round_trip(w, params) - w).abs_().pow_(self.norm)
        if fmt.per_tensor:
            return err.sum().reshape(1, 1)
        return err.sum(dim=1, keepdim=True)
