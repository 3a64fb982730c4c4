"""The whole job on the embedded model: quantize, export, reload with plain transformers, evaluate."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lowbit.api import Settings, quantize
from lowbit.cli import main
from lowbit.recipes import preset


@pytest.mark.slow
@pytest.mark.ci
def test_default_recipe_on_the_embedded_model(tmp_path, wikitext, has_default_model, capsys):
    out = tmp_path / "smollm2-w4"
    settings = Settings(
        calib=str(wikitext / "valid.txt"), samples=16, seq_len=256,
        eval_data=str(wikitext / "test.txt"), eval_seq_len=512, eval_windows=2,
    )
    report = quantize(None, preset("w4a16"), out, settings)

    # Every block linear of SmolLM2 (30 x 7) is quantized; 4 bits + a float16 scale per 64/128 columns.
    assert report.linear_size.parameters == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert 4.1 < report.linear_size.bits_per_weight < 4.3
    result = report.evaluation_result
    assert result.perplexity < 1.5 * result.reference_perplexity
    assert 0 < result.kl < 0.5
    assert report.export_max_abs_diff == 0.0
    # SmolLM2 ties lm_head to the embeddings: the export stores the matrix once, as transformers would.
    with safe_open(out / "model.safetensors", "pt") as shard:
        assert "model.embed_tokens.weight" in shard.keys() and "lm_head.weight" not in shard.keys()

    # Plain transformers (compressed-tensors installed) loads the export and gives the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = report.quantized_model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert (expected - got).abs().max() < 1e-4

    # `lowbit eval` on the export reproduces the perplexity the quantize report gave.
    code = main(["eval", str(out), "--data", str(wikitext / "test.txt"), "--seq-len", "512", "--windows", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"{result.perplexity:.3f}" in printed
