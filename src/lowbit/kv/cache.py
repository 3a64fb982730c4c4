"""QuantizedKVCache: lowbit's integer or row-coded KV cache as a transformers `Cache`, for `generate` and
forward passes."""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from lowbit.kv.layer import QuantizedKVLayer
from lowbit.kv.memory import AttentionShape
from lowbit.kv.rope import KeyRotation
from lowbit.kv.row_codes import CODES
from lowbit.kv.row_layer import RowKVLayer
from lowbit.kv.spec import KVCacheSpec


class QuantizedKVCache(Cache):
    """One QuantizedKVLayer (RowKVLayer for a row-coded spec: int8-token, fp8) per attention layer of `model`.

        cache = QuantizedKVCache(model, KVCacheSpec(bits=4, group_size=64, residual=128))
        model.generate(ids, **with_cache(model, cache), max_new_tokens=32)  # models/cache_argument.py

    Only models whose layers all use full attention are supported (sliding-window and linear
    attention layers keep their own caches).
    """

    def __init__(self, model: PreTrainedModel, spec: KVCacheSpec) -> None:
        layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(f"the quantized KV cache supports full-attention layers only; this model also has {other}")
        shape = AttentionShape.of_config(model.config)
        rotation = KeyRotation.of_model(model, shape.head_dim) if spec.pre_rope else None
        self.spec = spec
        layers = [RowKVLayer(CODES[spec.kind]) if spec.kind in CODES
                  else QuantizedKVLayer(spec, shape.head_dim, rotation) for _ in range(shape.layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes every layer holds now (codes, scales, minimums, exact window, positions)."""
        return sum(layer.nbytes() for layer in self.layers)
