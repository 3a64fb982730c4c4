"""Models larger than memory: a weightless skeleton whose blocks are read from disk one at a time.

The model is built with its parameters on the meta device (no memory) and its buffers, such as
rotary tables, computed as usual. The embedding is read for calibration; each block's weights
are read straight from the safetensors shards (memory-mapped, tensor by tensor) just before the
pipeline quantizes it, and dropped back to the meta device right after, so resident memory holds
about one block, the calibration activations and the embedding, whatever the depth of the model.
The tensors that are exported unquantized (norms, embedding, head) are read again at export time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from lowbit.models.architectures import Architecture, architecture_of
from lowbit.models.checks import check_finite_weights
from lowbit.models.loading import LoadedModel, ModelSourceError, empty_model, parse_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

STREAMED_SHARD_BYTES = 256 * 1024 * 1024
"""Export shard size while streaming: the writer buffers one shard in memory and safetensors
serializes it into a second copy, so it must stay small next to one block (the usual 2 GB would
dominate the memory a streamed run needs)."""


class ShardIndex:
    """Which safetensors file holds each tensor of a model folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_FILE
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: folder / file for name, file in weight_map.items()}
            elif (folder / SINGLE_FILE).is_file():
                with safe_open(str(folder / SINGLE_FILE), framework="pt") as file:
                    self.files = dict.fromkeys(file.keys(), folder / SINGLE_FILE)
            else:
                raise ModelSourceError(f"{folder} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) to stream")
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ModelSourceError(f"cannot read the weight index of {folder}: {error}") from None

    def read(self, names: list[str], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors, each file opened (memory-mapped) once and closed when done."""
        missing = [name for name in names if name not in self.files]
        if missing:
            raise ModelSourceError(f"the checkpoint in {self.folder} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
        with ExitStack() as stack:
            opened: dict[Path, object] = {}
            for name in names:
                path = self.files[name]
                if path not in opened:
                    try:
                        opened[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                    except (OSError, SafetensorError) as error:
                        raise ModelSourceError(f"cannot read {path} (damaged or incomplete?): {error}") from None
                try:
                    tensor = opened[path].get_tensor(name)
                except SafetensorError as error:
                    raise ModelSourceError(f"cannot read {name} from {path} (damaged or incomplete?): {error}") from None
                yield name, tensor if dtype is None else tensor.to(dtype)


def weight_bytes(folder: Path) -> int:
    """Bytes of the safetensors files of a model folder (0 when it has none)."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def available_memory_bytes() -> int:
    """Memory this process may still use: the smaller of what the machine has available and
    what its cgroup (v2 or v1) allows."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            limits.append(int(value))
    if not limits:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    return min(limits)


def should_stream(source: str | None, offload: str) -> bool:
    """`--offload disk` always streams; `auto` streams a local safetensors folder whose weights
    take more than half of the memory available (the rest is needed for activations and the
    export's buffers)."""
    if offload == "disk":
        return True
    if offload != "auto" or source is None:
        return False
    folder = Path(source).expanduser()
    return folder.is_dir() and weight_bytes(folder) > available_memory_bytes() // 2


class StreamedModel:
    """A model folder opened for streaming; also the pipeline's BlockHooks that load each block."""

    def __init__(self, source: str, dtype: str = "auto") -> None:
        folder = Path(source).expanduser()
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise ModelSourceError(f"--offload disk streams a local model folder with config.json; got {source!r}")
        self.index = ShardIndex(folder)
        try:
            config = AutoConfig.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ModelSourceError(f"could not load {folder}: {str(error).strip().splitlines()[0]}") from None
        self.dtype = parse_dtype(dtype) or getattr(config, "dtype", None) or torch.float32
        model = empty_model(config, self.dtype)
        self.loaded = LoadedModel(model=model, tokenizer=tokenizer, name=str(folder))
        self.architecture: Architecture = architecture_of(model)
        embedding = model.get_input_embeddings().weight
        self._materialize(model, "", [name for name, param in model.named_parameters() if param is embedding])

    def _materialize(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        tensors = dict(self.index.read([prefix + name for name in names], self.dtype))
        check_finite_weights(tensors.items())
        for name in names:
            parent, _, leaf = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            owner._parameters[leaf] = nn.Parameter(tensors[prefix + name], requires_grad=False)

    def before_block(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.architecture.blocks}.{index}."
        self._materialize(block, prefix, [name for name, _ in block.named_parameters()])

    def after_block(self, index: int, block: nn.Module, outputs: object) -> None:
        block.to("meta")

    def dense_tensors(self, skip: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every checkpoint tensor of the model except the weights of the linears in `skip`, read
        from disk one at a time; a tied head that the checkpoint does not store is left out.

        The embedding read for calibration is dropped first: it is read again like the rest."""
        self.loaded.model.to("meta")
        names = [
            name for name in self.loaded.model.state_dict()
            if name.removesuffix(".weight") not in skip and name in self.index.files
        ]
        for name, tensor in self.index.read(names, self.dtype):
            check_finite_weights([(name, tensor)])
            yield name, tensor
