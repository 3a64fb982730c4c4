"""GPU paths of calibration and GPTQ against their CPU / torch definitions (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import triton_available
from lowbit.models.architectures import architecture_of
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.solvers import gptq as gptq_module
from lowbit.solvers.gptq import GPTQ
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


def correlated_stats(columns: int, tokens: int = 1024, seed: int = 0) -> HessianStats:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, columns, generator=generator) @ torch.randn(columns, columns, generator=generator)
    stats = HessianStats(columns, device="cuda")
    stats.add(x.cuda())
    return stats


def test_bf16_hessian_on_gpu_equals_float32_products_of_the_same_inputs():
    x = torch.randn(3, 700, 2600, device="cuda").to(torch.bfloat16)  # 2600: a partial triangle block
    fast = HessianStats(2600, device="cuda")
    fast.add(x[:2])
    fast.add(x[2:])
    exact = x.double().reshape(-1, 2600)
    ref = 2 * exact.T @ exact / exact.shape[0]
    assert fast.tokens == 2100
    assert float((fast.hessian.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize(
    "fmt, act_order",
    [(IntegerFormat(4, symmetric=False, group_size=128), False), (IntegerFormat(4, symmetric=True, group_size=64), False),
     (IntegerFormat(3, symmetric=False, group_size=32), True)],
    ids=["int4-asym-g128", "int4-sym-g64", "int3-asym-g32-act-order"],
)
@pytest.mark.parametrize("ranges", [{}, {"static_groups": True, "clip_search": True}], ids=["dynamic", "static-mse"])
def test_fused_gptq_kernel_matches_the_torch_column_loop(fmt, act_order, ranges, monkeypatch):
    rows, columns = 300, 520  # a partial last block, rows not a multiple of the row tile
    weight = torch.randn(rows, columns, device="cuda")
    stats = correlated_stats(columns)
    fused = GPTQ(act_order=act_order, **ranges).solve(weight, fmt, stats)
    monkeypatch.setattr(gptq_module, "_fused_block_solver", lambda *args: None)
    loop = GPTQ(act_order=act_order, **ranges).solve(weight, fmt, stats)
    # Same float32 arithmetic in a different order: a rare code may round the other way.
    assert (fused.codes == loop.codes).float().mean() > 0.999
    assert torch.equal(fused.group_index, loop.group_index)
    assert fused.scale.dtype == loop.scale.dtype
    assert torch.allclose(fused.scale.float(), loop.scale.float(), rtol=1e-2)
    rel = abs(fused.metadata["hessian_error"] - loop.metadata["hessian_error"]) / loop.metadata["hessian_error"]
    assert rel < 1e-3


@pytest.mark.parametrize("quantize_head", [False, True], ids=["blocks", "blocks+head"])
def test_pipeline_on_gpu_with_activations_on_device_matches_cpu(quantize_head):
    """The same codes on either device, the output head's too where it is quantized (the tiny
    model ties it to the embedding, which stays exact and in CPU memory)."""
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    fmt = IntegerFormat(4, symmetric=False, group_size=32)
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama(seed=2)
        embedding = model.model.embed_tokens.weight.detach().clone()
        out = {}
        SequentialQuantizer(model, architecture_of(model), lambda name, linear: (fmt, GPTQ()), device=device,
                            batch_size=4, activations_on_device=device == "cuda", on_quantized=out.__setitem__,
                            quantize_head=quantize_head).run(calibration)
        assert ("lm_head" in out) == quantize_head
        assert torch.equal(model.model.embed_tokens.weight, embedding)
        assert model.lm_head.weight.device.type == "cpu"
        results[device] = out
    for name, cpu in results["cpu"].items():
        gpu = results["cuda"][name]
        assert gpu.codes.device.type == "cpu"
        assert (gpu.codes == cpu.codes).float().mean() > 0.99, name
