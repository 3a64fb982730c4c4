"""Scoring a window through a KV cache, so that quantized keys and values are what later tokens read.

A single forward pass over a window never reads a cache back: every token attends to exact keys
and values. To measure a quantized KV cache, each window is fed in consecutive chunks of `chunk`
tokens with one cache carried across them: the tokens of a chunk attend to each other exactly
(as a decoding step attends to its own token) and to every earlier chunk through the cache, that
is, dequantized except for the cache's full-precision recent window. `chunk=1` is token-by-token
decoding; larger chunks are faster and leave up to chunk - 1 more neighbours exact. The reference
is scored the same way through transformers' full-precision DynamicCache, which equals one
forward pass over the window up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.kv.spec import KVCacheSpec
from lowbit.models.cache_argument import with_cache

DEFAULT_CHUNK = 16
"""Tokens per forward pass when scoring through a cache: 128 passes per 2048-token window."""


@dataclass(frozen=True)
class CacheScoring:
    """Score windows chunk by chunk through a quantized cache (`spec`) or a full-precision one (None)."""

    spec: KVCacheSpec | None
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"the scoring chunk must be at least 1 token, got {self.chunk}")

    def full_precision(self) -> CacheScoring:
        """The same chunks through a full-precision cache: how the reference is scored."""
        return replace(self, spec=None)

    def describe(self) -> str:
        cache = "full-precision cache" if self.spec is None else self.spec.describe()
        return f"fed in chunks of {self.chunk} tokens through a {cache}"

    @torch.inference_mode()
    def logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Logits [tokens, vocab] of one window `ids` [1, tokens]."""
        from transformers import DynamicCache  # here, so that the CLI parses flags without loading transformers

        from lowbit.kv.cache import QuantizedKVCache

        cache = DynamicCache(config=model.config) if self.spec is None else QuantizedKVCache(model, self.spec)
        pieces = [
            model(input_ids=ids[:, begin : begin + self.chunk], use_cache=True, **with_cache(model, cache)).logits[0]
            for begin in range(0, ids.shape[1], self.chunk)
        ]
        return torch.cat(pieces)
