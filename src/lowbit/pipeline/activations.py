"""Block-boundary activations on disk: the inputs of the next block, one raw file per batch.

Two users share this layout. Resume keeps the inputs of the first unfinished block, so that a
restarted run continues exactly where the killed one stopped. Spilling (`--offload-activations`)
keeps calibration activations that do not fit in memory on disk and maps them back page by page.
A folder is written under a temporary name and renamed once every file is on disk, so a folder
that exists under its final name is complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from lowbit.pipeline.atomic import commit, fsync_path

INDEX = "index.json"
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16)}


class ActivationError(ValueError):
    """Saved activations that cannot be read back; the message says what to do."""


def _batch_file(folder: Path, number: int) -> Path:
    return folder / f"batch-{number:05d}.bin"


def write_tensor(path: Path, tensor: torch.Tensor) -> None:
    """Raw bytes of `tensor` (any dtype), fsync'ed."""
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    with open(path, "wb") as file:
        data.tofile(file)


def map_tensor(path: Path, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A read-only view of a raw file: pages are read from disk when touched, not up front."""
    count = 1
    for size in shape:
        count *= size
    expected = count * torch.empty((), dtype=dtype).element_size()
    actual = path.stat().st_size
    if actual != expected:
        raise ActivationError(f"{path} holds {actual} bytes, expected {expected}; the saved state is damaged")
    return torch.from_file(str(path), shared=False, size=count, dtype=dtype).view(*shape)


def _describe(tensors: Sequence[torch.Tensor]) -> list[dict]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in tensors]


def save_activations(folder: Path, tensors: Sequence[torch.Tensor]) -> None:
    """Write `tensors` into `folder` atomically (a previous folder of that name is replaced)."""
    temp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    for number, tensor in enumerate(tensors):
        write_tensor(_batch_file(temp, number), tensor)
    seal(temp, folder, _describe(tensors))


def seal(temp: Path, folder: Path, description: list[dict]) -> None:
    """Make the batch files in `temp` the complete folder `folder`: index, fsync, rename."""
    (temp / INDEX).write_text(json.dumps(description) + "\n")
    for path in temp.iterdir():
        fsync_path(path)
    shutil.rmtree(folder, ignore_errors=True)
    commit(temp, folder)


def load_activations(folder: Path) -> list[torch.Tensor]:
    """Memory-mapped tensors of a folder written by `save_activations` or `SpilledActivations`."""
    try:
        description = json.loads((folder / INDEX).read_text())
        return [
            map_tensor(_batch_file(folder, number), entry["shape"], _DTYPES[entry["dtype"]])
            for number, entry in enumerate(description)
        ]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ActivationError(f"cannot read saved activations in {folder}: {error}") from None


class SpilledActivations:
    """Keeps each block's outputs on disk instead of in memory (`--offload-activations`).

    `keep` writes one batch's output and returns a memory-mapped view of it; the files of one
    block's outputs go into `<root>/block-NNNNN.tmp` until `seal_block` completes the folder.
    Only the inputs of the current block and the outputs being written exist at any time.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._current: Path | None = None
        self._written: list[torch.Tensor] = []

    def folder(self, block: int) -> Path:
        """Where the outputs of block `block - 1`, i.e. the inputs of `block`, end up."""
        return self.root / f"block-{block:05d}"

    def begin_block(self, index: int) -> None:
        """Outputs kept from now on are those of block `index` (the inputs of `index + 1`)."""
        self._current = self.folder(index + 1).with_name(self.folder(index + 1).name + ".tmp")
        shutil.rmtree(self._current, ignore_errors=True)
        self._current.mkdir(parents=True)
        self._written = []

    def keep(self, output: torch.Tensor) -> torch.Tensor:
        if self._current is None:
            raise RuntimeError("begin_block must be called before outputs are kept")
        path = _batch_file(self._current, len(self._written))
        write_tensor(path, output)
        mapped = map_tensor(path, output.shape, output.dtype)
        self._written.append(mapped)
        return mapped

    def seal_block(self, index: int) -> Path:
        """Complete the folder of block `index`'s outputs (its inputs' folder is left to `discard`)."""
        if self._current is None:
            raise RuntimeError("begin_block was not called")
        folder = self.folder(index + 1)
        seal(self._current, folder, _describe(self._written))
        self._current = None
        return folder

    def discard(self, block: int) -> None:
        """Remove the inputs of `block` once nothing needs them (open maps stay readable)."""
        shutil.rmtree(self.folder(block), ignore_errors=True)

    # BlockHooks: used directly when no checkpoint owns the folders.
    def before_block(self, index: int, block: object) -> None:
        self.begin_block(index)

    def after_block(self, index: int, block: object, outputs: object) -> None:
        self.seal_block(index)
        self.discard(index)
