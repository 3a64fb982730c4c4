"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8 rounding.

A few input channels of an LLM's linears carry values 10-100x larger than the rest, on every token,
so a per-token activation scale is set by them and the other channels round to a handful of levels.
Dividing input channel j by s_j (folded into the norm or linear that produces the input, so the
full-precision function is unchanged) and multiplying the weights' column j by s_j flattens the
activations at the cost of the weights, which per-channel weight scales absorb better:

    s_j = max|X_j|^α / max|W_j|^(1-α)

with max|X_j| over every calibration token and max|W_j| over the column j of every member of the
group. α is searched on the grid 0, 1/grid, ..., 1, and "no smoothing" (s = 1) is a candidate too,
so the search cannot make the calibration error worse: the winner has the least squared output
error of the group's members on sampled calibration inputs, with the weights rounded to nearest
on their formats *and* the inputs rounded to the recipe's activation format (per token, or per
tensor with a scale from the sampled maximum). Unlike AWQ's error this is not a function of the
Hessian (activation rounding depends on each token), hence the samples (SharedInput.samples).

Folding reuses AWQ's (`transforms.awq.fold_scales`): into the input norm for q/k/v and gate/up,
into v_proj's rows for o_proj when every o_proj input channel has its own v_proj row (no grouped-
query attention), into up_proj's rows for down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.base import quantize_matrix
from lowbit.transforms.awq import can_absorb, fold_scales
from lowbit.transforms.base import BlockTransform, SharedInput, register_transform

MIN_MAGNITUDE = 1e-5
"""Floor of max|X_j| and max|W_j| before the powers: a silent channel gets a finite scale."""

MAX_ERROR_ROWS = 256
"""Output rows per member that the search scores, evenly strided, when the member's format rounds
rows independently: the error is a sum over rows, and scoring a sample of them keeps a search over
a 1536-row matrix from costing six full roundings per candidate."""


def scored_rows(member: torch.nn.Linear, fmt) -> torch.Tensor:
    """The member's weight rows the search scores (all of them unless the format allows sampling)."""
    weight = member.weight.detach().float()
    if fmt is not None and not fmt.rows_independent:
        return weight
    return weight[:: -(-weight.shape[0] // MAX_ERROR_ROWS)]


def smoothing_scales(max_x: torch.Tensor, max_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """max|X_j|^α / max|W_j|^(1-α), per input channel j."""
    max_x = max_x.float().clamp(min=MIN_MAGNITUDE)
    max_w = max_w.float().clamp(min=MIN_MAGNITUDE)
    return max_x.pow(alpha) / max_w.pow(1.0 - alpha)


def weight_column_max(group: SharedInput) -> torch.Tensor:
    """max|W_j| over the rows of every member (the weights that will absorb s_j)."""
    return torch.stack([member.weight.detach().float().abs().amax(dim=0) for member in group.members]).amax(dim=0)


def smoothed_output_error(
    group: SharedInput, scales: torch.Tensor, targets: list[torch.Tensor] | None = None
) -> float:
    """Mean squared output error over the sampled tokens, summed over members, when inputs are divided
    by `scales` and rounded to the group's activation format and columns are multiplied by them and
    rounded to each member's format (unquantized members keep exact weights), over the rows of
    `scored_rows`. `targets` are those rows' full-precision outputs on the samples, when the caller
    has them already."""
    x = group.samples.to(group.members[0].weight.device)
    if targets is None:
        targets = [x @ scored_rows(member, fmt).T for member, fmt in zip(group.members, group.formats)]
    smoothed = x / scales
    activations = group.activations
    if activations is not None:
        scale = None if activations.dynamic else activations.static_scale(smoothed.abs().max())
        smoothed = activations.fake_quantize(smoothed, scale)
    error = 0.0
    for member, fmt, target in zip(group.members, group.formats, targets):
        w_scaled = scored_rows(member, fmt) * scales
        w_hat = w_scaled if fmt is None else quantize_matrix(fmt, w_scaled).dequantize()
        error += float((smoothed @ w_hat.T - target).pow(2).sum()) / x.shape[0]
    return error


def search_smoothing(group: SharedInput, grid: int) -> tuple[torch.Tensor, float | None, dict[float | None, float]]:
    """The scales of least output error among no smoothing and α = 0, 1/grid, ..., 1; also the
    chosen α (None: no smoothing) and the error of every candidate (for tests and logs)."""
    if group.samples is None or group.max_abs is None:
        raise ValueError("SmoothQuant needs the group's input samples and max |x|; run it through the pipeline")
    device = group.members[0].weight.device
    max_x, max_w = group.max_abs.to(device), weight_column_max(group)
    candidates: dict[float | None, torch.Tensor] = {None: torch.ones_like(max_w)}
    candidates.update({step / grid: smoothing_scales(max_x, max_w, step / grid) for step in range(grid + 1)})
    x = group.samples.to(device)
    targets = [x @ scored_rows(member, fmt).T for member, fmt in zip(group.members, group.formats)]
    errors = {alpha: smoothed_output_error(group, scales, targets) for alpha, scales in candidates.items()}
    best = min(errors, key=errors.__getitem__)
    return candidates[best], best, errors


@register_transform
@dataclass
class SmoothQuant(BlockTransform):
    """SmoothQuant scales, α searched per group, folded where the input's producer can absorb them."""

    name: ClassVar[str] = "smoothquant"
    needs_input_samples: ClassVar[bool] = True

    grid: int = 5

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")

    def apply(self, groups: list[SharedInput]) -> None:
        for group in groups:
            if any(fmt is not None for fmt in group.formats) and can_absorb(group):
                scales, alpha, _ = search_smoothing(group, self.grid)
                if alpha is not None:
                    fold_scales(group, scales)
