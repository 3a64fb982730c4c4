"""On-disk results of finished grid cells, so that a re-run skips them and a killed run resumes.

A cell's key is a hash of everything its numbers depend on: what was done (recipe, or peer and
scheme), to which model (a fingerprint of its weights and config), with which calibration tokens
(only for methods that read them) and on which evaluation windows and tasks. Change any of these
and the cell runs again; change nothing and it is read back. Each cell is one small JSON file,
written atomically, so a run killed at any moment leaves only complete cells behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

SAMPLED_ELEMENTS = 65536
"""Elements of each tensor hashed into a model fingerprint (an evenly strided sample)."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (calibration and evaluation tokens)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the config and of a strided sample of every tensor.

    Hashing every byte of a 70B model would take minutes per run; a sample of up to 65536 values
    per tensor, with names, shapes and dtypes, still tells apart any two checkpoints one would
    compare (a fine-tune moves every weight).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_ELEMENTS)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor_digest(flat[::step]).encode())
    return digest.hexdigest()


def cell_key(description: dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable description of a cell and its inputs."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class CellCache:
    """Finished cells as `<folder>/<key>.json`, written through a temporary file and a rename."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # cannot happen with atomic writes unless edited by hand; recompute it

    def put(self, key: str, record: dict[str, Any]) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as f:
                json.dump(record, f, indent=2)
            os.replace(temporary, self.path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
