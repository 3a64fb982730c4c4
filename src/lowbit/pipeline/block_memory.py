"""A block on the compute device while it is quantized, then back in its own CPU memory.

`block.to("cpu")` allocates new host memory for every tensor, and the first write to each fresh
page costs a page fault: an H200 moved a Llama-3-8B-shaped block (436 MB) back in 0.278 s that
way, and in 0.029 s into the CPU tensors the block came from (gpu_block_transfer_h200.md), about
8 s of a 32-layer GPTQ run. `on_device` copies back into those: the block ends with the values it
was given on the device, in the tensor storage it started with.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Moves `block` to `device` for the body; afterwards every tensor that was in CPU memory gets
    its new values copied into its old storage, and whatever else the block holds on the device
    (tensors it gained there, or whose shape or dtype changed) moves to new CPU memory. After an
    exception the block is left where it is, as a plain `to` would leave it."""
    homes = {}
    for tensor in itertools.chain(block.parameters(), block.buffers()):
        if tensor.device.type == "cpu":
            homes[id(tensor)] = (tensor, tensor.data)
    block.to(device)
    yield
    for tensor, home in homes.values():
        data = tensor.data
        if data.device != home.device and data.shape == home.shape and data.dtype == home.dtype:
            home.copy_(data)
            tensor.data = home
    block.to("cpu")
