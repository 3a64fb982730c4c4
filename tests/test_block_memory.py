"""pipeline/block_memory.py: a block comes back from the device into the CPU tensors it left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.pipeline.block_memory import on_device


def _block() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    block.register_buffer("table", torch.arange(6.0))
    return block


def test_on_the_cpu_nothing_moves_and_new_values_stay():
    block = _block()
    with on_device(block, torch.device("cpu")):
        new = torch.randn(16, 8)
        block[0].weight.data = new
    assert block[0].weight.data_ptr() == new.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_come_back_into_their_own_storage_with_the_devices_values():
    block = _block()
    before = {name: t.data_ptr() for name, t in [*block.named_parameters(), *block.named_buffers()]}
    with on_device(block, torch.device("cuda")):
        assert all(t.is_cuda for t in block.parameters())
        changed = torch.randn(16, 8, device="cuda")
        block[0].weight.data = changed  # as a solver sets a dequantized weight
        block[2].bias.data = torch.zeros(2, device="cuda")  # a new shape: new memory
        block[1].register_buffer("gained", torch.ones(3, device="cuda"))
    assert all(t.device.type == "cpu" for t in [*block.parameters(), *block.buffers()])
    assert torch.equal(block[0].weight, changed.cpu())
    assert block[0].weight.data_ptr() == before["0.weight"] and block.table.data_ptr() == before["table"]
    assert block[2].bias.shape == (2,) and block[1].gained.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_after_an_error_the_block_stays_on_the_device():
    block = _block()
    with pytest.raises(RuntimeError), on_device(block, torch.device("cuda")):
        raise RuntimeError("solver failed")
    assert block[0].weight.is_cuda
