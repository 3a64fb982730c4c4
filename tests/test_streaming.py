"""Streaming from disk: the blocks read one at a time give the same export as the model in memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import tiny_llama_config
from lowbit.cli import main
from lowbit.models.loading import ModelSourceError
from lowbit.models.streaming import StreamedModel, should_stream


def export_files(folder: Path) -> dict[str, bytes]:
    files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    metadata = json.loads(files.pop("lowbit.json"))
    del metadata["created"]
    files["lowbit.json (but created)"] = json.dumps(metadata).encode()
    return files


@pytest.fixture(scope="module")
def untied_sharded_model(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny Llama with its own head, saved in several safetensors shards."""
    torch.manual_seed(1)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    model = LlamaForCausalLM(tiny_llama_config(
        tie_word_embeddings=False, intermediate_size=192, vocab_size=config["vocab_size"], max_position_embeddings=512,
    ))
    folder = tmp_path_factory.mktemp("untied")
    model.save_pretrained(folder, max_shard_size="5MB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_export_equals_in_memory_export(tmp_path, untied_sharded_model, wikitext, method):
    args = ["quantize", str(untied_sharded_model), "--method", method, "--group-size", "32", "--no-eval",
            "--calib", str(wikitext / "valid.txt"), "--samples", "4", "--seq-len", "32"]
    assert main([*args, "--offload", "none", "--out", str(tmp_path / "memory")]) == 0
    assert main([*args, "--offload", "disk", "--out", str(tmp_path / "disk")]) == 0
    assert export_files(tmp_path / "disk") == export_files(tmp_path / "memory")


def test_streamed_blocks_are_freed_after_use(untied_sharded_model):
    streamed = StreamedModel(str(untied_sharded_model))
    model = streamed.loaded.model
    blocks = streamed.architecture.block_list(model)
    assert all(p.is_meta for p in blocks.parameters())
    assert not model.get_input_embeddings().weight.is_meta and model.lm_head.weight.is_meta
    streamed.before_block(1, blocks[1])
    expected = {}
    for shard in untied_sharded_model.glob("*.safetensors"):
        expected |= load_file(shard)
    assert torch.equal(blocks[1].mlp.up_proj.weight, expected["model.layers.1.mlp.up_proj.weight"])
    assert all(p.is_meta for p in blocks[0].parameters())
    streamed.after_block(1, blocks[1], None)
    assert all(p.is_meta for p in blocks.parameters())


def test_nan_in_a_streamed_block_is_named(tmp_path, tiny_model_dir, capsys):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    code = main(["quantize", str(folder), "--method", "rtn", "--group-size", "32", "--offload", "disk",
                 "--out", str(tmp_path / "out"), "--no-eval"])
    assert code == 2
    assert "model.layers.1.self_attn.o_proj.weight contains 1 NaN/Inf" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_streaming_needs_a_safetensors_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="local model folder"):
        StreamedModel(str(tmp_path / "model.gguf"))


def test_auto_streams_only_what_does_not_fit(tiny_model_dir, monkeypatch):
    from lowbit.models import streaming

    assert not should_stream(str(tiny_model_dir), "auto")
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 1000)
    assert should_stream(str(tiny_model_dir), "auto")
    assert not should_stream(str(tiny_model_dir), "none")
    assert not should_stream(None, "auto")
