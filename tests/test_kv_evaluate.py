"""Scoring through a quantized KV cache: the protocol, the recipe field, the CLI and the export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from lowbit.cli import main
from lowbit.evaluate import ReferenceLogProbs, evaluate
from lowbit.evaluate.kv_protocol import CacheScoring
from lowbit.kv import KVCacheSpec
from lowbit.recipes import Recipe

SEQ_LEN = 48


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2 * SEQ_LEN,), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_full_precision_chunks_equal_one_forward_pass(tiny_model, tokens):
    ids = tokens[None, :SEQ_LEN]
    whole = tiny_model(input_ids=ids, use_cache=False).logits[0]
    chunked = CacheScoring(None, chunk=5).logits(tiny_model, ids)
    assert torch.allclose(chunked, whole, atol=1e-5)


@torch.no_grad()
def test_later_chunks_read_quantized_entries_from_the_cache(tiny_model, tokens):
    ids = tokens[None, :SEQ_LEN]
    whole = tiny_model(input_ids=ids, use_cache=False).logits[0]
    chunk = 8
    got = CacheScoring(KVCacheSpec(bits=2, group_size=8, residual=0), chunk=chunk).logits(tiny_model, ids)
    assert torch.allclose(got[:chunk], whole[:chunk], atol=1e-5)  # the first chunk attends only to itself
    assert (got[chunk:] - whole[chunk:]).abs().amax(dim=-1).min() > 1e-3  # every later token reads codes


def test_kl_grows_as_bits_shrink_and_the_reference_is_shared(tiny_model, tokens):
    scoring = {bits: CacheScoring(KVCacheSpec(bits=bits, group_size=8, residual=4), chunk=4) for bits in (8, 2)}
    reference = ReferenceLogProbs(tiny_model, tokens, SEQ_LEN, kv_cache=scoring[8])
    results = {bits: evaluate(tiny_model, tokens, SEQ_LEN, reference=reference, kv_cache=s)
               for bits, s in scoring.items()}
    assert 0 < results[8].kl < results[2].kl
    assert results[8].kl < 1e-3
    streamed = evaluate(tiny_model, tokens, SEQ_LEN, reference=tiny_llama(), kv_cache=scoring[2])
    assert streamed.kl > 0 and "chunks of 4 tokens" in streamed.protocol
    assert results[2].cache_bytes_per_token < results[8].cache_bytes_per_token < results[8].fp16_cache_bytes_per_token
    with pytest.raises(ValueError, match="another protocol"):
        evaluate(tiny_model, tokens, SEQ_LEN, reference=reference)


def test_recipe_stores_the_kv_cache_and_dumps_as_before_without_it(tmp_path):
    assert "kv_cache" not in Recipe().model_dump()
    recipe = Recipe(kv_cache=KVCacheSpec(bits=2, group_size=32, residual=64, pre_rope=True))
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == recipe
    assert "KV int2 g32 residual 64, pre-RoPE keys" in recipe.describe()


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_kv_flags_without_a_width_are_refused(capsys, tiny_model_dir):
    code, out = run_cli(capsys, "eval", str(tiny_model_dir), "--kv-residual", "4")
    assert code == 2 and "--kv-residual needs --kv-cache" in out
    code, out = run_cli(capsys, "eval", str(tiny_model_dir), "--kv-bits", "2", "--kv-group", "6")
    assert code == 2 and "multiple of 4" in out


def test_quantize_stores_the_kv_cache_and_eval_uses_it(capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(400)))
    out_dir = tmp_path / "out"
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32",
                        "--kv-cache", "int4", "--kv-group", "8", "--kv-residual", "4", "--kv-chunk", "8",
                        "--out", str(out_dir), "--eval-data", str(text), "--eval-seq-len", "32", "--windows", "1")
    assert code == 0, out
    assert "KV cache bytes/token" in out and "chunks of 8 tokens" in out
    saved = json.loads((out_dir / "lowbit.json").read_text())["metadata"]["recipe"]["kv_cache"]
    assert saved == {"kind": "int", "bits": 4, "group_size": 8, "residual": 4, "pre_rope": False}
    code, out = run_cli(capsys, "eval", str(out_dir), "--data", str(text), "--seq-len", "32", "--windows", "1",
                        "--kv-chunk", "8")
    assert code == 0, out
    assert "KV int4 g8 residual 4" in out and "bytes/token" in out
    code, out = run_cli(capsys, "eval", str(out_dir), "--data", str(text), "--seq-len", "32", "--windows", "1",
                        "--kv-cache", "none")
    assert code == 0, out
    assert "one forward pass per window" in out and "bytes/token" not in out
    code, out = run_cli(capsys, "eval", str(tiny_model_dir), "--data", str(text), "--seq-len", "32", "--windows",
                        "1", "--kv-bits", "2", "--kv-group", "8", "--kv-residual", "0", "--kv-pre-rope")
    assert code == 0, out
    assert "KV int2 g8 residual 0, pre-RoPE keys" in out


def test_an_fp8_cache_is_stored_evaluated_and_refuses_integer_settings(capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(400)))
    out_dir = tmp_path / "out"
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32",
                        "--kv-cache", "fp8", "--kv-chunk", "8", "--out", str(out_dir), "--eval-data", str(text),
                        "--eval-seq-len", "32", "--windows", "1")
    assert code == 0, out
    assert "KV fp8 (e4m3, a scale per token and head)" in out and "chunks of 8 tokens" in out
    saved = json.loads((out_dir / "lowbit.json").read_text())["metadata"]["recipe"]["kv_cache"]
    assert KVCacheSpec.model_validate(saved) == KVCacheSpec(kind="fp8")
    code, out = run_cli(capsys, "eval", str(tiny_model_dir), "--data", str(text), "--seq-len", "32", "--windows", "1",
                        "--kv-cache", "fp8", "--kv-residual", "4")
    assert code == 2 and "the fp8 KV cache" in out and "takes no residual setting" in out


def test_coded_caches_cost_less_than_int2_and_more_than_nothing(tiny_model, tokens):
    """KL against the full-precision cache, scored the same way: e4m3's 3 mantissa bits a number
    sit between int8's 255 levels (grouped or a row at a time) and int2's 4."""
    scoring = {name: CacheScoring(spec, chunk=4) for name, spec in (
        ("fp8", KVCacheSpec(kind="fp8")), ("int8", KVCacheSpec(bits=8, group_size=8, residual=0)),
        ("int8-token", KVCacheSpec(kind="int8-token")), ("int2", KVCacheSpec(bits=2, group_size=8, residual=0)))}
    reference = ReferenceLogProbs(tiny_model, tokens, SEQ_LEN, kv_cache=scoring["fp8"])
    kl = {name: evaluate(tiny_model, tokens, SEQ_LEN, reference=reference, kv_cache=s).kl
          for name, s in scoring.items()}
    assert max(kl["int8"], kl["int8-token"]) < kl["fp8"] < kl["int2"] and kl["fp8"] > 1e-7, kl
