"""QuantLinear: a quantized tiny Llama run through packed int4 linears gives the fake-quant logits."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.formats.base import FormatError
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import triton_available
from lowbit.models.architectures import architecture_of
from lowbit.modules import QuantLinear, replace_linears
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.solvers.rtn import RTN
from tests.conftest import tiny_llama


def quantize_tiny(fmt: IntegerFormat):
    """A tiny Llama quantized in place (fake-quant weights) and the QuantizedWeight of every linear."""
    model = tiny_llama(seed=1, tie=False)
    quantized = {}
    SequentialQuantizer(model, architecture_of(model), lambda name, linear: (fmt, RTN()),
                        on_quantized=quantized.__setitem__).run(None)
    return model, quantized


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_packed_model_gives_the_fake_quant_logits_on_cpu(symmetric):
    fake, quantized = quantize_tiny(IntegerFormat(4, symmetric=symmetric, group_size=32))
    packed = replace_linears(copy.deepcopy(fake), quantized)
    assert sum(isinstance(m, QuantLinear) for m in packed.modules()) == len(quantized) == 14
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)


def test_quant_linear_keeps_bias_and_state_dict_round_trips():
    fake, quantized = quantize_tiny(IntegerFormat(4, symmetric=False, group_size=32))
    name, qweight = next(iter(quantized.items()))
    bias = torch.randn(qweight.shape[0])
    module = QuantLinear.from_quantized(qweight, bias)
    x = torch.randn(3, qweight.shape[1])
    torch.testing.assert_close(module(x), x @ qweight.dequantize().T + bias, rtol=1e-5, atol=1e-5)
    clone = QuantLinear.from_quantized(qweight, torch.zeros_like(bias))
    clone.load_state_dict(module.state_dict())
    torch.testing.assert_close(clone(x), module(x))


def test_replace_linears_refuses_mismatched_weights():
    fake, quantized = quantize_tiny(IntegerFormat(4, group_size=32))
    name = next(iter(quantized))
    other = next(n for n in quantized if quantized[n].shape != quantized[name].shape)
    with pytest.raises(ValueError, match="does not fit"):
        replace_linears(fake, {name: quantized[other]})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        replace_linears(fake, {"model.norm": quantized[name]})
    with pytest.raises(FormatError, match="4-bit"):
        _, three_bit = quantize_tiny(IntegerFormat(3, group_size=32))
        replace_linears(fake, three_bit)


@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
def test_packed_model_on_gpu_tracks_the_fake_quant_model():
    fake, quantized = quantize_tiny(IntegerFormat(4, symmetric=False, group_size=32))
    fake = fake.to("cuda", torch.bfloat16)
    packed = replace_linears(copy.deepcopy(fake), quantized).to("cuda")
    ids = torch.randint(0, 256, (2, 12), device="cuda")
    with torch.no_grad():
        ref = fake.float()(ids).logits.double()
        out = packed(ids).logits.double()
    assert float((out - ref).norm() / ref.norm()) < 2e-2
