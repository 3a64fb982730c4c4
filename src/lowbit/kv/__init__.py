"""Quantized KV cache for transformers' Cache API (KIVI layout, optional KVQuant pre-RoPE keys).

`QuantizedKVCache` is imported on first use, so that reading a recipe or parsing flags does not
load transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lowbit.kv.spec import KV_CACHE_NAMES, KVCacheSpec, bits_of_name

if TYPE_CHECKING:
    from lowbit.kv.cache import QuantizedKVCache

__all__ = ["KV_CACHE_NAMES", "KVCacheSpec", "QuantizedKVCache", "bits_of_name"]


def __getattr__(name: str) -> Any:
    if name == "QuantizedKVCache":
        from lowbit.kv.cache import QuantizedKVCache

        return QuantizedKVCache
    raise AttributeError(f"module 'lowbit.kv' has no attribute {name!r}")
