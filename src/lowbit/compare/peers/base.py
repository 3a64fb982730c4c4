"""The contract a peer tool follows in `lowbit compare`, and the registry the CLI reads.

A peer quantizes the same model on the same calibration tokens with its own public API and hands
back dense (quantize-dequantized) weights; lowbit then loads them into a copy of the original and
scores it with the same evaluation as its own cells, so the comparison differs only in the method.
A peer that is not installed, or that cannot express a scheme, says why and is skipped, never
imitated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from lowbit.compare.grid import Scheme


class PeerError(RuntimeError):
    """A peer tool that ran but failed; the message is one line with what it reported."""


@dataclass
class PeerJob:
    """Everything a peer needs for one cell; `model` is the original and must not be modified."""

    model: nn.Module
    tokenizer: Any
    scheme: Scheme
    linear_names: list[str]
    """The decoder linears lowbit quantizes: every tool quantizes exactly these."""
    calibration: torch.Tensor | None
    workdir: Path
    """A folder of its own for this cell: logs and reports the tool writes stay there."""
    saved_model: Callable[[], Path]
    """Folder holding the original saved with save_pretrained (written once, on first call)."""


@dataclass
class PeerResult:
    state: dict[str, torch.Tensor]
    """Tensors to load into a copy of the original: the quantized linears' dense weights, plus any
    other tensor the tool changed (AWQ rescales norms)."""
    bits_per_weight: float
    seconds: float
    """Time of the tool's quantization call only (loading and saving excluded)."""
    version: str
    settings: dict[str, Any] = field(default_factory=dict)


class Peer(ABC):
    name: ClassVar[str]
    tool: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    @abstractmethod
    def unavailable(self) -> str | None:
        """Why this peer cannot run here (not installed, no environment), or None when it can."""

    @abstractmethod
    def unsupported(self, scheme: Scheme) -> str | None:
        """Why this peer cannot express `scheme`, or None."""

    @abstractmethod
    def settings(self, scheme: Scheme) -> dict[str, Any]:
        """What this peer runs for `scheme`: part of the cell's cache key and of the report."""

    @abstractmethod
    def quantize(self, job: PeerJob) -> PeerResult:
        """Quantize job.model's linears into job.scheme with the tool's own API."""


PEERS: dict[str, type[Peer]] = {}
ALIASES: dict[str, list[str]] = {}

P = TypeVar("P", bound=type[Peer])


def register_peer(cls: P) -> P:
    """Class decorator: make a peer reachable by name (`--peers NAME`)."""
    PEERS[cls.name] = cls
    return cls


def expand_peer_names(names: list[str]) -> list[str]:
    """Resolve aliases (`llmcompressor` = its GPTQ and AWQ) and refuse unknown names."""
    expanded: list[str] = []
    for name in names:
        for peer in ALIASES.get(name, [name]):
            if peer not in PEERS:
                known = sorted([*PEERS, *ALIASES])
                raise ValueError(f"unknown peer {name!r}; available: {', '.join(known)}")
            if peer not in expanded:
                expanded.append(peer)
    return expanded


def integer_bits_per_weight(shapes: list[torch.Size], scheme: Scheme, scale_bits: int = 16,
                            zero_bits: int | None = None) -> float:
    """Average storage per weight of integer codes with one scale (and zero point) per group.

    `zero_bits` defaults to the code width (compressed-tensors packs zero points like codes).
    """
    total_bits = count = 0.0
    for rows, columns in shapes:
        group = columns if scheme.group_size == -1 else scheme.group_size
        groups = rows * -(-columns // group)
        params = scale_bits + (0 if scheme.symmetric else (scheme.bits if zero_bits is None else zero_bits))
        total_bits += rows * columns * scheme.bits + groups * params
        count += rows * columns
    return total_bits / count
