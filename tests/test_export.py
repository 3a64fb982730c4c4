"""compressed-tensors export: what transformers loads back must be exactly lowbit's in-memory model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lowbit.export import (
    CompressedTensorsWriter,
    ExportError,
    check_export_folder,
    check_exportable,
    load_quantized,
)
from lowbit.formats.base import QuantizedWeight
from lowbit.formats.integer import IntegerFormat
from lowbit.solvers.rtn import RTN
from tests.conftest import tiny_llama_config

FormatFor = Callable[[str], IntegerFormat]


def tiny_llama(tie: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tie)).eval()
    for param in model.parameters():  # not model.to(dtype): transformers keeps rotary buffers in float32
        param.data = param.data.to(dtype)
    return model


def quantize(model: LlamaForCausalLM, fmt_for: FormatFor) -> dict[str, QuantizedWeight]:
    """RTN every linear but lm_head and put the dequantized weights into the model, as the pipeline does."""
    qweights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            qweights[name] = RTN().solve(module.weight.data, fmt_for(name))
            module.weight.data = qweights[name].dequantize().to(module.weight.dtype)
    return qweights


def unquantized(model: LlamaForCausalLM, qweights: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in qweights}


def export(
    model: LlamaForCausalLM,
    qweights: dict[str, QuantizedWeight],
    out: Path,
    tokenizer: PreTrainedTokenizerFast | None = None,
    generation_config: GenerationConfig | None = None,
    **writer_options,
) -> Path:
    with CompressedTensorsWriter(out, **writer_options) as writer:
        for name, qweight in qweights.items():
            writer.add_quantized(name, qweight)
        writer.add_tensors(unquantized(model, qweights))
        recipe = {"recipe": {"method": "rtn"}}
        return writer.finish(model.config, tokenizer, generation_config, extra_metadata=recipe)


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def assert_reloads_exactly(model: LlamaForCausalLM, qweights: dict[str, QuantizedWeight], out: Path) -> None:
    loaded, tokenizer = load_quantized(out)
    assert tokenizer is None
    for name in qweights:
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight), name
    assert torch.equal(logits(loaded), logits(model))


def per_layer(fmt: IntegerFormat) -> FormatFor:
    return lambda name: fmt


def mixed(name: str) -> IntegerFormat:
    """Different settings per layer, kept equal within what vLLM fuses (q/k/v, gate/up)."""
    if ".mlp.down_proj" in name:
        return IntegerFormat(bits=8, symmetric=True, group_size=-1)
    if ".mlp." in name:
        return IntegerFormat(bits=4, symmetric=False, group_size=64, scale_dtype=torch.bfloat16)
    if "layers.0." in name:
        return IntegerFormat(bits=4, symmetric=False, group_size=32)
    return IntegerFormat(bits=3, symmetric=True, group_size=16)


CASES = {
    "int4-asym-g32": per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32)),
    "int4-sym-g32": per_layer(IntegerFormat(bits=4, symmetric=True, group_size=32)),
    "int4-asym-channel": per_layer(IntegerFormat(bits=4, symmetric=False, group_size=-1)),
    "int8-sym-channel": per_layer(IntegerFormat(bits=8, symmetric=True, group_size=-1)),
    "int2-asym-g32": per_layer(IntegerFormat(bits=2, symmetric=False, group_size=32)),
    "int3-asym-g32": per_layer(IntegerFormat(bits=3, symmetric=False, group_size=32)),
    "int6-asym-g16-bf16-scales": per_layer(
        IntegerFormat(bits=6, symmetric=False, group_size=16, scale_dtype=torch.bfloat16)
    ),
    "int4-asym-tensor": per_layer(IntegerFormat(bits=4, symmetric=False, group_size=0)),
    "mixed": mixed,
}


@pytest.mark.parametrize("fmt_for", CASES.values(), ids=CASES.keys())
def test_reload_matches_in_memory_model(tmp_path: Path, fmt_for: FormatFor) -> None:
    model = tiny_llama()
    qweights = quantize(model, fmt_for)
    assert_reloads_exactly(model, qweights, export(model, qweights, tmp_path / "out"))


def test_tied_embeddings_reload_tied(tmp_path: Path) -> None:
    model = tiny_llama(tie=True)
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32)))
    out = export(model, qweights, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]
    assert_reloads_exactly(model, qweights, out)
    loaded, _ = load_quantized(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_plain_transformers_loads_symmetric_export(tmp_path: Path) -> None:
    """The path a user without lowbit takes: from_pretrained, decompression on the first forward."""
    model = tiny_llama()
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=True, group_size=32)))
    loaded = AutoModelForCausalLM.from_pretrained(export(model, qweights, tmp_path / "out"))
    assert torch.equal(logits(loaded), logits(model))


def test_bfloat16_model_gets_bfloat16_config_and_exact_weights(tmp_path: Path) -> None:
    model = tiny_llama(dtype=torch.bfloat16)
    fmt = IntegerFormat(bits=4, symmetric=False, group_size=32, scale_dtype=torch.bfloat16)
    qweights = quantize(model, per_layer(fmt))
    out = export(model, qweights, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = load_quantized(out)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))


def test_float16_scales_in_bfloat16_model_warn(tmp_path: Path) -> None:
    model = tiny_llama(dtype=torch.bfloat16)
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=True, group_size=32)))
    with pytest.warns(UserWarning, match="rounds them"):
        export(model, qweights, tmp_path / "out")


def test_config_metadata_and_shards(tmp_path: Path) -> None:
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "type": "Q4_K_M"}  # as a GGUF-loaded model has
    qweights = quantize(model, mixed)
    out = export(model, qweights, tmp_path / "out", max_shard_bytes=100_000)

    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == "pack-quantized"
    assert quant["quantization_status"] == "compressed"
    assert quant["ignore"] == ["lm_head"]
    assert config["dtype"] == config["torch_dtype"] == "float32"
    targets = [name for group in quant["config_groups"].values() for name in group["targets"]]
    assert sorted(targets) == sorted(qweights)
    assert len(quant["config_groups"]) == 4

    metadata = json.loads((out / "lowbit.json").read_text())
    assert metadata["metadata"] == {"recipe": {"method": "rtn"}}
    assert set(metadata["versions"]) == {"torch", "transformers", "compressed_tensors", "safetensors"}

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(path.name for path in out.glob("*.safetensors")) == shards
    assert_reloads_exactly(model, qweights, out)


def test_tokenizer_and_generation_config_travel(tmp_path: Path) -> None:
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")
    model = tiny_llama()
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=True, group_size=32)))
    out = export(model, qweights, tmp_path / "out", tokenizer, GenerationConfig(max_new_tokens=7))
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    _, loaded_tokenizer = load_quantized(out)
    assert loaded_tokenizer is not None and loaded_tokenizer("hello world")["input_ids"] == [1, 2]


def test_permuted_group_index_is_refused(tmp_path: Path) -> None:
    """compressed-tensors 0.20 removed g_idx (act-order "group"): such a weight has no layout."""
    fmt = IntegerFormat(bits=4, symmetric=False, group_size=16)
    rows, columns = 32, 64
    generator = torch.Generator().manual_seed(0)
    qweight = QuantizedWeight(
        format=fmt,
        codes=torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator),
        scale=torch.rand(rows, columns // 16, generator=generator).half() + 0.01,
        zero=torch.randint(0, 16, (rows, columns // 16), generator=generator).float(),
        group_index=(torch.arange(columns) // 16)[torch.randperm(columns, generator=generator)],
    )
    with CompressedTensorsWriter(tmp_path / "out") as writer:
        with pytest.raises(ExportError, match="g_idx"):
            writer.add_quantized("model.layers.0.mlp.up_proj", qweight)
        writer.abort()
    assert check_exportable(fmt, columns, permuted_groups=True) is not None
    assert check_exportable(fmt, columns) is None


def test_group_size_must_divide_in_features(tmp_path: Path) -> None:
    fmt = IntegerFormat(bits=4, symmetric=True, group_size=48)
    problem = check_exportable(fmt, 64, "model.layers.0.self_attn.o_proj")
    assert problem is not None and "model.layers.0.self_attn.o_proj" in problem and "16, 32, 64" in problem
    qweight = RTN().solve(torch.randn(64, 64), fmt)
    with CompressedTensorsWriter(tmp_path / "out") as writer:
        with pytest.raises(ExportError, match="does not divide in_features=64"):
            writer.add_quantized("model.layers.0.self_attn.o_proj", qweight)
        writer.abort()


def test_non_empty_out_dir_is_refused_then_replaced_only_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me until the new export is complete")
    with pytest.raises(ExportError, match="not empty") as refused:
        CompressedTensorsWriter(out)
    assert "\n" not in str(refused.value)

    model = tiny_llama()
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=True, group_size=32)))
    with CompressedTensorsWriter(out, overwrite=True) as writer:
        for name, qweight in qweights.items():
            writer.add_quantized(name, qweight)
        writer.add_tensors(unquantized(model, qweights))
        assert (out / "old.txt").exists()
        writer.finish(model.config)
    assert not (out / "old.txt").exists()
    assert check_export_folder(out) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_exception_mid_export_leaves_no_folder(tmp_path: Path) -> None:
    model = tiny_llama()
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=True, group_size=32)))
    with pytest.raises(RuntimeError, match="solver crashed"):
        with CompressedTensorsWriter(tmp_path / "out") as writer:
            writer.add_quantized("model.layers.0.self_attn.q_proj", qweights["model.layers.0.self_attn.q_proj"])
            raise RuntimeError("solver crashed")
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_fails_finish_and_leaves_no_folder(tmp_path: Path) -> None:
    model = tiny_llama()
    qweights = quantize(model, per_layer(IntegerFormat(bits=4, symmetric=True, group_size=32)))
    writer = CompressedTensorsWriter(tmp_path / "out")
    for name, qweight in qweights.items():
        writer.add_quantized(name, qweight)
    writer.add_tensors({k: v for k, v in unquantized(model, qweights).items() if k != "model.norm.weight"})
    with pytest.raises(ExportError, match="model.norm.weight"):
        writer.finish(model.config)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="already finished"):
        writer.add_tensors({"model.norm.weight": model.model.norm.weight})


def test_loader_refuses_incomplete_folders(tmp_path: Path) -> None:
    def refused(path: Path, match: str) -> None:
        with pytest.raises(ExportError, match=match) as error:
            load_quantized(path)
        assert "\n" not in str(error.value)

    refused(tmp_path / "absent", "not a directory")
    folder = tmp_path / "folder"
    folder.mkdir()
    refused(folder, "no config.json")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    refused(folder, "not a compressed-tensors export")
    config = {"quantization_config": {"quant_method": "compressed-tensors"}}
    (folder / "config.json").write_text(json.dumps(config))
    refused(folder, "no weights")
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(folder, "model-00002-of-00002.safetensors")


def test_the_reloaded_model_moves_as_a_whole(tmp_path: Path) -> None:
    """compressed-tensors loads every module's tensors into an offload cache that copies them back
    where they came from, so model.to(cuda) kept them on the CPU; the loader hands back plain modules."""
    model = tiny_llama()
    out = export(model, quantize(model, per_layer(IntegerFormat(bits=4, symmetric=False, group_size=32))),
                 tmp_path / "out")
    loaded, _ = load_quantized(out)
    loaded.to("meta")
    assert {tensor.device.type for tensor in [*loaded.parameters(), *loaded.buffers()]} == {"meta"}


@pytest.mark.parametrize("columns", [64, 36])
def test_int4_words_are_compressed_tensors_own(columns: int) -> None:
    """4-bit codes are packed by lowbit's byte-wise packer where in_features is a multiple of 8, by
    compressed-tensors' otherwise: the words must be the ones compressed-tensors writes either way."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from lowbit.export.layout import pack_layer

    codes = torch.randint(0, 16, (24, columns), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    codes[0, :16] = torch.arange(16, dtype=torch.uint8)
    fmt = IntegerFormat(4, symmetric=True, group_size=-1)
    qweight = QuantizedWeight(fmt, codes, torch.rand(24, 1) + 0.5, None, torch.zeros(columns, dtype=torch.long))
    _, tensors = pack_layer("layer", qweight)
    expected = pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4)
    assert torch.equal(tensors["layer.weight_packed"], expected)
