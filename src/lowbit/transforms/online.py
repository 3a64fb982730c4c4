"""Online Hadamard rotations: a fixed orthogonal matrix applied to a linear's input at run time.

The MLP's down projection reads the product gate · up, whose outlier channels no offline rotation
reaches (the SiLU between them is not linear). QuaRot multiplies that input by a Hadamard matrix H
at run time and stores down_proj's weight as W·H, so that the two cancel: (x H)(W H)ᵀ = x Wᵀ.
The weight's input columns are then mixed too, which is what makes it easier to quantize.

The rotation lives in a child module `online_hadamard` of the linear, applied by a forward pre-hook;
it has no parameters (its factors are non-persistent buffers), so the state dict is an ordinary
model's, and exports record the rotated layers in their metadata (`describe` / `restore`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.transforms.hadamard import HadamardFactors, hadamard_factors, sylvester

ONLINE_ATTRIBUTE = "online_hadamard"
METADATA_KEY = "online_hadamard"
"""The key of lowbit.json's metadata that lists the layers with an online Hadamard."""


class OnlineHadamard(nn.Module):
    """x -> x · kron(A, B) / √n, computed as Aᵀ X B on x viewed as [..., a, b]: O(n (a + b)) per row."""

    def __init__(self, factors: HadamardFactors) -> None:
        super().__init__()
        self.register_buffer("base", factors.base.float(), persistent=False)
        self.register_buffer("power", sylvester(factors.power).float(), persistent=False)
        self.order = factors.order
        self.construction = factors.construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.base.shape[0], self.power.shape[0]
        grid = x.float().reshape(*x.shape[:-1], a, b)
        rotated = self.base.T @ grid @ self.power / math.sqrt(self.order)
        return rotated.reshape(x.shape).to(x.dtype)


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, ONLINE_ATTRIBUTE)(args[0]), *args[1:])


def online_factors(order: int) -> HadamardFactors:
    """The Hadamard factors an online rotation of width `order` uses; one clear error if none exists."""
    factors = hadamard_factors(order)
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix of order {order} is known (it must be 2^k times a Paley order such as 12, 20, 28, "
            "36); use a rotation without the online Hadamard (--transform hadamard)"
        )
    return factors


def attach(linear: nn.Linear) -> None:
    """Give `linear` an online Hadamard on its input; its weight must already be stored as W·H."""
    if has_online_hadamard(linear):
        raise ValueError("this linear already has an online Hadamard")
    linear.add_module(ONLINE_ATTRIBUTE, OnlineHadamard(online_factors(linear.in_features)).to(linear.weight.device))
    linear.register_forward_pre_hook(_rotate_input)


def has_online_hadamard(module: nn.Module) -> bool:
    return isinstance(getattr(module, ONLINE_ATTRIBUTE, None), OnlineHadamard)


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """The layers of `model` with an online Hadamard, as JSON-ready data for an export's metadata."""
    return [
        {"module": name, "order": module.in_features, "construction": getattr(module, ONLINE_ATTRIBUTE).construction}
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and has_online_hadamard(module)
    ]


def restore(model: nn.Module, layers: list[dict[str, Any]]) -> None:
    """Re-attach the online Hadamards that `describe` recorded, to a model loaded from an export."""
    for layer in layers:
        linear = model.get_submodule(layer["module"])
        factors = online_factors(linear.in_features)
        if factors.construction != layer["construction"]:
            raise ValueError(
                f"{layer['module']} was exported with the Hadamard {layer['construction']}, this lowbit builds "
                f"{factors.construction}; load it with the lowbit version that wrote it"
            )
        attach(linear)
