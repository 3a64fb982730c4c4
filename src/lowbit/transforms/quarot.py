"""`hadamard` and `quarot`: QuaRot's randomized Hadamard rotation of the residual stream, folded in.

`hadamard` is the offline part alone: norms folded, embeddings / readers / writers rotated by one
Q = H·diag(±1), and (by default) each value head and o_proj's matching input by a head_dim
Hadamard. The result is an ordinary model that any engine loads. `quarot` adds QuaRot's online
Hadamard before down_proj (transforms.online): down_proj's input loses its outliers too, at the
cost of a small run-time rotation that lowbit's loader restores from the export's metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.models.architectures import Architecture
from lowbit.transforms.model import LayerFormats, ModelTransform, register_model_transform
from lowbit.transforms.rotate import fold_rotation, initial_rotations, prepare

logger = logging.getLogger(__name__)


@register_model_transform
@dataclass
class HadamardRotation(ModelTransform):
    """Randomized Hadamard rotation of the residual stream (seeded signs), and of the value heads."""

    name: ClassVar[str] = "hadamard"

    seed: int = 0
    heads: bool = True
    online: bool = False

    def apply(self, model: nn.Module, architecture: Architecture, formats: LayerFormats,
              calibration: torch.Tensor | None) -> None:
        prepare(model, architecture)
        residual, head, notes = initial_rotations(model, architecture, self.seed, self.heads)
        logger.info("%s rotation: %s", self.name, "; ".join(notes))
        fold_rotation(model, architecture, residual, head, online_hadamard=self.online)


@register_model_transform
@dataclass
class QuaRot(HadamardRotation):
    """`hadamard` plus the online Hadamard before down_proj."""

    name: ClassVar[str] = "quarot"

    online: bool = True
