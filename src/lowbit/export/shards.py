"""Safetensors shards written while tensors arrive, named the way transformers and vLLM look for them.

Tensors are buffered until the next one would push the buffer past the shard limit, then written,
so memory holds at most about one shard. The final names (`model-00001-of-00003.safetensors`)
need the shard count, which is only known at the end: shards are written under provisional names
and renamed by `finish`, which also writes `model.safetensors.index.json` (or leaves a single
`model.safetensors` when everything fit in one shard). `ShardedTensors` reads them back by name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.export.errors import ExportError

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with I/O failures raised as OSError (errno set, e.g. ENOSPC for a
    full disk) rather than the library's own exception, so callers can say what to do."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from error


class ShardedSafetensors:
    """Writes named tensors into size-limited safetensors files inside `folder`."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ExportError(f"shard size limit must be positive, got {max_shard_bytes}")
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.names: set[str] = set()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; it must be a CPU tensor that nothing else will modify."""
        if name in self.names:
            raise ExportError(f"tensor {name!r} was added twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self.names.add(name)
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self._total_bytes += size

    def finish(self) -> None:
        """Write what is buffered and give every shard its final name."""
        if self._buffer or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            self._written[0][0].rename(self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for number, (path, names) in enumerate(self._written, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _flush(self) -> None:
        path = self.folder / f"partial-{len(self._written) + 1:05d}.safetensors"
        save_safetensors(self._buffer, path, metadata={"format": "pt"})
        self._written.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0


class ShardedTensors:
    """An export's tensors by name, each read when asked for, from shards opened once (a context
    manager: they close at its end)."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX_FILE
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_FILE]
        self._handles = ExitStack()
        self._file = {}
        for file in files:
            handle = self._handles.enter_context(safe_open(str(folder / file), "pt"))
            self._file.update({name: handle for name in handle.keys()})

    def __enter__(self) -> "ShardedTensors":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.close()

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file[name].get_tensor(name)

    def get(self, name: str) -> torch.Tensor | None:
        return self[name] if name in self else None
