"""Bytes a KV cache holds per token: full precision versus quantized, every stored number counted.

Counted per layer and key/value head: packed codes, a float16 scale and minimum per group, the
exact recent window at the model's storage width (2 bytes: fp16/bf16 serving) and, for pre-RoPE
keys, an int32 position per token and layer. The window makes short contexts cost more per token;
`bytes_per_token` is the total at a given context length divided by that length. A row-coded
cache (int8-token, fp8) holds a byte a number and a float32 scale per token and head (kv/row_codes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kv.quantizer import PARAM_DTYPE
from lowbit.kv.row_codes import CODES, SCALE_DTYPE
from lowbit.kv.spec import KVCacheSpec

POSITION_DTYPE = torch.int32
"""Stored positions of pre-RoPE keys (4 bytes per token and layer)."""

FULL_PRECISION_BYTES = 2
"""Bytes per cached number in an fp16/bf16 cache."""


@dataclass(frozen=True)
class AttentionShape:
    """What a KV cache's size depends on: layers, key/value heads, head dimension."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of_config(cls, config) -> AttentionShape:
        config = config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def cache_bytes(shape: AttentionShape, spec: KVCacheSpec | None, tokens: int,
                window_bytes: int = FULL_PRECISION_BYTES) -> int:
    """Bytes of a cache holding `tokens` tokens of one sequence (None: a full-precision cache)."""
    exact_entry = shape.head_dim * window_bytes
    if spec is None:
        return 2 * shape.layers * shape.kv_heads * tokens * exact_entry
    if spec.kind in CODES:
        row = shape.head_dim * CODES[spec.kind].itemsize + SCALE_DTYPE.itemsize
        return 2 * shape.layers * shape.kv_heads * tokens * row
    param = PARAM_DTYPE.itemsize * 2  # scale and minimum
    beyond_window = max(tokens - spec.residual, 0)
    quantized_values = beyond_window
    quantized_keys = beyond_window // spec.group_size * spec.group_size
    value_group = min(spec.group_size, shape.head_dim)
    codes = shape.head_dim * spec.bits // 8
    values = quantized_values * (codes + shape.head_dim // value_group * param)
    keys = quantized_keys * codes + quantized_keys // spec.group_size * shape.head_dim * param
    exact = (2 * tokens - quantized_values - quantized_keys) * exact_entry
    positions = tokens * POSITION_DTYPE.itemsize if spec.pre_rope else 0
    return shape.layers * (shape.kv_heads * (values + keys + exact) + positions)


def bytes_per_token(shape: AttentionShape, spec: KVCacheSpec | None, tokens: int) -> float:
    """Average bytes per cached token at a context of `tokens` tokens."""
    if tokens < 1:
        raise ValueError(f"a context needs at least one token, got {tokens}")
    return cache_bytes(shape, spec, tokens) / tokens
