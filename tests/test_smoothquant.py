"""SmoothQuant: folding preserves the fp model, the α search against explicit W8A8 products and
against α = 0, the pipeline (samples and max |x| reach it), recipes."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import IntegerFormat, quantize_matrix
from lowbit.formats.activation import ActivationFormat
from lowbit.models.architectures import architecture_of
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe
from lowbit.transforms.awq import can_absorb
from lowbit.transforms.base import SharedInput
from lowbit.transforms.smooth import SmoothQuant, search_smoothing, smoothing_scales, weight_column_max
from tests.conftest import tiny_llama

INT8_CHANNEL = IntegerFormat(bits=8, symmetric=True, group_size=-1)
INT8_TOKEN = ActivationFormat()


def with_outliers(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator)
    x[:, :3] *= 60.0  # a few channels dominate every token
    return x


def group_of(members, source, x: torch.Tensor, formats=None) -> SharedInput:
    return SharedInput(tuple(f"m{i}" for i in range(len(members))), members, formats or [INT8_CHANNEL] * len(members),
                       source, hessian=2 / len(x) * x.T @ x, mean_abs=x.abs().mean(0), max_abs=x.abs().amax(0),
                       activations=INT8_TOKEN, samples=x)


def test_smoothing_folds_preserve_the_fp_model():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    arch = architecture_of(model)
    folded = 0
    for index, block in enumerate(arch.block_list(model)):
        groups = []
        for number, (names, source) in enumerate(zip(arch.linear_groups, arch.input_sources)):
            members = [block.get_submodule(name) for name in names]
            groups.append(group_of(members, block.get_submodule(source),
                                   with_outliers(128, members[0].in_features, seed=10 * index + number)))
        SmoothQuant(grid=4).apply(groups)
        folded += sum(can_absorb(group) for group in groups)
    assert folded == 6  # q/k/v, gate/up, down per block; o_proj not (v_proj is shared by query heads)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=2e-5, rtol=1e-4)


def test_search_errors_are_explicit_w8a8_output_errors():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, 24, bias=False), torch.nn.Linear(32, 8, bias=False)]
    x = with_outliers(200, 32, seed=1)
    group = group_of(linears, torch.nn.LayerNorm(32), x, formats=[INT8_CHANNEL, None])
    _, alpha, errors = search_smoothing(group, grid=4)
    max_w = torch.cat([linear.weight.detach().abs() for linear in linears]).amax(0)
    for candidate, error in errors.items():
        s = torch.ones(32) if candidate is None else (x.abs().amax(0) ** candidate) / (max_w ** (1 - candidate))
        x_hat = INT8_TOKEN.fake_quantize(x / s)
        explicit = 0.0
        for linear, fmt in zip(linears, group.formats):
            w = linear.weight.detach()
            w_hat = w * s if fmt is None else quantize_matrix(fmt, w * s).dequantize()
            explicit += float(((x_hat @ w_hat.T - x @ w.T) ** 2).sum()) / 200
        assert error == pytest.approx(explicit, rel=1e-4)
    assert errors[alpha] == min(errors.values())


def test_search_beats_alpha_zero_and_no_smoothing_on_outlier_channels():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    x = with_outliers(512, 64, seed=2)
    group = group_of([linear], torch.nn.LayerNorm(64), x, formats=[IntegerFormat(bits=8, symmetric=True, group_size=-1)])
    group.activations = ActivationFormat(bits=6)  # coarse enough that the outliers really hurt
    _, alpha, errors = search_smoothing(group, grid=10)
    assert alpha is not None and 0 < alpha
    assert errors[alpha] < 0.8 * errors[0.0] and errors[alpha] < 0.5 * errors[None]
    assert torch.equal(smoothing_scales(torch.ones(4), torch.ones(4) * 2, 0.0), torch.full((4,), 0.5))
    assert torch.equal(weight_column_max(group), linear.weight.detach().abs().amax(0))


def test_pipeline_smoothquant_keeps_fp_function_before_solving_and_helps_w8a8():
    """Through the pipeline: SmoothQuant + RTN at W8A6 ends closer to the fp logits than RTN alone."""
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    reference = tiny_llama()
    with torch.no_grad():
        for block in reference.model.layers:  # give the norms outlier channels, as real LLMs have
            block.input_layernorm.weight[:2] = 30.0
            block.post_attention_layernorm.weight[:2] = 30.0
        expected = reference(input_ids=ids).logits
    errors = {}
    for transforms in ([], ["smoothquant"]):
        model = tiny_llama()
        model.load_state_dict(reference.state_dict())
        recipe = Recipe(method="rtn", bits=8, group_size=-1, transforms=transforms,
                        activations=ActivationFormat(bits=6))
        SequentialQuantizer(model, architecture_of(model), recipe.plan(), activations=recipe.activations,
                            transforms=recipe.block_transforms()).run(ids)
        with torch.no_grad():
            errors[tuple(transforms)] = float((model(input_ids=ids).logits - expected).pow(2).mean())
    assert errors[("smoothquant",)] < 0.7 * errors[()]


def test_search_without_samples_is_refused():
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    group = SharedInput(("a",), [linear], [INT8_CHANNEL], torch.nn.LayerNorm(8), hessian=x.T @ x,
                        mean_abs=x.abs().mean(0))
    with pytest.raises(ValueError, match="samples"):
        search_smoothing(group, grid=2)
