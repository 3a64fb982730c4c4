"""load_packed and `lowbit generate`: an export runs on its codes and computes what its dense reload does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lowbit.cli import main
from lowbit.export import load_quantized
from lowbit.export.errors import ExportError
from lowbit.export.packed_load import load_packed, packed_layers
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.modules import QuantLinear
from lowbit.modules.vq_linear import VQLinear
from tests.test_export import export, logits, per_layer, quantize, tiny_llama


def _int4_or_3(name: str) -> IntegerFormat:
    return IntegerFormat(bits=3 if "mlp" in name else 4, symmetric=False, group_size=32)


@pytest.mark.parametrize("fmt_for, swapped", [
    (per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32)), 14),
    (per_layer(IntegerFormat(bits=4, symmetric=True, group_size=-1)), 14),
    (_int4_or_3, 8),  # 3-bit MLPs keep dense weights
])
def test_int4_layers_run_on_their_codes_and_give_the_dense_reloads_logits(tmp_path, fmt_for, swapped):
    model = tiny_llama()
    qweights = quantize(model, fmt_for)
    out = export(model, qweights, tmp_path / "out")
    dense, _ = load_quantized(out)
    packed, _, count = load_packed(out)
    modules = {name: module for name, module in packed.named_modules() if isinstance(module, QuantLinear)}
    assert count == len(modules) == swapped
    for name, module in modules.items():
        assert torch.equal(module.dequantized_weight(), qweights[name].dequantize())
        assert torch.equal(module.qweight, pack_quantized_weight(qweights[name]).qweight)  # the words, read off as is
    torch.testing.assert_close(logits(packed), logits(dense), rtol=1e-5, atol=1e-5)


def test_a_single_group_targeting_a_class_reads_every_packed_layer(tmp_path):
    """llm-compressor writes targets: ["Linear"] (a class) where lowbit writes module names."""
    model = tiny_llama()
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32)))
    out = export(model, qweights, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    [group] = config["quantization_config"]["config_groups"].values()
    group["targets"] = ["Linear"]
    (out / "config.json").write_text(json.dumps(config))
    assert set(packed_layers(out)) == set(qweights)


def test_codes_of_the_wrong_shape_are_a_one_line_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    out = export(model, quantize(model, per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32))),
                 tmp_path / "out")
    [file] = out.glob("*.safetensors")
    tensors = load_file(file)
    name = "model.layers.0.self_attn.q_proj.weight_packed"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="q_proj.weight_packed has shape .* the export is damaged"):
        packed_layers(out)


def test_layers_with_an_online_rotation_stay_dense_and_keep_it(tmp_path, tiny_model_dir, wikitext):
    """QuaRot's down projections carry an online Hadamard on their input (restored on load from the
    export's metadata): they stay dense modules with it; every other int4 layer runs on its codes."""
    from lowbit.api import Settings, quantize as quantize_model
    from lowbit.recipes import Recipe
    from lowbit.transforms.online import has_online_hadamard

    recipe = Recipe(method="rtn", bits=4, group_size=32, transforms=["quarot"])
    settings = Settings(calib=str(wikitext / "valid.txt"), samples=2, seq_len=32)
    quantize_model(str(tiny_model_dir), recipe, tmp_path / "out", settings, evaluate_result=False)
    dense, _ = load_quantized(tmp_path / "out")
    packed, _, count = load_packed(tmp_path / "out")
    layers = len(packed.model.layers)
    down = [layer.mlp.down_proj for layer in packed.model.layers]
    assert count == 6 * layers and all(isinstance(m, torch.nn.Linear) and has_online_hadamard(m) for m in down)
    assert isinstance(packed.model.layers[0].self_attn.q_proj, QuantLinear)
    torch.testing.assert_close(logits(packed), logits(dense), rtol=1e-5, atol=1e-5)


