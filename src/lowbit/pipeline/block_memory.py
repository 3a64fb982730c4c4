"""A block on the compute device while it is quantized, then back in its own CPU memory.

`block.to("cpu")` allocates new host memory for every tensor, and the first write to each fresh
page costs a page fault: an H200 moved a Llama-3-8B-shaped block (436 MB) back in 0.278 s that
way, and in 0.029 s into the CPU tensors the block came from (gpu_block_transfer_h200.md), about
8 s of a 32-layer GPTQ run. `on_device` copies back into those: the block ends with the values it
was given on the device, in the tensor storage it started with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Moves `block` to `device` for the body; afterwards every parameter and buffer that was in CPU
    memory gets its new values copied into its old storage, and whatever else the block holds on
    the device (tensors it gained there, or whose shape or dtype changed) moves to new CPU memory.
    After an exception the block is left where it is, as a plain `to` would leave it."""
    homes = {}  # (module, "_parameters" or "_buffers", name) -> the CPU tensor it held
    for module in block.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, kind).items():
                if tensor is not None and tensor.device.type == "cpu":
                    homes[module, kind, name] = tensor.data
    block.to(device)
    yield
    done = set()
    for (module, kind, name), home in homes.items():
        tensor = getattr(module, kind).get(name)
        if tensor is None or id(tensor) in done:  # removed, or tied to one already copied
            continue
        if tensor.device != home.device and tensor.shape == home.shape and tensor.dtype == home.dtype:
            home.copy_(tensor.data)
            if kind == "_parameters":
                tensor.data = home  # `to` moves a parameter's data, not the parameter
            else:
                module._buffers[name] = home
            done.add(id(tensor))
    block.to("cpu")
