"""The FBGEMM path of the W4A16 dispatcher: the operands built from PackedInt4 encode the same
weight under FBGEMM's w = q·scale + zero convention (checked on CPU, by decoding them the way the
library documents), and on a GPU with fbgemm-gpu-genai its kernel computes the same product as
float64 dequantize-then-matmul. GPU tests skip without CUDA or without a usable fbgemm-gpu-genai."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_fbgemm
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.w4a16 import use_paths
from test_kernels import (check_dispatcher_allowing, check_layout_follows_in_place_weight_changes, quantized,
                          relative_error)

needs_fbgemm = pytest.mark.skipif(not w4a16_fbgemm.available(),
                                  reason=f"needs a usable fbgemm-gpu-genai ({w4a16_fbgemm.import_error()})")


def decode_fbgemm_operands(pairs: torch.Tensor, scales: torch.Tensor, zero_terms: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """float32 [N, K] from FBGEMM's unshuffled operands: low nibble first, signed, q·scale + zero."""
    low = (pairs.to(torch.int16) << 12) >> 12  # sign-extend bits 0..3
    high = pairs.to(torch.int16) >> 4  # the arithmetic shift keeps the sign of bits 4..7
    signed = torch.stack([low, high], dim=-1).flatten(1).float()  # [N, K]
    per_column = lambda t: t.float().T.repeat_interleave(group_size, dim=1)  # noqa: E731  [N, K]
    return signed * per_column(scales) + per_column(zero_terms)


@pytest.mark.parametrize("symmetric", [True, False])
def test_operands_encode_the_packed_weight(symmetric):
    qweight = quantized(64, 512, IntegerFormat(4, symmetric=symmetric, group_size=128), seed=5)
    packed = pack_quantized_weight(qweight)
    pairs = w4a16_fbgemm.signed_code_pairs(packed)
    scales, zero_terms = w4a16_fbgemm.group_terms(packed)
    assert pairs.dtype == torch.int8 and pairs.shape == (64, 256)
    assert scales.shape == zero_terms.shape == (4, 64) and scales.dtype == zero_terms.dtype == torch.bfloat16
    if symmetric:
        assert not zero_terms.any()
    decoded = decode_fbgemm_operands(pairs, scales, zero_terms, 128)
    expected = packed.dequantize()
    # The scales and zero terms are rounded to bf16 (8 significant bits): per weight at most about
    # 2^-9 of |q·scale| + |zero term|, both at most 16 scales.
    bound = 2 * 16 * 2.0 ** -9 * packed.scales.float().T.repeat_interleave(128, dim=1)
    assert ((decoded - expected).abs() <= bound).all()
    # ... and on average far below that bound.
    assert relative_error(decoded, expected.double()) < 4e-3


def test_unsupported_weights_are_left_to_the_other_paths():
    packed = pack_quantized_weight(quantized(64, 256, IntegerFormat(4, symmetric=False, group_size=64), seed=1))
    assert not w4a16_fbgemm.supports(packed, torch.bfloat16)  # groups below 128, and on CPU


@needs_fbgemm
@pytest.mark.parametrize("m, symmetric", [(m, sym) for m in (1, 3, 16, 64, 100, 256) for sym in (True, False)])
def test_fbgemm_matches_float64_dequantize_then_matmul(m, symmetric):
    n, k = 384, 1024
    qweight = quantized(n, k, IntegerFormat(4, symmetric=symmetric, group_size=128), seed=m)
    packed = pack_quantized_weight(qweight).to("cuda")
    for call in range(2):  # fresh inputs each time: the result must not depend on what ran before
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ qweight.dequantize().double().cuda().T
        out = w4a16_fbgemm.matmul(x, packed)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n) and torch.isfinite(out).all()
        assert relative_error(out, ref) < 1e-2


@needs_fbgemm
def test_fbgemm_layout_follows_in_place_weight_changes():
    check_layout_follows_in_place_weight_changes(w4a16_fbgemm.matmul)


@needs_fbgemm
def test_dispatcher_with_fbgemm_allowed_handles_act_order_and_records_its_choice():
    check_dispatcher_allowing("fbgemm", 384)


@needs_fbgemm
@pytest.mark.parametrize("m", [1, 16])
def test_fbgemm_replayed_from_a_cuda_graph_follows_its_input(m):
    """The decode loop captures each step once and replays it on new inputs in the same buffers."""
    qweight = quantized(1024, 4096, IntegerFormat(4, symmetric=False, group_size=128), seed=7)
    packed = pack_quantized_weight(qweight).to("cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w4a16_fbgemm.matmul(x, packed)  # layout built outside the capture, as the dispatcher's warm-up does
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_fbgemm.matmul(x, packed)
    weight = qweight.dequantize().double().cuda()
    for seed in range(3):
        x.copy_(torch.randn(m, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, x.double() @ weight.T) < 1e-2


@needs_fbgemm
def test_layouts_built_in_a_decode_loops_warm_up_stay_correct():
    """StaticDecoder.capture() runs its warm-up step on a side stream, where the dispatcher times
    its paths and builds each weight's FBGEMM layout: on an H200, 125 of 128 such layouts once came
    back corrupted (the decode diverged) while the same weights built on the main stream were right."""
    from torch import nn

    from lowbit.formats.base import quantize_matrix
    from lowbit.generate import StaticDecoder
    from lowbit.modules import QuantLinear
    from tests.conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # Llama-3-8B's widths, where FBGEMM wins gate/up_proj at M = 16 (30 vs 40 us on an H200).
    config = tiny_llama_config(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                               num_attention_heads=32, num_key_value_heads=8)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):  # built in place: a 4096-wide model initialised on the CPU takes long
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    modules = {}
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            modules[name] = QuantLinear.from_quantized(quantize_matrix(fmt, module.weight.float())).to("cuda")
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, modules[name])
    use_paths("fbgemm")
    try:
        decoder = StaticDecoder(model, batch=16, max_len=8)
        decoder.capture()
        decoder.prefill(torch.randint(0, 256, (16, 4), device="cuda"))
        torch.cuda.synchronize()
        built = {name: m for name, m in modules.items() if m.qweight in w4a16_fbgemm._LAYOUTS}
        if not built:
            pytest.skip("the dispatcher chose no FBGEMM path on this GPU")
        for name, module in built.items():
            x = torch.randn(16, module.in_features, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ module.packed.dequantize().double().T
            assert relative_error(w4a16_fbgemm.matmul(x, module.packed), ref) < 1e-2, name
    finally:
        use_paths()
