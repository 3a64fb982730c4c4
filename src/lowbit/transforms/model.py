"""The contract of model transforms: function-preserving rewrites of the whole model, run once
before the block-by-block pipeline starts.

Some rewrites cannot be done one block at a time: a rotation of the residual stream (QuaRot,
SpinQuant) touches the embeddings, every block and the output head together, and a learned one
trains on the whole model's output. They run on the full-precision model after it is loaded and
before any block is solved, so every solver then sees (and quantizes) the rewritten weights.
Block transforms (transforms.base: AWQ) still run per block afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from torch import nn

from lowbit.formats.base import WeightFormat
from lowbit.models.architectures import Architecture

LayerFormats = Callable[[str, nn.Linear], WeightFormat | None]
"""The format each linear (by full name) will be quantized to, or None where it stays unquantized."""


class ModelTransform(ABC):
    """Rewrites a whole model in place, preserving its full-precision function."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def apply(self, model: nn.Module, architecture: Architecture, formats: LayerFormats,
              calibration: torch.Tensor | None) -> None:
        """Rewrite `model`; `calibration` ([samples, tokens] ids) is given when needs_calibration."""


MODEL_TRANSFORMS: dict[str, type[ModelTransform]] = {}

T = TypeVar("T", bound=type[ModelTransform])


def register_model_transform(cls: T) -> T:
    """Class decorator: make a model transform reachable by name (`--transform NAME`, recipes)."""
    MODEL_TRANSFORMS[cls.name] = cls
    return cls


def apply_model_transforms(transforms: list[ModelTransform], model: nn.Module, architecture: Architecture,
                           formats: LayerFormats, calibration: torch.Tensor | None) -> None:
    """Run `transforms` in order on the full-precision model, before any block is quantized."""
    for transform in transforms:
        if transform.needs_calibration and calibration is None:
            raise ValueError(f"the {transform.name} transform trains on calibration data; give it some (--calib)")
        transform.apply(model, architecture, formats, calibration)
