"""Interrupted runs continue where they stopped: every finished block is committed to disk.

Beside the output folder NAME, a run keeps `.NAME.lowbit-run/`:

    lowbit-run.json              manifest: fingerprints, blocks done, `complete: false`
    blocks/block-00003.safetensors   the quantized layers of block 3 (codes, scales, zero points)
    activations/block-00004/     the inputs of the first unfinished block, one raw file per batch
    lock                         held (flock) by the process writing NAME

After each block, its layers and the next block's inputs are written under temporary names,
fsync'ed and renamed, and only then does the manifest (itself replaced atomically) count the
block as done; a kill -9 at any moment therefore leaves either the old or the new state, never a
mix. `--resume` checks that the recipe, the model, the calibration tokens and the settings
that change results hash to what the manifest recorded, replays the finished blocks into the
writer (in the order they were first produced, so the shards come out byte-identical), and
restarts the pipeline at the first unfinished block with its saved inputs.

Why the inputs are saved rather than recomputed by running the finished blocks again: the saved
tensors are exactly what the uninterrupted run fed the next block, whatever the thread count or
the GPU kernels' reduction order on the resuming machine, and resuming costs one read instead of
a forward pass through every finished block (which, for a model streamed from disk, would also
mean reading all of their weights again). The cost is one write of the activations per block.
With `--offload-activations` the spilled outputs are those very files, so nothing is written twice.

The folder is removed once the export is complete; `lowbit.json` in the export then says
`complete: true`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.export.load import RUN_MANIFEST
from lowbit.export.shards import save_safetensors
from lowbit.formats.base import QuantizedWeight
from lowbit.models.architectures import Architecture
from lowbit.pipeline.activations import ActivationError, SpilledActivations, load_activations, save_activations
from lowbit.pipeline.atomic import write_atomic, write_json_atomic
from lowbit.pipeline.sequential import LayerPlan, QuantizedCallback

MANIFEST = RUN_MANIFEST
RUN_FORMAT = "lowbit-run"
RUN_VERSION = 1
STALL_ENV = "LOWBIT_TEST_STALL_AFTER_BLOCK"
"""Testing aid: the block index after whose commit the run stops and sleeps, waiting to be killed."""


class ResumeError(ValueError):
    """A run that cannot start or continue as asked; the message says which flag to pass."""


def run_folder(out_dir: Path) -> Path:
    """The hidden sibling of `out_dir` that holds an unfinished run's state."""
    return out_dir.parent / f".{out_dir.name}.lowbit-run"


