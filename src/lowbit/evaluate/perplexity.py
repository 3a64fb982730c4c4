"""Perplexity and KL divergence over non-overlapping windows of an evaluation text.

The protocol of the GPTQ paper and most PTQ tables: the tokenized text is cut into consecutive
windows of `seq_len` tokens, the last partial window is dropped, every window is scored on its own
(no context carried over), and each position but the first is predicted. Sliding windows with
overlap give lower, slower numbers; they are not what published tables report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.evaluate.kv_protocol import CacheScoring
from lowbit.kv.memory import AttentionShape, bytes_per_token

POSITIONS_PER_CHUNK = 512
"""Positions whose full-vocabulary log-probabilities are held at once (bounds memory for big vocabs)."""


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation; the reference's own perplexity comes free with the KL pass."""

    perplexity: float
    kl: float | None
    reference_perplexity: float | None
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    protocol: str = "one forward pass per window"
    cache_bytes_per_token: float | None = None
    """With a KV cache: bytes it holds per token at a context of seq_len (lowbit.kv.memory)."""
    fp16_cache_bytes_per_token: float | None = None


def windows_of(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seq_len] consecutive, non-overlapping windows; the partial tail is dropped."""
    count = tokens.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return tokens[: count * seq_len].reshape(count, seq_len)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _window_logits(model: nn.Module, ids: torch.Tensor, scoring: CacheScoring | None) -> torch.Tensor:
    """Logits [tokens, vocab] of window `ids` [1, tokens]: one forward pass, or chunks through a cache."""
    if scoring is None:
        return model(input_ids=ids, use_cache=False).logits[0]
    return scoring.logits(model, ids)


class ReferenceLogProbs:
    """A reference model's log-probabilities on every evaluation window, computed once.

    Comparing many quantized models with one original (benchmarks, method grids) would otherwise
    run the original again for every comparison. Holding its log-probabilities costs
    windows x seq_len x vocab floats (3.2 GB for 8 windows of 2048 tokens over a 49k vocabulary),
    so it suits a handful of windows; `evaluate` with a reference model streams instead.
    With `kv_cache`, the windows are scored chunk by chunk through a full-precision cache, the
    reference protocol for quantized KV caches scored with the same chunks.
    """

    @torch.inference_mode()
    def __init__(self, model: nn.Module, tokens: torch.Tensor, seq_len: int = 2048,
                 max_windows: int | None = None, kv_cache: CacheScoring | None = None,
                 progress: bool = True) -> None:
        self.windows = windows_of(tokens, seq_len, max_windows)
        self.scoring = None if kv_cache is None else kv_cache.full_precision()
        self.log_probs = [
            torch.log_softmax(_window_logits(model, w[None].to(_device_of(model)), self.scoring)[:-1].float(),
                              dim=-1).cpu()
            for w in tqdm(self.windows, desc="reference log-probabilities", unit="window", disable=not progress)
        ]

    @property
    def scored_tokens(self) -> int:
        """Positions scored: every position of each window but its first."""
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    def perplexity(self) -> float:
        """The reference model's own perplexity on these windows, from the stored log-probabilities
        (a benchmark's "original" row needs no second pass over the original)."""
        nll = sum(-float(log_probs.gather(1, window[1:, None]).sum()) for window, log_probs in
                  zip(self.windows, self.log_probs))
        return math.exp(nll / self.scored_tokens)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    reference: nn.Module | ReferenceLogProbs | None = None,
    device: torch.device | str | None = None,
    kv_cache: CacheScoring | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of `model` on `tokens`, and mean per-token KL(P_reference || P_model) if given.

    `reference` is the original model, or its precomputed ReferenceLogProbs on the same windows.
    Models run where their parameters are unless `device` is given, in which case they are moved
    there for the evaluation and back afterwards. `kv_cache` scores the model through a cache
    (lowbit.evaluate.kv_protocol) and the reference through a full-precision one, same chunks.
    `progress=False` hides the progress bar (callers that evaluate many times in a loop show their own).
    """
    start = time.perf_counter()
    batches = windows_of(tokens, seq_len, max_windows)
    cached = reference if isinstance(reference, ReferenceLogProbs) else None
    reference_scoring = None if kv_cache is None else kv_cache.full_precision()
    if cached is not None and not torch.equal(cached.windows, batches):
        raise ValueError("the reference log-probabilities were computed on other windows")
    if cached is not None and cached.scoring != reference_scoring:
        raise ValueError("the reference log-probabilities were scored with another protocol; build them with "
                         "the same kv_cache scoring")
    models = [m for m in (model, reference) if isinstance(m, nn.Module)]
    homes = [_device_of(m) for m in models]
    if device is not None:
        for m in models:
            m.to(device)
    nll = ref_nll = kl = 0.0
    scored = 0
    try:
        for index, window in enumerate(tqdm(batches, desc="evaluating", unit="window", disable=not progress)):
            ids = window.unsqueeze(0).to(_device_of(model))
            logits = _window_logits(model, ids, kv_cache)[:-1]
            if cached is not None:
                ref_logits = cached.log_probs[index]  # log_softmax of log-probabilities is the identity
            elif reference is not None:
                ref_logits = _window_logits(reference, ids.to(_device_of(reference)), reference_scoring)[:-1]
            else:
                ref_logits = None
            targets = ids[0, 1:]
            for begin in range(0, targets.numel(), POSITIONS_PER_CHUNK):
                end = begin + POSITIONS_PER_CHUNK
                log_probs = torch.log_softmax(logits[begin:end].float(), dim=-1)
                nll -= float(log_probs.gather(-1, targets[begin:end, None]).sum())
                if ref_logits is not None:
                    ref_log_probs = torch.log_softmax(ref_logits[begin:end].float().to(log_probs.device), dim=-1)
                    ref_nll -= float(ref_log_probs.gather(-1, targets[begin:end, None]).sum())
                    kl += float((ref_log_probs.exp() * (ref_log_probs - log_probs)).sum())
            scored += targets.numel()
    finally:
        if device is not None:
            for m, home in zip(models, homes):
                m.to(home)
    return EvalResult(
        perplexity=float(torch.tensor(nll / scored).exp()),
        kl=None if reference is None else kl / scored,
        reference_perplexity=None if reference is None else float(torch.tensor(ref_nll / scored).exp()),
        tokens=scored,
        windows=batches.shape[0],
        seq_len=seq_len,
        seconds=time.perf_counter() - start,
        **({} if kv_cache is None else _cache_fields(model, kv_cache, seq_len)),
    )


def _cache_fields(model: nn.Module, kv_cache: CacheScoring, seq_len: int) -> dict:
    shape = AttentionShape.of_config(model.config)
    return {
        "protocol": kv_cache.describe(),
        "cache_bytes_per_token": bytes_per_token(shape, kv_cache.spec, seq_len),
        "fp16_cache_bytes_per_token": bytes_per_token(shape, None, seq_len),
    }
