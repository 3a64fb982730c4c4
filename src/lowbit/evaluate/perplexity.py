"""Perplexity and KL divergence over non-overlapping windows of an evaluation text.

The protocol of the GPTQ paper and most PTQ tables: the tokenized text is cut into consecutive
windows of `seq_len` tokens, the last partial window is dropped, every window is scored on its own
(no context carried over), and each position but the first is predicted. Sliding windows with
overlap give lower, slower numbers; they are not what published tables report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

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


class ReferenceLogProbs:
    """A reference model's log-probabilities on every evaluation window, computed once.

    Comparing many quantized models with one original (benchmarks, method grids) would otherwise
    run the original again for every comparison. Holding its log-probabilities costs
    windows x seq_len x vocab floats (3.2 GB for 8 windows of 2048 tokens over a 49k vocabulary),
    so it suits a handful of windows; `evaluate` with a reference model streams instead.
    """

    @torch.inference_mode()
    def __init__(self, model: nn.Module, tokens: torch.Tensor, seq_len: int = 2048,
                 max_windows: int | None = None, progress: bool = True) -> None:
        self.windows = windows_of(tokens, seq_len, max_windows)
        self.log_probs = [
            torch.log_softmax(model(input_ids=w[None].to(_device_of(model)), use_cache=False).logits[0, :-1].float(),
                              dim=-1).cpu()
            for w in tqdm(self.windows, desc="reference log-probabilities", unit="window", disable=not progress)
        ]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    reference: nn.Module | ReferenceLogProbs | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of `model` on `tokens`, and mean per-token KL(P_reference || P_model) if given.

    `reference` is the original model, or its precomputed ReferenceLogProbs on the same windows.
    Models run where their parameters are unless `device` is given, in which case they are moved
    there for the evaluation and back afterwards. `progress=False` hides the progress bar (callers
    that evaluate many times in a loop show their own).
    """
    start = time.perf_counter()
    batches = windows_of(tokens, seq_len, max_windows)
    cached = reference if isinstance(reference, ReferenceLogProbs) else None
    if cached is not None and not torch.equal(cached.windows, batches):
        raise ValueError("the reference log-probabilities were computed on other windows")
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
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            if cached is not None:
                ref_logits = cached.log_probs[index]  # log_softmax of log-probabilities is the identity
            elif reference is not None:
                ref_logits = reference(input_ids=ids.to(_device_of(reference)), use_cache=False).logits[0, :-1]
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
    )
