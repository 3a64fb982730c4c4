"""The main job on the Llama-layout families lowbit accepts besides Llama: Qwen2 (biased q/k/v),
Mistral and Qwen3 (per-head q and k norms). Rotations must keep each family's function; each is
quantized from a saved folder by the CLI, its export checked against the in-memory model (the
CLI's own reload check), scored, and decoded by `lowbit generate`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.models.architectures import architecture_of
from lowbit.transforms import MODEL_TRANSFORMS
from tests.conftest import tiny_family, with_norms_and_biases_drawn

OTHER_FAMILIES = ["qwen2", "mistral", "qwen3"]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("name", ["hadamard", "quarot"])
def test_rotations_keep_the_function(family, name):
    """Norms not ones (Qwen3's q and k norms included) and biases not zeros, so folding them matters."""
    model = with_norms_and_biases_drawn(tiny_family(family, seed=1))
    original = copy.deepcopy(model)
    MODEL_TRANSFORMS[name]().apply(model, architecture_of(model), lambda *_: None, None)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight,
                              original.model.layers[0].self_attn.q_proj.weight)


def save_family(family: str, folder: Path) -> Path:
    """A two-block random model of the family saved with the embedded model's tokenizer: a folder for the CLI."""
    from transformers import AutoTokenizer

    from lowbit.models.loading import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = tiny_family(family, intermediate_size=192, vocab_size=len(tokenizer), max_position_embeddings=512,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=OTHER_FAMILIES)
def family_dir(request, tmp_path_factory, has_default_model) -> Path:
    return save_family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_exports_scores_and_generates(capsys, tmp_path, family_dir, wikitext, method):
    out_dir = tmp_path / "out"
    code = main(["quantize", str(family_dir), "--method", method, "--group-size", "32", "--calib",
                 str(wikitext / "valid.txt"), "--samples", "4", "--seq-len", "64", "--eval-data",
                 str(wikitext / "test.txt"), "--eval-seq-len", "64", "--windows", "2", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "differ from the in-memory model by at most 0.00e+00" in out
    assert "perplexity" in out.lower()
    code = main(["generate", str(out_dir), "--prompt", "The capital of France is", "--new-tokens", "3",
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 greedy tokens on cpu" in out


def test_w4a4_scheme_on_qwen3_exports_and_reloads(capsys, tmp_path, wikitext, has_default_model):
    """QuaRot, int4 activations and the int4 KV cache on per-head q and k norms."""
    folder = save_family("qwen3", tmp_path / "qwen3")
    code = main(["quantize", str(folder), "--scheme", "w4a4", "--calib", str(wikitext / "valid.txt"), "--samples",
                 "4", "--seq-len", "64", "--out", str(tmp_path / "out"), "--no-eval"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "differ from the in-memory model by at most 0.00e+00" in out
