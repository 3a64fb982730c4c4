"""BlockTransfer: blocks come to the GPU ahead of use and go back behind it, with nothing changed;
the pipeline gives the same result with and without the overlap. GPU tests skip without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from lowbit.formats.integer import IntegerFormat
from lowbit.models.architectures import architecture_of
from lowbit.pipeline.block_transfer import BlockTransfer
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.solvers.gptq import GPTQ

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def block_with_shared_weight() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 64))
    block.register_buffer("table", torch.randn(5))
    block.add_module("tied", nn.Linear(32, 64))
    block.tied.weight = block[2].weight  # one Parameter in two modules
    return block


def test_on_cpu_load_and_offload_are_plain_moves():
    block = block_with_shared_weight()
    transfer = BlockTransfer(torch.device("cpu"))
    assert not transfer.overlap
    before = {name: t.clone() for name, t in block.state_dict().items()}
    transfer.prefetch(block)
    transfer.load(block)
    transfer.offload(block)
    transfer.close()
    assert all(torch.equal(before[name], t) for name, t in block.state_dict().items())


@gpu
def test_round_trip_keeps_values_parameters_and_ties():
    blocks = [block_with_shared_weight() for _ in range(3)]
    expected = [{name: t.clone() for name, t in b.state_dict().items()} for b in blocks]
    params = [list(b.parameters()) for b in blocks]
    transfer = BlockTransfer(torch.device("cuda"))
    x = torch.randn(4, 64, device="cuda")
    for index, block in enumerate(blocks):
        transfer.load(block)
        if index + 1 < len(blocks):
            transfer.prefetch(blocks[index + 1])
        assert all(t.is_cuda for t in block.state_dict().values())
        with torch.no_grad():
            block[0].weight.mul_(2)  # work queued on the compute stream must land before the copy back
            block[2](block[1](block[0](x)))  # (the Sequential's own forward would also call `tied`)
        transfer.offload(block)
    transfer.close()
    for block, before, held in zip(blocks, expected, params):
        assert all(t.device.type == "cpu" for t in block.state_dict().values())
        assert list(block.parameters()) == held  # the same Parameter objects, only their data moved
        assert block.tied.weight is block[2].weight
        for name, t in block.state_dict().items():
            want = before[name] * 2 if name == "0.weight" else before[name]
            assert torch.equal(t, want), name


@gpu
def test_pipeline_with_overlapped_transfers_matches_the_plain_one():
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    fmt = IntegerFormat(4, symmetric=False, group_size=32)

    results, models = [], []
    for overlap in (True, False):
        model = tiny_llama(seed=2)
        out = {}
        SequentialQuantizer(model, architecture_of(model), lambda name, linear: (fmt, GPTQ()), device="cuda",
                            batch_size=4, activations_on_device=True, on_quantized=out.__setitem__,
                            overlap_transfers=overlap).run(calibration)
        results.append(out)
        models.append(model)
    assert all(p.device.type == "cpu" for p in models[0].parameters())
    for name, plain in results[1].items():
        assert torch.equal(results[0][name].codes, plain.codes), name
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name