def test_vector_quantized_layers_of_a_lowbit_layout_export_run_as_vq_linear(tmp_path, monkeypatch):
    """The VQ layers take their places before the rest loads: their codes are never decoded."""
    from lowbit.formats.base import QuantizedWeight
    from tests.test_vq import VQ_RECIPE, quantized_tiny_llama

    model, qweights = quantized_tiny_llama(VQ_RECIPE)
    out = export(model, qweights, tmp_path / "out")
    decoded = []
    dequantize = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self: decoded.append(self) or dequantize(self))
    packed, _, count = load_packed(out)
    assert not decoded
    monkeypatch.undo()
    assert count == len(qweights)
    assert isinstance(packed.get_submodule("model.layers.0.mlp.down_proj"), VQLinear)
    torch.testing.assert_close(logits(packed), logits(model), rtol=1e-4, atol=1e-4)


@pytest.fixture
def tiny_int4_export(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A tiny random Llama with the embedded model's tokenizer, exported as int4 g32."""
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32)))
    return export(model, qweights, tmp_path / "int4", AutoTokenizer.from_pretrained(tiny_model_dir))


def test_generate_prints_the_speed_and_the_text(tiny_int4_export, capsys):
    assert main(["generate", str(tiny_int4_export), "--prompt", "The capital of France is", "--new-tokens", "6",
                 "--batch", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert all(measure in out for measure in ("tokens/s", "load s", "warm-up s", "prompt s", "2 x 6 greedy tokens on cpu",
                                              "fused"))
    # Each phase is announced as it starts: the warm-up can take a minute on a GPU.
    phases = [out.index(f"{phase}") for phase in ("loading ", "reading the prompt (2 x 5 tokens)",
                                                  "generating 2 x 6 tokens")]
    assert phases == sorted(phases) and phases[-1] < out.index("tokens/s")


def test_generate_decodes_through_a_coded_kv_cache_when_asked_or_stored(tiny_model_dir, tmp_path, capsys):
    """--kv-cache int8-token / fp8 decodes through that cache and says so; an export whose recipe
    names one does so by default, and --kv-cache none keeps the model's dtype. An intN cache in the
    recipe is noted and not applied."""
    import re

    def kv_row(printed: str) -> str:
        return re.findall(r"KV cache\s+[│|]\s+([\w-]+)", printed)[-1]  # the table's row

    common = ["--prompt", "The capital of France is", "--new-tokens", "4", "--device", "cpu"]
    assert main(["generate", str(tiny_model_dir), *common, "--kv-cache", "int8-token"]) == 0
    printed = capsys.readouterr().out
    assert kv_row(printed) == "int8-token" and re.search(r"KV cache MB\s+[│|]\s+\d+\.\d", printed)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more {i}" for i in range(300)))
    for n, cache in enumerate(("fp8", "int4")):
        out = tmp_path / f"export{n}"
        assert main(["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--kv-cache", cache,
                     "--out", str(out), "--eval-data", str(text), "--eval-seq-len", "32", "--windows", "1"]) == 0
        capsys.readouterr()
        assert main(["generate", str(out), *common]) == 0
        printed = capsys.readouterr().out
        if cache == "fp8":
            assert kv_row(printed) == "fp8"
            assert main(["generate", str(out), *common, "--kv-cache", "none"]) == 0
            assert kv_row(capsys.readouterr().out) == "float32"
        else:
            assert "is not applied here" in printed and kv_row(printed) == "float32"


def test_generate_reads_a_long_prompt_from_a_file(tiny_int4_export, tmp_path, capsys):
    """--prompt-file: the same continuation as --prompt, read in chunks; the prompt is not echoed.
    A missing file or one that is not text is one line of error."""
    text = " ".join(["The capital of France is Paris."] * 40)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(text, encoding="utf-8")
    common = ["--new-tokens", "4", "--device", "cpu"]
    assert main(["generate", str(tiny_int4_export), "--prompt", text, *common]) == 0
    inline = capsys.readouterr().out
    assert main(["generate", str(tiny_int4_export), "--prompt-file", str(prompt), *common]) == 0
    from_file = capsys.readouterr().out
    continuation = inline[inline.rindex(text) + len(text):]
    assert continuation.strip() and from_file.rstrip().endswith(continuation.rstrip())
    assert text not in from_file and "reading the prompt (1 x" in from_file
    assert main(["generate", str(tiny_int4_export), "--prompt-file", str(tmp_path / "missing.txt"), *common]) == 2
    assert "error: no prompt file at" in capsys.readouterr().out
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\xfa")
    assert main(["generate", str(tiny_int4_export), "--prompt-file", str(tmp_path / "binary.txt"), *common]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().out


def test_generate_on_cpu_runs_the_dense_reload_and_gives_its_tokens(tiny_int4_export):
    """On a CPU the int4 matmul is the reference one (it decodes the weight every call): dense is faster."""
    from lowbit.api import generate_text
    from lowbit.generate import StaticDecoder

    report = generate_text(str(tiny_int4_export), "Hello there", new_tokens=5, device="cpu")
    dense, tokenizer = load_quantized(tiny_int4_export)
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    decoder = StaticDecoder(dense, batch=1, max_len=ids.shape[1] + 5)
    decoder.prefill(ids)
    tokens = decoder.decode(5)[0].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    assert report.packed_layers == 0 and report.tokens == tokens
    assert report.text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_generate_refuses_an_empty_prompt_in_one_line(tiny_int4_export, capsys):
    assert main(["generate", str(tiny_int4_export), "--prompt", "", "--device", "cpu"]) == 2
    err = capsys.readouterr().out
    assert "error:" in err and "prompt is empty" in err and "Traceback" not in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_gpu_runs_the_codes_in_a_graph_as_the_dense_reload_does(tmp_path, dtype):
    """On CUDA, inside a captured step: float32 layers take the reference matmul (same tokens as the
    dense reload run without a graph); bfloat16 ones the Triton kernels (logits within a few of
    bf16's units of the dense model's: the kernels sum in another order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.api import generate_text
    from lowbit.generate import StaticDecoder

    words = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tiny_llama(dtype=dtype)
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32)))
    out = export(model, qweights, tmp_path / "out", PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>"))
    report = generate_text(str(out), "hello world", new_tokens=6, device="cuda")
    assert report.graph and report.fused_step and report.packed_layers == 14
    prompt = torch.tensor([[1, 2]], device="cuda")
    dense = StaticDecoder(load_quantized(out, device="cuda")[0], batch=1, max_len=8)
    dense.prefill(prompt)
    if dtype == torch.float32:
        assert report.tokens == dense.decode(6)[0].tolist()
    else:
        packed = StaticDecoder(load_packed(out, "cuda")[0], batch=1, max_len=8)
        packed.capture()
        packed.prefill(prompt)
        torch.testing.assert_close(packed.logits, dense.logits, rtol=5e-2, atol=5e-2)


def test_generate_chat_feeds_the_prompt_through_the_chat_template(tiny_int4_export):
    from lowbit.api import generate_text
    from lowbit.generate import StaticDecoder

    report = generate_text(str(tiny_int4_export), "Hi", new_tokens=4, device="cpu", chat=True)
    dense, tokenizer = load_quantized(tiny_int4_export)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    decoder = StaticDecoder(dense, batch=1, max_len=ids.shape[1] + 4)
    decoder.prefill(ids)
    tokens = decoder.decode(4)[0].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    assert report.tokens == tokens


def test_generate_chat_without_a_template_is_refused_in_one_line(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tiny_llama()
    out = export(model, quantize(model, per_layer(IntegerFormat(bits=4, group_size=32))), tmp_path / "out",
                 PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>"))
    assert main(["generate", str(out), "--chat", "--prompt", "hello", "--device", "cpu"]) == 2
    printed = capsys.readouterr().out
    assert "error:" in printed and "no chat template; drop --chat" in printed and "Traceback" not in printed
