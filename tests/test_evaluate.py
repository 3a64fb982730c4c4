"""Perplexity and KL divergence against slow, obvious versions of the same definitions."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from conftest import tiny_llama

from lowbit.evaluate import ReferenceLogProbs, evaluate, windows_of

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """Five full windows of SEQ_LEN tokens and a partial tail of 7."""
    return torch.randint(0, 256, (5 * SEQ_LEN + 7,), generator=torch.Generator().manual_seed(0))


def perturbed(model, scale: float = 0.5, seed: int = 1):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return other


@torch.no_grad()
def next_token_log_probs(model, window: torch.Tensor) -> list[torch.Tensor]:
    """log P(. | window[:t]) for t = 1 .. len-1, each from its own forward pass over the prefix alone."""
    return [
        torch.log_softmax(model(input_ids=window[None, :t], use_cache=False).logits[0, -1].double(), dim=-1)
        for t in range(1, window.numel())
    ]


def slow_scores(model, tokens: torch.Tensor, seq_len: int, reference=None) -> tuple[float, float | None, int]:
    """Perplexity and mean KL(reference || model) by the textbook definitions, one prefix at a time."""
    nll, kl, count = 0.0, 0.0, 0
    for start in range(0, tokens.numel() - seq_len + 1, seq_len):
        window = tokens[start : start + seq_len]
        log_q = next_token_log_probs(model, window)
        log_p = next_token_log_probs(reference, window) if reference is not None else None
        for t in range(1, seq_len):
            nll -= float(log_q[t - 1][window[t]])
            if log_p is not None:
                kl += float((log_p[t - 1].exp() * (log_p[t - 1] - log_q[t - 1])).sum())
            count += 1
    return math.exp(nll / count), (kl / count if reference is not None else None), count


def test_windows_are_consecutive_and_the_tail_is_dropped(tokens):
    windows = windows_of(tokens, SEQ_LEN)
    assert windows.shape == (5, SEQ_LEN)
    assert torch.equal(windows.flatten(), tokens[: 5 * SEQ_LEN])
    assert windows_of(tokens, SEQ_LEN, max_windows=2).shape == (2, SEQ_LEN)
    with pytest.raises(ValueError, match="has 12 tokens, fewer than one window of 16"):
        windows_of(tokens[:12], SEQ_LEN)


def test_perplexity_matches_the_definition(tokens):
    model = tiny_llama()
    short = tokens[: 3 * SEQ_LEN - 1]  # two full windows and a partial one
    result = evaluate(model, short, seq_len=SEQ_LEN)
    expected, _, count = slow_scores(model, short, SEQ_LEN)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.kl is None and result.reference_perplexity is None
    assert (result.tokens, result.windows, result.seq_len) == (count, 2, SEQ_LEN) == (2 * (SEQ_LEN - 1), 2, SEQ_LEN)
    assert result.seconds > 0


def test_windows_are_scored_independently_and_the_tail_is_ignored(tokens):
    """Scoring a window must not depend on what precedes it, nor on the partial tail after the last one."""
    model = tiny_llama()
    whole = evaluate(model, tokens, seq_len=SEQ_LEN)
    without_tail = evaluate(model, tokens[: 5 * SEQ_LEN], seq_len=SEQ_LEN)
    last_alone = evaluate(model, tokens[4 * SEQ_LEN : 5 * SEQ_LEN], seq_len=SEQ_LEN)
    first_four = evaluate(model, tokens, seq_len=SEQ_LEN, max_windows=4)
    assert whole.perplexity == without_tail.perplexity
    total_nll = math.log(first_four.perplexity) * first_four.tokens + math.log(last_alone.perplexity) * last_alone.tokens
    assert math.log(whole.perplexity) * whole.tokens == pytest.approx(total_nll, rel=1e-6)


def test_kl_of_a_model_to_itself_is_zero(tokens):
    model = tiny_llama()
    result = evaluate(model, tokens, seq_len=SEQ_LEN, reference=copy.deepcopy(model))
    assert abs(result.kl) < 1e-6
    assert result.reference_perplexity == pytest.approx(result.perplexity, rel=1e-6)


def test_kl_to_a_perturbed_copy_matches_the_definition(tokens):
    reference = tiny_llama()
    model = perturbed(reference)
    short = tokens[: 2 * SEQ_LEN]
    result = evaluate(model, short, seq_len=SEQ_LEN, reference=reference)
    expected_ppl, expected_kl, _ = slow_scores(model, short, SEQ_LEN, reference=reference)
    reference_ppl, _, _ = slow_scores(reference, short, SEQ_LEN)
    assert result.kl > 1e-3
    # fp32 log-probabilities: the error is ~1e-7 per token in absolute terms, whatever the KL
    assert result.kl == pytest.approx(expected_kl, rel=1e-4, abs=1e-6)
    assert result.perplexity == pytest.approx(expected_ppl, rel=1e-5)
    assert result.reference_perplexity == pytest.approx(reference_ppl, rel=1e-5)


def test_kl_is_not_symmetric(tokens):
    """KL(P_reference || P_model), not the other way round: swapping the models changes the number."""
    a = tiny_llama()
    b = perturbed(a)
    forward = evaluate(b, tokens, seq_len=SEQ_LEN, reference=a).kl
    backward = evaluate(a, tokens, seq_len=SEQ_LEN, reference=b).kl
    assert forward > 0 and backward > 0 and forward != pytest.approx(backward, rel=1e-3)


def test_precomputed_reference_gives_the_same_scores(tokens):
    reference = tiny_llama()
    model = perturbed(reference)
    streamed = evaluate(model, tokens, seq_len=SEQ_LEN, reference=reference)
    cached = evaluate(model, tokens, seq_len=SEQ_LEN, reference=ReferenceLogProbs(reference, tokens, SEQ_LEN))
    assert cached.kl == pytest.approx(streamed.kl, rel=1e-5, abs=1e-6)
    assert cached.perplexity == pytest.approx(streamed.perplexity, rel=1e-6)
    stored = ReferenceLogProbs(reference, tokens, SEQ_LEN)
    assert stored.perplexity() == pytest.approx(slow_scores(reference, tokens, SEQ_LEN)[0], rel=1e-5)
    assert stored.scored_tokens == streamed.tokens
    with pytest.raises(ValueError, match="other windows"):
        evaluate(model, tokens, seq_len=SEQ_LEN, reference=ReferenceLogProbs(reference, tokens, SEQ_LEN, max_windows=2))


@pytest.mark.slow
def test_smollm2_wikitext_perplexity_is_plausible(has_default_model, wikitext):
    """Two windows of the real model on WikiText-2 test: a sane perplexity, no KL to itself, in bounded time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.calibrate.data import load_text, tokenize_text
    from lowbit.models.loading import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = tokenize_text(tokenizer, load_text(str(wikitext / "test.txt")))
    start = time.perf_counter()
    result = evaluate(model, ids, seq_len=512, max_windows=2, reference=model)
    assert time.perf_counter() - start < 120
    assert 5 < result.perplexity < 100
    assert abs(result.kl) < 1e-6