def describe_unfinished(folder: Path) -> str | None:
    """'k of N blocks' for an unfinished run folder, or None if `folder` holds none."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return f"{manifest['blocks_done']} of {manifest['blocks_total']} blocks"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tensor_digest(tensor: torch.Tensor | None) -> str:
    if tensor is None:
        return digest("none")
    flat = tensor.detach().to("cpu").contiguous()
    return digest(f"{flat.dtype}{list(flat.shape)}".encode() + flat.view(torch.uint8).numpy().tobytes())


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_identity(location: Path | None, config_json: str, name: str) -> str:
    """The model as far as a resumed run can tell cheaply: its config and the size and
    modification time of every weight file at `location` (a folder or a file; None for a hub id),
    as make and rsync judge files; hashing hundreds of gigabytes would take longer than many runs."""
    if location is None:
        paths: list[Path] = []
    elif location.is_dir():
        paths = [path for path in location.iterdir() if path.suffix in WEIGHT_SUFFIXES]
    else:
        paths = [location]
    files = sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in paths if path.is_file())
    return digest(json.dumps({"name": name, "config": config_json, "files": files}))


class RunCheckpoint:
    """The on-disk state of one run writing `out_dir`; also the pipeline's BlockHooks."""

    def __init__(self, out_dir: Path, folder: Path, lock: IO[str]) -> None:
        self.out_dir = out_dir
        self.folder = folder
        self._lock = lock
        self.manifest: dict[str, Any] = {}
        self.spill: SpilledActivations | None = None
        self._pending: dict[str, QuantizedWeight] = {}

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def claim(cls, out_dir: Path, *, resume: bool, overwrite: bool) -> RunCheckpoint:
        """Lock the run folder of `out_dir` before any work; refuse to silently drop an
        unfinished run (pass --resume to continue it, --overwrite to start over)."""
        folder = run_folder(out_dir)
        existed = folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / "lock", "a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ResumeError(f"another lowbit run is writing {out_dir} (it holds {folder / 'lock'}); wait for it") from None
        checkpoint = cls(out_dir, folder, lock)
        progress = describe_unfinished(folder) if existed else None
        if progress is not None and not resume and not overwrite:
            checkpoint.release()
            raise ResumeError(
                f"{out_dir} has an unfinished run ({progress} done, state in {folder}); "
                "pass --resume to continue it or --overwrite to start over"
            )
        if progress is None or not resume:
            checkpoint._clear()
        checkpoint._remove_stale_export_folders()
        return checkpoint

    def start(
        self, fingerprint: dict[str, str], blocks_total: int, *, offload_activations: bool = False
    ) -> int:
        """Check or record the run's fingerprint; returns the number of blocks already done."""
        manifest_path = self.folder / MANIFEST
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as error:
                raise ResumeError(f"{manifest_path} cannot be read ({error}); pass --overwrite to start over") from None
            changed = [key for key, value in fingerprint.items() if manifest.get("fingerprint", {}).get(key) != value]
            if changed or manifest.get("blocks_total") != blocks_total:
                what = ", ".join(changed) or "the number of blocks"
                raise ResumeError(
                    f"cannot resume {self.out_dir}: the {what} differ(s) from the interrupted run; "
                    "rerun with the same model, recipe and calibration options, or pass --overwrite to start over"
                )
            done = manifest.get("blocks_done")
            if type(done) is not int or not 0 <= done <= blocks_total:  # bool is an int subclass: refused too
                raise ResumeError(f"{manifest_path} records {done!r} finished blocks of {blocks_total}; "
                                  "pass --overwrite to start over")
            self.manifest = manifest
        else:
            self.manifest = {
                "format": RUN_FORMAT,
                "version": RUN_VERSION,
                "lowbit_version": lowbit.__version__,
                "complete": False,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "fingerprint": fingerprint,
                "blocks_total": blocks_total,
                "blocks_done": 0,
                "layers": [],
                "inputs_saved": False,
            }
            write_json_atomic(manifest_path, self.manifest)
        if offload_activations:
            self.spill = SpilledActivations(self.folder / "activations")
        return self.blocks_done

    @property
    def blocks_done(self) -> int:
        return int(self.manifest["blocks_done"])

    # ---- resuming ----------------------------------------------------------------------------
    def replay(
        self,
        model: nn.Module,
        architecture: Architecture,
        plan: LayerPlan,
        on_quantized: QuantizedCallback,
        set_weights: bool = True,
    ) -> None:
        """Hand every layer of the finished blocks to `on_quantized` as the first run did and, with
        `set_weights`, put their quantized values into `model` as the pipeline would have."""
        for index in range(self.blocks_done):
            names = self.manifest["layers"][index]
            path = self._block_file(index)
            try:
                tensors = load_file(path)
                metadata = json.loads(_read_metadata(path))
            except (OSError, ValueError, SafetensorError) as error:
                raise ResumeError(f"{path} cannot be read ({error}); pass --overwrite to start over") from None
            for name in names:
                linear = model.get_submodule(name)
                choice = plan(name, linear)
                if choice is None:
                    raise ResumeError(f"{name} was quantized by the interrupted run but the plan skips it")
                qweight = QuantizedWeight(
                    format=choice[0],
                    codes=tensors[f"{name}.codes"],
                    scale=tensors[f"{name}.scale"],
                    zero=tensors.get(f"{name}.zero"),
                    group_index=tensors[f"{name}.group_index"],
                    metadata=metadata.get(name, {}),
                )
                if set_weights:
                    weight = linear.weight
                    weight.data = qweight.dequantize().to(dtype=weight.dtype, device=weight.device)
                on_quantized(name, qweight)

    def start_hidden(self) -> list[torch.Tensor] | None:
        """The saved inputs of the first unfinished block, memory-mapped (None at the start)."""
        if self.blocks_done == 0 or not self.manifest.get("inputs_saved"):
            return None
        try:
            return load_activations(self._inputs_folder(self.blocks_done))
        except ActivationError as error:
            raise ResumeError(f"{error}; pass --overwrite to start over") from None

    # ---- recording (the pipeline's callbacks) -------------------------------------------------
    def recording(self, on_quantized: QuantizedCallback) -> QuantizedCallback:
        """`on_quantized` that also remembers each layer for the commit of its block."""

        def record(name: str, qweight: QuantizedWeight) -> None:
            self._pending[name] = qweight
            on_quantized(name, qweight)

        return record

    def keep_output(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.spill is None else self.spill.keep(output)

    def before_block(self, index: int, block: nn.Module) -> None:
        self._pending = {}
        if self.spill is not None:
            self.spill.begin_block(index)

    def after_block(self, index: int, block: nn.Module, outputs: list[torch.Tensor] | None) -> None:
        """Commit block `index`: its layers, then the next block's inputs, then the manifest."""
        tensors: dict[str, torch.Tensor] = {}
        for name, qweight in self._pending.items():
            tensors[f"{name}.codes"] = qweight.codes
            tensors[f"{name}.scale"] = qweight.scale
            tensors[f"{name}.group_index"] = qweight.group_index
            if qweight.zero is not None:
                tensors[f"{name}.zero"] = qweight.zero
        metadata = {"layers": json.dumps({name: q.metadata for name, q in self._pending.items()})}
        path = self._block_file(index)
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, lambda temp: save_safetensors(_contiguous(tensors), temp, metadata=metadata))
        if outputs is not None:
            if self.spill is not None:
                self.spill.seal_block(index)
            else:
                save_activations(self._inputs_folder(index + 1), outputs)
        self.manifest["layers"] = self.manifest["layers"][:index] + [list(self._pending)]
        self.manifest["blocks_done"] = index + 1
        self.manifest["inputs_saved"] = outputs is not None
        write_json_atomic(self.folder / MANIFEST, self.manifest)
        shutil.rmtree(self._inputs_folder(index), ignore_errors=True)
        self._pending = {}
        _stall_if_asked(index)

    # ---- ending --------------------------------------------------------------------------------
    def remove(self) -> None:
        """The export is complete: drop the run's state."""
        self.release()
        shutil.rmtree(self.folder, ignore_errors=True)

    def abandon(self) -> None:
        """The run failed: keep what --resume can use, drop a folder with nothing done yet."""
        if self.manifest.get("blocks_done", 0) > 0:
            self.release()
        else:
            self.remove()

    def release(self) -> None:
        """Let another process take the run over (the state stays for --resume)."""
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def _clear(self) -> None:
        for entry in self.folder.iterdir():
            if entry.name == "lock":
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _remove_stale_export_folders(self) -> None:
        """Partial export folders of killed runs (their writers stage there); ours holds the lock."""
        for stale in self.out_dir.parent.glob(f".{self.out_dir.name}.lowbit-partial-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _block_file(self, index: int) -> Path:
        return self.folder / "blocks" / f"block-{index:05d}.safetensors"

    def _inputs_folder(self, block: int) -> Path:
        return self.folder / "activations" / f"block-{block:05d}"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def _read_metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return (file.metadata() or {}).get("layers", "{}")


def _stall_if_asked(index: int) -> None:
    if os.environ.get(STALL_ENV) == str(index):
        print(f"lowbit: stalled after committing block {index} ({STALL_ENV})", file=sys.stderr, flush=True)
        time.sleep(3600)
