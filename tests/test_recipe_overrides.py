"""Per-layer overrides: a mixed recipe plans, saves, replays exactly, exports and reloads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.api import Settings, quantize
from lowbit.budget.size import saved_size
from lowbit.recipes import Recipe, RecipeError
from lowbit.recipes.recipe import LayerOverride

MIXED = Recipe(
    method="rtn",
    bits=4,
    symmetric=False,
    group_size=32,
    overrides=[
        LayerOverride(pattern="model.layers.0.mlp.down_proj", bits=8, group_size=-1),
        LayerOverride(pattern="*.self_attn.[qk]_proj", bits=2, method="gptq", method_options={"damp": 0.05}),
        LayerOverride(pattern="self_attn.v_proj", bits=3, symmetric=True, group_size=64, method="gptq"),
        LayerOverride(pattern="model.layers.1.*", bits=6),
    ],
)


def test_first_matching_override_applies_and_ignore_wins():
    recipe = MIXED.model_copy(update={"ignore": ["lm_head", "model.layers.1.mlp.up_proj"]})
    plan = recipe.plan()
    linear = torch.nn.Linear(64, 64)
    fmt, solver = plan("model.layers.0.mlp.down_proj", linear)
    assert (fmt.bits, fmt.group_size, fmt.symmetric, solver.name) == (8, -1, False, "rtn")
    fmt, solver = plan("model.layers.1.self_attn.q_proj", linear)  # second override before the fourth
    assert (fmt.bits, fmt.group_size, solver.name, solver.damp) == (2, 32, "gptq", 0.05)
    fmt, solver = plan("model.layers.1.self_attn.v_proj", linear)
    assert (fmt.bits, fmt.group_size, fmt.symmetric, solver.damp) == (3, 64, True, 0.01)
    fmt, _ = plan("model.layers.1.mlp.gate_proj", linear)
    assert (fmt.bits, fmt.group_size) == (6, 32)
    fmt, _ = plan("model.layers.0.mlp.gate_proj", linear)  # no override: the recipe itself
    assert (fmt.bits, fmt.group_size) == (4, 32)
    assert plan("model.layers.1.mlp.up_proj", linear) is None
    # Equal solver settings share one instance (the pipeline stacks q/k only then).
    assert plan("model.layers.0.self_attn.q_proj", linear)[1] is plan("model.layers.0.self_attn.k_proj", linear)[1]
    assert recipe.needs_calibration() and not Recipe(method="rtn").needs_calibration()


def test_overrides_round_trip_through_yaml(tmp_path):
    path = tmp_path / "plan.yaml"
    MIXED.save(path)
    assert Recipe.load(path) == MIXED
    assert "null" not in path.read_text()  # unset override fields are left out, not written as null
    path.write_text(path.read_text().replace("method: gptq", "method: nonsense", 1))
    with pytest.raises(RecipeError, match="unknown method 'nonsense'"):
        Recipe.load(path)


@pytest.mark.parametrize("bad", [{"pattern": "x", "bitz": 3}, {"bits": 3}])
def test_malformed_override_is_refused(tmp_path, bad):
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"method": "rtn", "overrides": [bad]}))
    with pytest.raises(RecipeError, match="invalid recipe"):
        Recipe.load(path)


def test_mixed_recipe_exports_reloads_and_replays(tmp_path, tiny_model_dir, wikitext):
    settings = Settings(calib=str(wikitext / "valid.txt"), samples=4, seq_len=32)
    first = quantize(str(tiny_model_dir), MIXED, tmp_path / "a", settings, evaluate_result=False)
    assert first.export_max_abs_diff == 0.0  # the reloaded export gives the in-memory logits exactly

    # Bits per weight read from the saved tensors match the plan layer by layer and in total.
    size = saved_size(tmp_path / "a")
    plan = MIXED.plan()
    model = first.quantized_model
    planned_bits = 0.0
    for name, bits in size.layers.items():
        linear = model.get_submodule(name)
        fmt, _ = plan(name, linear)
        assert bits == pytest.approx(fmt.bits_per_weight(*linear.weight.shape), rel=1e-12), name
        planned_bits += fmt.bits_per_weight(*linear.weight.shape) * linear.weight.numel()
    assert len(size.layers) == 2 * 7
    assert size.bits_per_weight == pytest.approx(planned_bits / size.quantized_weights, rel=1e-12)
    assert size.bits_per_weight == pytest.approx(first.linear_size.bits_per_weight, rel=1e-12)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert len(config["quantization_config"]["config_groups"]) == 5  # int4 g32, int8 channel, int2 g32, int3 sym g64, int6 g32

    # Replaying the saved recipe reproduces the checkpoint tensor for tensor.
    MIXED.save(tmp_path / "plan.yaml")
    quantize(str(tiny_model_dir), Recipe.load(tmp_path / "plan.yaml"), tmp_path / "b", settings,
             evaluate_result=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
