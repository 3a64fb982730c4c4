"""Exports of the floating-point and lookup formats reload to exactly the in-memory quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowbit.export import ExportError, check_exportable, load_quantized
from lowbit.formats import FloatFormat, IntegerFormat, LookupFormat, MXFormat, NVFP4Format
from lowbit.formats.minifloat import E4M3, E5M2
from tests.test_export import assert_reloads_exactly, export, per_layer, quantize, tiny_llama

FORMATS = {
    "fp8_e4m3 channel": (FloatFormat(E4M3, -1, torch.float32), "float-quantized"),
    "fp8_e4m3 group": (FloatFormat(E4M3, 32, torch.float16), "float-quantized"),
    "fp8_e4m3 tensor": (FloatFormat(E4M3, 0, torch.float32), "float-quantized"),
    "nvfp4": (NVFP4Format(), "nvfp4-pack-quantized"),
    "mxfp4": (MXFormat(), "mxfp4-pack-quantized"),
    "nf4": (LookupFormat(bits=4, group_size=32), "lowbit-packed"),
    "lut3": (LookupFormat(bits=3, group_size=-1, learned=True), "lowbit-packed"),
    "fp8_e5m2": (FloatFormat(E5M2, -1, torch.float32), "lowbit-packed"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_export_reloads_exactly(tmp_path, name):
    fmt, compression = FORMATS[name]
    model = tiny_llama()
    qweights = quantize(model, per_layer(fmt))
    out = export(model, qweights, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == compression
    assert_reloads_exactly(model, qweights, out)


def test_nvfp4_tensors_are_compressed_tensors_own(tmp_path):
    """Names, dtypes and packing as compressed-tensors reads them: its own unpacker and dequantizer
    formula give lowbit's values."""
    model = tiny_llama()
    qweights = quantize(model, per_layer(NVFP4Format()))
    out = export(model, qweights, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
    global_scale = tensors[f"{name}.weight_global_scale"]
    assert packed.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn and global_scale.dtype == torch.float32
    rows, half = packed.shape
    values = unpack_fp4_from_uint8(packed, rows, 2 * half, dtype=torch.float32)
    dense = (values.reshape(rows, -1, 16) * (scale.float() / global_scale).unsqueeze(-1)).reshape(rows, -1)
    assert torch.equal(dense, qweights[name].dequantize())


def test_fp8_loads_with_plain_transformers(tmp_path):
    """FP8 float-quantized needs no help from lowbit: transformers' own load gives the same logits."""
    model = tiny_llama()
    qweights = quantize(model, per_layer(FloatFormat(E4M3, -1, torch.float32)))
    out = export(model, qweights, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(out)
    plain.hf_quantizer.compressor.decompress_model(plain)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(plain.get_submodule(name).weight, model.get_submodule(name).weight)


def test_lowbit_layout_is_not_misread_by_plain_transformers(tmp_path):
    """transformers skips the unknown quant_method with a warning; the quantized linears then report
    missing weights (codes are never taken for weights): such exports need load_quantized."""
    model = tiny_llama()
    qweights = quantize(model, per_layer(LookupFormat(bits=4, group_size=32)))
    out = export(model, qweights, tmp_path / "out")
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {f"{name}.weight" for name in qweights} <= set(info["missing_keys"])
    metadata = json.loads((out / "lowbit.json").read_text())
    assert metadata["export_format"] == "lowbit"


def test_lowbit_and_compressed_tensors_layers_do_not_mix(tmp_path):
    model = tiny_llama()
    qweights = quantize(model, lambda name: LookupFormat() if "mlp" in name else IntegerFormat(bits=4, group_size=32))
    with pytest.raises(ExportError, match="not both"):
        export(model, qweights, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_groups_that_do_not_divide_are_refused_before_work():
    assert "does not divide" in check_exportable(LookupFormat(group_size=48), 64)
    assert check_exportable(NVFP4Format(), 64) is None
    assert check_exportable(LookupFormat(bits=3, group_size=-1, learned=True), 60) is None


def test_learned_tables_survive_the_round_trip(tmp_path):
    model = tiny_llama()
    qweights = quantize(model, per_layer(LookupFormat(bits=3, group_size=-1, learned=True)))
    out = export(model, qweights, tmp_path / "out")
    loaded, _ = load_quantized(out)
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(loaded.get_submodule(name).weight, qweights[name].dequantize())


@pytest.mark.parametrize("args", [("--format", "nvfp4", "--method", "rtn"), ("--scheme", "nf4", "--method", "rtn"),
                                  ("--format", "lut", "--bits", "3", "--method", "squeezellm", "--samples", "2",
                                   "--seq-len", "32", "--calib", "self")])
def test_cli_quantizes_and_reloads_new_formats(capsys, tmp_path, tiny_model_dir, args):
    from tests.test_cli import run_cli

    out_dir = tmp_path / "out"
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), *args, "--out", str(out_dir), "--no-eval")
    assert code == 0, out
    assert "differ from the in-memory model by at most 0.00e+00" in out
    assert ("(lowbit)" in out) == (args[1] != "nvfp4")


def test_cli_refuses_settings_a_format_cannot_hold(capsys, tiny_model_dir):
    from tests.test_cli import run_cli

    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--format", "mxfp4", "--group-size", "64")
    assert code == 2 and "fixed blocks of 32" in out
