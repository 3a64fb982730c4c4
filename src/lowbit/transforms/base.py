"""The contract of block transforms: function-preserving rewrites applied before a block is solved.

A transform (AWQ's channel scales, later SmoothQuant's) sees every shared-input group of a block
with statistics of that input on the calibration data, and may rewrite the block's weights so that
the full-precision block computes the same function while its weights quantize better. It runs on
the block's full-precision weights, before any of the block's groups is solved: a scale folded
into v_proj or up_proj (for o_proj or down_proj) must reach those linears before they are
quantized. The pipeline then collects the solvers' statistics from the rewritten block, so a
following solver (GPTQ) sees the rescaled inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import nn

from lowbit.formats.activation import ActivationFormat
from lowbit.formats.base import WeightFormat


@dataclass
class SharedInput:
    """One group of linears that read the same input, as a block transform sees it.

    `formats[i]` is the format `members[i]` will be quantized to, or None where the recipe leaves
    it unquantized (it must still be rewritten to keep the block's function). `source` is the
    module whose output is the input and which can absorb a per-channel scale (a norm, or a linear
    whose output rows are the channels), or None. `hessian` is 2/n Σ x xᵀ and `mean_abs` is
    mean |x| per channel, both over every calibration token of the full-precision block; `max_abs`
    is max |x| per channel over the same tokens. `activations` is the format the members' inputs
    will be rounded to at run time (None: weight-only). `samples` holds input rows spread evenly over
    the calibration tokens (at most `MAX_INPUT_SAMPLES`), for transforms whose error is not a
    function of the Hessian (rounded activations); None unless a transform asks for them.
    """

    names: tuple[str, ...]
    members: list[nn.Linear]
    formats: list[WeightFormat | None]
    source: nn.Module | None
    hessian: torch.Tensor
    mean_abs: torch.Tensor
    max_abs: torch.Tensor | None = None
    activations: ActivationFormat | None = None
    samples: torch.Tensor | None = None

    @property
    def features(self) -> int:
        return self.members[0].in_features


class BlockTransform(ABC):
    """Rewrites one block in place, preserving its full-precision function."""

    name: ClassVar[str]
    needs_input_samples: ClassVar[bool] = False
    """True when `apply` reads SharedInput.samples (the pipeline keeps input rows only then)."""

    @abstractmethod
    def apply(self, groups: list[SharedInput]) -> None:
        """Rewrite the weights of the groups' members and sources (in place)."""


MAX_INPUT_SAMPLES = 1024
"""Input rows kept per shared input for SharedInput.samples."""

TRANSFORMS: dict[str, type[BlockTransform]] = {}

T = TypeVar("T", bound=type[BlockTransform])


def register_transform(cls: T) -> T:
    """Class decorator: make a transform reachable by name (`--transform NAME`, recipes)."""
    TRANSFORMS[cls.name] = cls
    return cls
