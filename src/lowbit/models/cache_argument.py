"""The keyword under which a transformers model takes (and returns) its KV cache.

transformers 5.x renamed `past_key_values` to `cache` in `forward`, `generate` and the outputs.
A keyword the model does not know is swallowed by its `**kwargs` without an error, so passing the
other release's name silently runs every call without a cache: chunked scoring then sees no
context and a quantized cache is never read. The forward signature says which name this
installation uses.
"""

from __future__ import annotations

import inspect

from torch import nn


def cache_argument(model: nn.Module) -> str:
    """`cache` where the model's forward takes it, else `past_key_values` (older transformers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def with_cache(model: nn.Module, cache: object) -> dict[str, object]:
    """Keyword arguments passing `cache` to `model(...)` or `model.generate(...)`."""
    return {cache_argument(model): cache}
