"""Exports with quantized activations: the config vLLM reads, the stored static scale, lowbit's
reload (exact), transformers' own reload (which rounds inputs too, with its int8 rule), the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.api import Settings, quantize
from lowbit.cli import main
from lowbit.export import ExportError, load_quantized
from lowbit.export.input_load import stored_tensor
from lowbit.export.layout import pack_layer
from lowbit.formats import LookupFormat, quantize_matrix
from lowbit.formats.activation import ActivationFormat
from lowbit.modules.input_quant import input_quantizer
from lowbit.recipes import preset

SETTINGS = dict(calib=None, samples=4, seq_len=32, eval_windows=1)


def export(folder, tmp_path, scheme: str, **updates):
    recipe = preset(scheme).model_copy(update={"method": "rtn", **updates})
    out = tmp_path / scheme
    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    settings = Settings(**SETTINGS)
    settings.calib = str(tmp_path / "calib.txt")
    (tmp_path / "calib.txt").write_text(" ".join(str(int(t)) for t in calib.flatten()) * 20)
    report = quantize(str(folder), recipe, out, settings, overwrite=True, evaluate_result=False)
    return report, out


def group_config(out) -> dict:
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    return group


@pytest.mark.parametrize("scheme", ["w8a8", pytest.param("fp8-dynamic", marks=pytest.mark.slow), "fp8-static"])
def test_export_reloads_with_the_same_activation_rounding(tmp_path, tiny_model_dir, scheme):
    report, out = export(tiny_model_dir, tmp_path, scheme)
    assert report.export_max_abs_diff == 0.0  # lowbit's reload rounds inputs exactly as the pipeline did
    group = group_config(out)
    inputs = group["input_activations"]
    expected = {"w8a8": ("int", "token", True), "fp8-dynamic": ("float", "token", True),
                "fp8-static": ("float", "tensor", False)}[scheme]
    assert (inputs["type"], inputs["strategy"], inputs["dynamic"], inputs["num_bits"]) == (*expected, 8)
    assert group["format"] == ("int-quantized" if scheme == "w8a8" else "float-quantized")
    model = report.quantized_model
    reloaded, _ = load_quantized(out)
    name = "model.layers.1.mlp.down_proj"
    ours, theirs = input_quantizer(model.get_submodule(name)), input_quantizer(reloaded.get_submodule(name))
    assert theirs is not None and theirs.fmt == ours.fmt
    if scheme == "fp8-static":
        stored = stored_tensor(out, f"{name}.input_scale")
        assert stored.dtype == torch.float32 and stored.shape == (1,)
        assert torch.equal(stored, ours.scale) and torch.equal(theirs.scale, ours.scale)
    else:
        assert theirs.scale is None


@pytest.mark.slow
def test_transformers_alone_rounds_inputs_too(tmp_path, tiny_model_dir):
    """What a transformers + compressed-tensors user gets on CPU: dense weights and inputs rounded at
    run time by compressed-tensors. FP8 matches lowbit bit for bit; int8 differs slightly, its scale
    being max|x| / 127.5 instead of vLLM's (and lowbit's) max|x| / 127."""
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    differences = {}
    for scheme in ("fp8-dynamic", "w8a8"):
        report, out = export(tiny_model_dir, tmp_path, scheme)
        plain = AutoModelForCausalLM.from_pretrained(out)
        plain.hf_quantizer.compressor.decompress_model(plain)
        with torch.no_grad():
            ours = report.quantized_model(input_ids=ids).logits
            theirs = plain(input_ids=ids).logits
            for module in plain.modules():
                module.quantization_enabled = False
            weights_only = plain(input_ids=ids).logits
        differences[scheme] = (float((ours - theirs).abs().max()), float((ours - weights_only).abs().max()))
    assert differences["fp8-dynamic"][0] == 0.0 < differences["fp8-dynamic"][1]
    # Its int8 rule saturates each token's largest value (127.5 rounds to 128, clamped to 127).
    assert differences["w8a8"][0] > 0.0 and differences["w8a8"][1] > 0.0


def test_activations_with_lowbit_layout_formats_are_refused():
    fmt = LookupFormat(bits=4, group_size=32)
    qweight = quantize_matrix(fmt, torch.randn(8, 64))
    with pytest.raises(ExportError, match="activations are not exportable"):
        pack_layer("model.layers.0.mlp.up_proj", qweight, ActivationFormat())


def test_cli_w8a8_quantize_then_eval(capsys, tmp_path, tiny_model_dir, wikitext):
    out = tmp_path / "w8a8"
    code = main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--method", "rtn", "--out", str(out),
                 "--no-eval"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "activations int8 dynamic per-token" in printed and "by at most 0.00e+00" in printed
    code = main(["eval", str(out), "--data", str(wikitext / "test.txt"), "--seq-len", "64", "--windows", "1"])
    assert code == 0 and "1 x 64" in capsys.readouterr().out
    code = main(["quantize", str(tiny_model_dir), "--scheme", "fp8-static", "--no-export", "--no-eval",
                 "--resume"])
    assert code == 2 and "static activation scales" in capsys.readouterr().out
    code = main(["quantize", str(tiny_model_dir), "--format", "nf4", "--activations", "int8", "--out",
                 str(tmp_path / "nf4"), "--no-eval"])
    assert code == 2 and "not exportable with lowbit's own layout" in capsys.readouterr().out


def test_cli_w4a4_scheme_rotates_rounds_inputs_and_stores_the_kv_cache(capsys, tmp_path, tiny_model_dir, wikitext):
    out = tmp_path / "w4a4"
    code = main(["quantize", str(tiny_model_dir), "--scheme", "w4a4", "--calib", str(wikitext / "valid.txt"),
                 "--samples", "2", "--seq-len", "32", "--out", str(out), "--no-eval"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "quarot" in printed and "activations int4" in printed
    saved = json.loads((out / "lowbit.json").read_text())
    assert "kv_cache" in json.dumps(saved) and "online" in json.dumps(saved).lower()
    code = main(["eval", str(out), "--data", str(wikitext / "test.txt"), "--seq-len", "64", "--windows", "1"])
    assert code == 0, capsys.readouterr().out
    # lowbit generate decodes it (online Hadamard and input rounding as its modules run them), and
    # says that the stored KV cache is not what its decoder keeps.
    code = main(["generate", str(out), "--prompt", "The capital of France is", "--new-tokens", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "KV int4" in printed and "is not applied here" in printed
