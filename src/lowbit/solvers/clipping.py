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
    batch_elements: int | None = None
    """Elements scored per step (a stack of copies of the group, one per ratio); None: 2^24 on a GPU,
    one ratio per step on a CPU. On a GPU one ratio per step is ~80 rounds of small kernels per
    group, which costs far more in launches than in arithmetic; on a CPU it is as fast (measured)
    and needs no stack."""

    def fit(self, fmt: IntegerFormat, w: torch.Tensor) -> GroupParams:
        """The parameters, among `grid * max_shrink` shrink ratios, with the least lp error per row.

        Ties go to the larger ratio (the first in the order 1.0, 0.99, ...), as in a plain loop.
        """
        if not fmt.clippable:
            raise FormatError(f"the clipping search does not apply to {fmt.name} weights (their parameters are "
                              "fitted in closed form); drop --clip-search")
        w = w.float()
        ratios = torch.tensor([1.0 - step / self.grid for step in range(max(1, int(self.max_shrink * self.grid)))],
                              device=w.device)
        budget = self.batch_elements or (1 << 24 if w.device.type != "cpu" else 1)
        per_step = 1 if fmt.per_tensor else max(1, budget // max(w.numel(), 1))
        first, *rest = ratios.split(per_step)
        best, best_err = self._best_of(fmt, w, first)
        for chunk in rest:
            params, err = self._best_of(fmt, w, chunk)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = GroupParams(
                scale=torch.where(better, params.scale, best.scale),
                zero=None if best.zero is None else torch.where(better, params.zero, best.zero),
            )
        return best

    def _best_of(self, fmt: IntegerFormat, w: torch.Tensor, ratios: torch.Tensor) -> tuple[GroupParams, torch.Tensor]:
        """Fit `w` once per ratio (stacked copies) and keep, per row, the ratio with the least error."""
        n, rows = ratios.numel(), w.shape[0]
        stacked = w.repeat(n, 1)
        params = fmt.fit(stacked, ratios.repeat_interleave(rows)[:, None])
        err = self._error(fmt, stacked, params).view(n, -1)
        pick = err.argmin(dim=0)
        kept = torch.arange(err.shape[1], device=w.device)

        def chosen(values: torch.Tensor) -> torch.Tensor:
            return values.reshape(n, err.shape[1], -1)[pick, kept]

        return (GroupParams(scale=chosen(params.scale), zero=None if params.zero is None else chosen(params.zero)),
                err[pick, kept][:, None])

    def _error(self, fmt: IntegerFormat, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        err = (fmt.round_trip(w, params) - w).abs_().pow_(self.norm)
        if fmt.per_tensor:
            return err.sum().reshape(1, 1)
        return err.sum(dim=1, keepdim=True)
