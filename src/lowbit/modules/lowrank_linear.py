"""A linear layer with a low-rank side branch: y = x·Wᵀ + (x·Aᵀ)·Bᵀ (+ bias).

How an EoRA-corrected layer runs after loading: the quantized weight stays as it is stored and
the correction costs two thin matmuls (r · (in + out) per token) instead of being merged into W,
which would undo the quantized weight's storage."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.base import LowRankCorrection


class LowRankCorrectedLinear(nn.Module):
    """Wraps `linear` (its weight: the dequantized, uncorrected matrix) with factors A [r, in], B [out, r]."""

    def __init__(self, linear: nn.Linear, correction: LowRankCorrection) -> None:
        super().__init__()
        self.linear = linear
        weight = linear.weight
        self.lowrank_a = nn.Parameter(correction.a.to(weight.device, weight.dtype), requires_grad=False)
        self.lowrank_b = nn.Parameter(correction.b.to(weight.device, weight.dtype), requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.lowrank_a.T) @ self.lowrank_b.T


def attach_lowrank(model: nn.Module, name: str, correction: LowRankCorrection) -> None:
    """Replace the linear `name` of `model` by a LowRankCorrectedLinear around it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name} is a {type(linear).__name__}, not a linear layer")
    setattr(parent, child, LowRankCorrectedLinear(linear, correction))
