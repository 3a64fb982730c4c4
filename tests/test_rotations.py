"""Rotations: Hadamard constructions, function preservation of hadamard / quarot / spinquant, the
Cayley parameterisation, SpinQuant's training objective, recipes, export and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from lowbit.models.architectures import architecture_of
from lowbit.recipes import Recipe, RecipeError
from lowbit.transforms import MODEL_TRANSFORMS
from lowbit.transforms.hadamard import hadamard_factors, orthogonal_rotation, paley
from lowbit.transforms.online import OnlineHadamard, has_online_hadamard
from lowbit.transforms.spinquant import SpinQuant, cayley

from conftest import tiny_llama_config, with_norms_and_biases_drawn


def random_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny Llama whose norms are not ones (so folding them matters) and whose embeddings are tied."""
    torch.manual_seed(seed)
    return with_norms_and_biases_drawn(LlamaForCausalLM(tiny_llama_config(**overrides)).eval())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("order", [1, 2, 12, 20, 28, 36, 44, 48, 64, 72, 576, 1536])
def test_hadamard_matrices_are_orthogonal_with_equal_magnitudes(order):
    factors = hadamard_factors(order)
    assert factors is not None and factors.order == order
    h = factors.matrix()
    assert torch.allclose(h @ h.T, torch.eye(order, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, order ** -0.5))


def test_paley_orders_and_fallback():
    assert paley(12) is not None and paley(36) is not None  # Paley I (q = 11), Paley II (q = 17)
    assert paley(16) is None  # 15 is not prime and 7 ≡ 3 (mod 4)
    assert hadamard_factors(116) is None  # 116 = 4 · 29: no Paley factor
    q, construction = orthogonal_rotation(116, seed=0)
    assert "random orthogonal" in construction
    assert torch.allclose(q @ q.T, torch.eye(116, dtype=torch.float64), atol=1e-12)
    a, _ = orthogonal_rotation(48, seed=0)
    b, _ = orthogonal_rotation(48, seed=1)
    assert not torch.equal(a, b)  # the random signs follow the seed


@pytest.mark.parametrize("order", [64, 96, 1536])
def test_online_hadamard_equals_the_dense_product(order):
    factors = hadamard_factors(order)
    x = torch.randn(3, 5, order)
    expected = x.double() @ factors.matrix()
    assert torch.allclose(OnlineHadamard(factors)(x).double(), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["hadamard", "quarot"])
@pytest.mark.parametrize("overrides", [
    {},
    {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2},
    {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4},
    {"hidden_size": 116, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
     "head_dim": 58},
])
def test_rotations_preserve_the_fp_model(name, overrides):
    model = random_llama(**overrides)
    original = copy.deepcopy(model)
    MODEL_TRANSFORMS[name]().apply(model, architecture_of(model), lambda *_: None, None)
    assert torch.allclose(logits(model, IDS), logits(original, IDS), atol=1e-4)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q, original.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert has_online_hadamard(model.model.layers[1].mlp.down_proj) == (name == "quarot")


def test_rotation_spreads_an_outlier_channel():
    model = random_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 5] *= 50
    MODEL_TRANSFORMS["hadamard"]().apply(model, architecture_of(model), lambda *_: None, None)
    columns = model.model.layers[0].self_attn.q_proj.weight.abs().amax(dim=0)
    assert columns.max() / columns.median() < 5


def rtn_kl(model, bits: int = 4) -> float:
    """KL of the model with every block linear rounded to nearest (per channel) from the float model."""
    from lowbit.formats.base import quantize_matrix

    reference = torch.log_softmax(logits(model, IDS), -1)
    quantized = copy.deepcopy(model)
    fmt = Recipe(bits=bits, symmetric=False, group_size=-1).format_for(1)
    with torch.no_grad():
        for name, module in quantized.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(quantize_matrix(fmt, module.weight).dequantize())
    return float(torch.nn.functional.kl_div(torch.log_softmax(logits(quantized, IDS), -1), reference,
                                            log_target=True, reduction="batchmean"))


def test_rotation_lowers_the_rounding_error_of_a_model_with_outlier_channels():
    model = random_llama()
    with torch.no_grad():  # residual channels 3 and 40 are read with 30x weights: per-row ranges blow up
        for layer in model.model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj):
                linear.weight[:, [3, 40]] *= 30
    plain = rtn_kl(model)
    MODEL_TRANSFORMS["quarot"]().apply(model, architecture_of(model), lambda *_: None, None)
    assert rtn_kl(model) < 0.5 * plain


def test_rotating_twice_is_refused():
    model = random_llama()
    MODEL_TRANSFORMS["quarot"]().apply(model, architecture_of(model), lambda *_: None, None)
    with pytest.raises(ValueError, match="already rotated"):
        MODEL_TRANSFORMS["quarot"]().apply(model, architecture_of(model), lambda *_: None, None)


