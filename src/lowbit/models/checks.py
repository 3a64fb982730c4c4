"""Checks on a model that should fail in seconds, before hours of quantization start."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from lowbit.models.architectures import UnsupportedModelError, supported_model_types
from lowbit.models.loading import ModelSourceError


CHECK_SLICE = 1 << 22
"""Elements checked at a time for NaN/Inf."""


class NonFiniteWeightsError(ValueError):
    """A weight of the model is NaN or infinite; the message names it."""


def check_folder_architecture(source: str | None) -> None:
    """Refuse a local model folder whose config names an architecture lowbit cannot walk, by
    reading config.json only (loading a large model first would take minutes to say the same)."""
    if source is None:
        return
    config_path = Path(source).expanduser() / "config.json"
    if not config_path.is_file():
        return
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelSourceError(f"{config_path} is not a readable JSON config: {error}") from None
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        )


def check_finite_weights(tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN/Inf in any floating-point tensor: they would poison every scale of their group
    (or, in a norm or embedding, every output), and the result would only show up as NaN later."""
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        flat = tensor.reshape(-1)
        # In slices: a mask of the whole tensor would cost as much memory as a streamed block.
        bad = sum(int((~torch.isfinite(flat[start : start + CHECK_SLICE])).sum())
                  for start in range(0, flat.numel(), CHECK_SLICE))
        if bad:
            raise NonFiniteWeightsError(
                f"{name} contains {bad} NaN/Inf value(s); the checkpoint is damaged or overflowed its dtype: "
                "re-export it, or choose a --dtype that holds its values"
            )
