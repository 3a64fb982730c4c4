"""`scale_dtype: auto`: scales stored in the dtype engines load them in, so the served model is the measured one."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open

from lowbit.api import Settings, quantize
from lowbit.cli import build_parser, recipe_from_args
from lowbit.recipes import Recipe


@pytest.mark.parametrize(("model_dtype", "expected"), [
    (torch.bfloat16, "bfloat16"), (torch.float16, "float16"), (torch.float32, "float16"),
])
def test_auto_follows_a_16_bit_model_and_else_keeps_float16(model_dtype, expected):
    recipe = Recipe()
    assert recipe.scale_dtype == "auto"
    assert recipe.for_model_dtype(model_dtype).scale_dtype == expected
    assert recipe.format_for(128).scale_dtype == torch.float16  # before a model is known: float16's width


def test_a_chosen_scale_dtype_is_kept_whatever_the_model():
    recipe = Recipe(scale_dtype="float32")
    assert recipe.for_model_dtype(torch.bfloat16) is recipe


def test_the_command_line_sets_it():
    args = build_parser().parse_args(["quantize", "--scale-dtype", "bfloat16"])
    assert recipe_from_args(args).scale_dtype == "bfloat16"
    assert recipe_from_args(build_parser().parse_args(["quantize"])).scale_dtype == "auto"


def _stored_scale_dtypes(folder) -> set[torch.dtype]:
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as tensors:
            dtypes |= {tensors.get_tensor(name).dtype for name in tensors.keys() if name.endswith("weight_scale")}
    return dtypes


def test_a_bfloat16_model_reloads_with_the_logits_it_was_measured_with(tmp_path, tiny_model_dir):
    settings = Settings(dtype="bfloat16")
    recipe = Recipe(method="rtn", bits=4, symmetric=False, group_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that loading rounds the scales
        report = quantize(str(tiny_model_dir), recipe, tmp_path / "auto", settings, evaluate_result=False)
    assert report.recipe.scale_dtype == "bfloat16"
    assert _stored_scale_dtypes(tmp_path / "auto") == {torch.bfloat16}
    assert report.export_max_abs_diff == 0.0

    # float16 scales on the same model: loading rounds them, the logits move, and a warning says so.
    with pytest.warns(UserWarning, match="scales are stored as torch.float16 but the model loads as torch.bfloat16"):
        rounded = quantize(str(tiny_model_dir), recipe.model_copy(update={"scale_dtype": "float16"}),
                           tmp_path / "float16", settings, evaluate_result=False)
    assert _stored_scale_dtypes(tmp_path / "float16") == {torch.float16}
    assert rounded.export_max_abs_diff > 0.0


def test_the_embedded_model_in_bfloat16_reloads_with_the_logits_it_was_measured_with(tmp_path, has_default_model):
    """GGUF weights are read in float32 and cast; the rotary tables must stay float32 as a reloaded export has them."""
    from lowbit.models.loading import load_model

    model = load_model(None, "bfloat16").model
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert {buffer.dtype for buffer in model.buffers()} == {torch.float32}
    report = quantize(None, Recipe(method="rtn"), tmp_path / "out", Settings(dtype="bfloat16"), evaluate_result=False)
    assert report.export_max_abs_diff == 0.0
