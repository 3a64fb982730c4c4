"""AWQ (Lin et al., 2023): activation-aware channel scales, folded into the module before each group.

Rounding error hurts a weight in proportion to the input it multiplies. AWQ multiplies the input
columns of a shared-input group by per-channel scales s (and divides the producer of that input,
a norm or a linear's output rows, by s, so the full-precision function is unchanged): columns of
busy channels grow, their rounding error shrinks relative to their size, and the error divided
back by s on the input side is smaller where x is large. s = mean|x|^α, normalised so that
max(s) · min(s) = 1, with α searched on a grid of `grid` points in [0, 1): the α whose rounded
weights give the least output error on the calibration inputs wins. α = 0 is plain rounding, so
the search can only help on the calibration data.

Output error is tr((W - Ŵ) H (W - Ŵ)ᵀ) with H the group's input second moment (2/n Σ x xᵀ over
every calibration token), summed over the group's members: the exact mean squared output error
of the linears, at a cost independent of the number of tokens. Weights are rounded to nearest on
each member's target format, as AutoAWQ does; the search does not see what a later solver (the
`awq` method's clip search, or GPTQ) will do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.formats.base import quantize_matrix
from lowbit.solvers.gptq import layer_output_error
from lowbit.transforms.base import BlockTransform, SharedInput, register_transform

MIN_MAGNITUDE = 1e-4
"""Floor of mean|x| before the power: a silent channel must not get a zero (or huge) scale."""


def channel_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean|x|^α, normalised so that its largest and smallest values multiply to 1."""
    scales = mean_abs.float().clamp(min=MIN_MAGNITUDE).pow(alpha)
    return scales / (scales.max() * scales.min()).sqrt()


def can_absorb(group: SharedInput) -> bool:
    """True when the group's input producer can take a per-channel factor exactly: a norm with one
    weight per channel, or a linear with one output row per channel (not v_proj under GQA)."""
    source = group.source
    if isinstance(source, nn.Linear):
        return source.out_features == group.features
    weight = getattr(source, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 1 and weight.numel() == group.features


def scaled_output_error(group: SharedInput, scales: torch.Tensor) -> float:
    """Output error of the group's quantized members when their columns are scaled by `scales`
    before rounding (and the input divided by them)."""
    hessian = group.hessian.float()
    error = 0.0
    for member, fmt in zip(group.members, group.formats):
        if fmt is None:
            continue
        w = member.weight.detach().float()
        w_hat = quantize_matrix(fmt, w * scales).dequantize() / scales
        error += layer_output_error(w, w_hat, hessian)
    return error


def search_scales(group: SharedInput, grid: int) -> tuple[torch.Tensor, float, list[float]]:
    """The scales with the least output error among α = 0, 1/grid, ..., (grid-1)/grid; also the
    chosen α and the error of every α (for tests and logs)."""
    mean_abs = group.mean_abs.to(group.members[0].weight.device)
    errors = [scaled_output_error(group, channel_scales(mean_abs, step / grid)) for step in range(grid)]
    best = min(range(grid), key=errors.__getitem__)
    return channel_scales(mean_abs, best / grid), best / grid, errors


@torch.no_grad()
def fold_scales(group: SharedInput, scales: torch.Tensor) -> None:
    """Multiply the members' input columns by `scales` and divide the source's output by them.

    Computed in float32 and stored back in each tensor's dtype, so a low-precision model is rounded
    once per tensor.
    """
    for member in group.members:
        member.weight.data = (member.weight.float() * scales).to(member.weight.dtype)
    source = group.source
    divisor = scales[:, None] if isinstance(source, nn.Linear) else scales
    source.weight.data = (source.weight.float() / divisor).to(source.weight.dtype)
    bias = getattr(source, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = (bias.float() / scales).to(bias.dtype)


@register_transform
@dataclass
class AWQ(BlockTransform):
    """AWQ scale search and folding for every group whose input producer can absorb a scale."""

    name: ClassVar[str] = "awq"

    grid: int = 20

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")

    def apply(self, groups: list[SharedInput]) -> None:
        for group in groups:
            if any(fmt is not None for fmt in group.formats) and can_absorb(group):
                scales, _, _ = search_scales(group, self.grid)
                fold_scales(group, scales)
