"""Activation quantization: fake-quant against slow per-row references, the input hook, the pipeline
(static scales from what a layer really sees, next-block inputs through rounded activations), recipes."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.formats.activation import ActivationFormat, parse_activations
from lowbit.formats.minifloat import E4M3
from lowbit.models.architectures import architecture_of
from lowbit.modules.input_quant import input_quantizer, quantize_inputs, remove_input_quantizer
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe, preset
from tests.conftest import tiny_llama

INT8 = ActivationFormat()
FP8 = ActivationFormat(type="fp8_e4m3")
FP8_STATIC = ActivationFormat(type="fp8_e4m3", granularity="tensor", dynamic=False)


def outlier_inputs(rows: int = 16, columns: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, columns, generator=generator)
    x[..., 3] *= 40.0  # an outlier channel, as LLM activations have
    x[0, 5] = 0.0  # an all-zero token must stay zero
    return x


def reference_int_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One row at a time, in float64: scale = max|row| / (2^(b-1) - 1), round half to even, clamp."""
    grid = 2 ** (bits - 1) - 1
    out = torch.empty_like(x)
    flat, result = x.reshape(-1, x.shape[-1]).double(), out.reshape(-1, x.shape[-1])
    for index, row in enumerate(flat):
        scale = float(row.abs().max()) / grid
        if scale == 0:
            result[index] = 0
            continue
        codes = [max(-grid, min(grid, round(value / scale))) for value in row.tolist()]
        result[index] = torch.tensor(codes, dtype=torch.float64) * scale
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_int_per_token_matches_a_slow_reference(bits):
    x = outlier_inputs()
    got = ActivationFormat(bits=bits).fake_quantize(x)
    assert torch.allclose(got, reference_int_per_token(x, bits), rtol=0, atol=1e-5)
    assert torch.equal(got[0, 5], torch.zeros(48))
    assert len(torch.unique(got[1, 2] / (x[1, 2].abs().max() / (2 ** (bits - 1) - 1)))) <= 2 ** bits - 1


def test_fp8_per_token_matches_the_exact_e4m3_rounding():
    x = torch.cat([outlier_inputs(), torch.randn(2, 16, 48) * 1e-3])  # subnormals after scaling too
    x[0, 0, 0] = 1e-9
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
    expected = E4M3.round(x / scale) * scale
    assert torch.equal(FP8.fake_quantize(x), expected)


def test_static_scale_saturates_beyond_the_calibrated_range():
    x = torch.tensor([[0.5, -1.0, 3.0, -7.0]])
    scale = FP8_STATIC.static_scale(2.0)
    got = FP8_STATIC.fake_quantize(x, scale)
    assert float(scale) == pytest.approx(2.0 / 448)
    assert got[0, 2] == 2.0 and got[0, 3] == -2.0 and got[0, 0] == 0.5
    with pytest.raises(ValueError, match="scale exactly"):
        FP8_STATIC.fake_quantize(x)


def test_asymmetric_per_token_uses_every_level_between_min_and_max():
    x = torch.rand(4, 64) * 5 + 1  # all positive: symmetric would waste half the grid
    fmt = ActivationFormat(bits=4, symmetric=False)
    got = fmt.fake_quantize(x)
    step = (x.amax(dim=-1, keepdim=True) - 0) / 15
    assert (got - x).abs().max() <= step.max() / 2 + 1e-6
    assert (got - x).abs().mean() < (ActivationFormat(bits=4).fake_quantize(x) - x).abs().mean()


def test_bad_formats_are_refused_with_what_to_do():
    for fields, message in [({"type": "fp8_e4m3", "bits": 4}, "8 bits"), ({"bits": 1}, "2..8"),
                            ({"dynamic": False}, "per tensor"),
                            ({"dynamic": False, "granularity": "tensor", "symmetric": False}, "symmetric")]:
        with pytest.raises(ValueError, match=message):
            ActivationFormat(**fields)
    assert parse_activations("fp8-static") == FP8_STATIC
    assert parse_activations("int4") == ActivationFormat(bits=4)
    assert parse_activations("none") is None
    with pytest.raises(ValueError, match="bad activation spec"):
        parse_activations("int8-perchannel")


def test_input_hook_rounds_the_input_and_survives_deep_copies():
    linear = torch.nn.Linear(48, 8)
    x = outlier_inputs()
    expected = torch.nn.functional.linear(INT8.fake_quantize(x), linear.weight, linear.bias)
    quantize_inputs(linear, INT8)
    assert torch.equal(linear(x), expected)
    copied = copy.deepcopy(linear)
    assert torch.equal(copied(x), expected)
    remove_input_quantizer(copied)  # removing from the copy leaves the original's hook alone
    assert input_quantizer(copied) is None and torch.equal(linear(x), expected)
    assert torch.allclose(copied(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
    quantize_inputs(linear, FP8)  # replaces, does not stack
    assert len(linear._forward_pre_hooks) == 1 and input_quantizer(linear).fmt == FP8


def _quantize(model, recipe: Recipe, ids: torch.Tensor, **kwargs) -> None:
    SequentialQuantizer(model, architecture_of(model), recipe.plan(), activations=recipe.activations,
                        transforms=recipe.block_transforms(), **kwargs).run(ids)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_static_scales_are_the_largest_input_each_layer_sees(batch_size):
    model = tiny_llama()
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    seen: dict[str, float] = {}
    block = model.model.layers[0]
    handles = [getattr(block.self_attn, name).register_forward_pre_hook(
        lambda module, args, name=name: seen.__setitem__(name, max(seen.get(name, 0.0), float(args[0].abs().max()))))
        for name in ("q_proj",)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    _quantize(model, preset("fp8-static"), ids, batch_size=batch_size)
    quantizer = input_quantizer(block.self_attn.q_proj)
    assert float(quantizer.scale) == pytest.approx(seen["q_proj"] / 448, rel=1e-6)
    planned = [m for name, m in model.named_modules() if name.endswith("_proj")]
    assert len(planned) == 14 and all(input_quantizer(m) is not None for m in planned)


def test_next_block_inputs_come_from_rounded_activations():
    """Block 1 is calibrated on block 0's output with its inputs rounded: GPTQ's Hessian of block 1
    differs from the weight-only run's, and so do its solved weights."""
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    weight_only, w4a4 = tiny_llama(), tiny_llama()
    _quantize(weight_only, Recipe(method="gptq", bits=4, group_size=32), ids)
    _quantize(w4a4, Recipe(method="gptq", bits=4, group_size=32, activations=ActivationFormat(bits=4)), ids)
    assert torch.equal(weight_only.model.layers[0].self_attn.q_proj.weight, w4a4.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(weight_only.model.layers[1].self_attn.q_proj.weight,
                           w4a4.model.layers[1].self_attn.q_proj.weight)
    # The quantized model computes with rounded inputs: removing the hooks changes its logits.
    logits = w4a4(input_ids=ids).logits
    for module in w4a4.modules():
        remove_input_quantizer(module)
    assert not torch.allclose(w4a4(input_ids=ids).logits, logits, atol=1e-3)


def test_recipe_round_trip_and_calibration_needs(tmp_path):
    recipe = preset("fp8-static")
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == recipe
    assert recipe.needs_calibration() and not preset("fp8-dynamic").needs_calibration()
    assert "activations" not in preset("w4a16").model_dump()  # weight-only recipes dump as before
    assert preset("w8a8").describe() == "gptq int8 sym per-channel + activations int8 dynamic per-token"
    with pytest.raises(ValueError, match="calibration"):
        _quantize(tiny_llama(), recipe, None)