def test_cayley_updates_stay_orthogonal():
    parameter = torch.zeros(24, 24, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([parameter], lr=0.1)
    target = torch.randn(24, 24, dtype=torch.float64)
    for _ in range(20):
        loss = (cayley(parameter) - target).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    r = cayley(parameter.detach())
    assert parameter.abs().max() > 0.01  # it moved
    assert torch.allclose(r @ r.T, torch.eye(24, dtype=torch.float64), atol=1e-10)


def test_spinquant_lowers_its_objective_and_folds_to_the_same_function():
    model = random_llama(intermediate_size=96, hidden_size=48)
    original = copy.deepcopy(model)
    recipe = Recipe(method="rtn", bits=2, group_size=-1, transforms=["spinquant"])
    calibration = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    transform = SpinQuant(steps=8, progress=False)
    transform.apply(model, architecture_of(model), recipe.layer_formats(), calibration)
    assert len(transform.losses) == 8
    # Rounding makes the objective jumpy from step to step: compare the last steps' mean with the start.
    assert sum(transform.losses[-4:]) / 4 < 0.9 * transform.losses[0]
    assert torch.allclose(logits(model, IDS), logits(original, IDS), atol=1e-4)
    assert has_online_hadamard(model.model.layers[0].mlp.down_proj)


def test_recipe_fields_and_refusals(tmp_path):
    recipe = Recipe(method="rtn", transforms=["spinquant"], transform_options={"spinquant": {"steps": 3}})
    path = tmp_path / "r.yaml"
    recipe.save(path)
    loaded = Recipe.load(path)
    assert loaded.model_transforms()[0].steps == 3 and loaded.block_transforms() == []
    assert loaded.needs_calibration()
    assert not Recipe(method="rtn", transforms=["quarot"]).needs_calibration()
    assert Recipe(method="gptq", transforms=["hadamard", "awq"]).describe().startswith("hadamard+awq+gptq")
    assert "transform_options" not in Recipe().model_dump()  # old recipes keep their cache keys
    for bad, message in [
        ({"transforms": ["hadamard", "spinquant"]}, "choose one model transform"),
        ({"transforms": ["quarot"], "transform_options": {"spinquant": {"steps": 3}}}, "not among"),
        ({"transforms": ["spinquant"], "transform_options": {"spinquant": {"stepz": 3}}}, "bad option"),
        ({"transforms": ["spinquant"], "transform_options": {"spinquant": {"steps": -1}}}, "bad option"),
    ]:
        path.write_text(Recipe(method="rtn").model_copy(update=bad).model_dump_json())
        with pytest.raises(RecipeError, match=message):
            Recipe.load(path)


def test_quarot_export_reloads_with_its_online_hadamard(tmp_path, tiny_model_dir, wikitext):
    from lowbit.api import Settings, quantize
    from lowbit.export import load_quantized

    recipe = Recipe(method="awq", bits=3, group_size=32, transforms=["quarot"])
    settings = Settings(calib=str(wikitext / "valid.txt"), samples=4, seq_len=64)
    report = quantize(str(tiny_model_dir), recipe, tmp_path / "out", settings, evaluate_result=False)
    assert report.export_max_abs_diff < 1e-4
    reloaded, _ = load_quantized(tmp_path / "out")
    assert has_online_hadamard(reloaded.model.layers[0].mlp.down_proj)
    assert not reloaded.config.tie_word_embeddings


def test_cli_transform_options(capsys, tmp_path, tiny_model_dir, wikitext):
    from lowbit.cli import main

    code = main(["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--transform", "spinquant",
                 "--transform-option", "spinquant.steps=2", "--transform-option", "spinquant.max_tokens=16",
                 "--calib", str(wikitext / "valid.txt"), "--samples", "2", "--seq-len", "32",
                 "--save-recipe", str(tmp_path / "r.yaml"), "--no-export", "--no-eval"])
    assert code == 0, capsys.readouterr().err
    assert Recipe.load(tmp_path / "r.yaml").transform_options == {"spinquant": {"steps": 2, "max_tokens": 16}}
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_model_dir), "--transform-option", "spinquant", "--no-export"])
    assert "NAME.KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_quarot_preserves_the_embedded_model(has_default_model):
    from lowbit.models.loading import load_model

    model = load_model(None).model
    original = copy.deepcopy(model)
    MODEL_TRANSFORMS["quarot"]().apply(model, architecture_of(model), lambda *_: None, None)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    expected, got = logits(original, ids), logits(model, ids)
    assert (expected - got).abs().max() < 1e-3 * expected.abs().max()
    assert has_online_hadamard(model.model.layers[29].mlp.down_proj)
