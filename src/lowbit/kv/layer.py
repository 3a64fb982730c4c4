"""One attention layer's quantized KV cache: KIVI's layout with a full-precision recent window.

State, per layer:
- quantized keys: per channel, in groups of `group_size` tokens (channel-major packed codes);
- quantized values: per token, in groups of channels;
- the full-precision window: the most recent tokens, kept exactly as the attention passed them.

Every update returns the exact new tokens after the exact window after the dequantized older
tokens, then moves what fell out of the window into quantized storage. Values move token by
token, so exactly the last `residual` tokens are exact. Keys can only be quantized a whole
group of tokens at a time, so they move in chunks of `group_size` once the window holds
`residual + group_size` keys; between chunks up to `group_size - 1` extra keys wait exact.
(KIVI flushes keys `residual` at a time, leaving 0..residual-1 exact; here the last `residual`
tokens are always exact for keys and values alike, which is the guarantee the option promises.)

With pre-RoPE keys, keys are un-rotated as they are quantized and rotated back at their stored
positions when read (lowbit.kv.rope says why this lives in the cache).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from lowbit.kv.memory import POSITION_DTYPE
from lowbit.kv.quantizer import PackedGroups, dequantize_per_channel, quantize_groups, quantize_per_channel
from lowbit.kv.rope import KeyRotation
from lowbit.kv.spec import KVCacheSpec

class QuantizedKVLayer(DynamicLayer):
    """A transformers cache layer holding keys and values as packed integer codes."""

    is_croppable = False

    def __init__(self, spec: KVCacheSpec, head_dim: int, rotation: KeyRotation | None = None) -> None:
        super().__init__()
        if spec.pre_rope and rotation is None:
            raise ValueError("pre-RoPE keys need the model's rotary embedding (QuantizedKVCache passes it)")
        value_group = min(spec.group_size, head_dim)
        if head_dim % value_group:
            raise ValueError(f"KV group size {spec.group_size} does not divide the head dimension {head_dim}; "
                             "pick a divisor of it (or a multiple for keys only)")
        self.spec = spec
        self.value_group = value_group
        self.rotation = rotation if spec.pre_rope else None
        self.cumulative_length = 0
        self.quantized_keys: PackedGroups | None = None
        self.quantized_values: PackedGroups | None = None
        self.positions: torch.Tensor | None = None
        """Positions [batch, tokens] of every cached key (pre-RoPE only): quantized ones, then the window's."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        shape = (*key_states.shape[:2], 0, key_states.shape[-1])
        self.keys = key_states.new_empty(shape)
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotation is not None:
            self._record_positions(key_states, kwargs)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self._old_keys(key_states.dtype), self.keys, key_states], dim=-2)
        values = torch.cat([self._old_values(value_states.dtype), self.values, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._flush_keys()
        self._flush_values()
        return keys, values

    def _record_positions(self, key_states: torch.Tensor, kwargs: dict) -> None:
        """Positions of the new keys: the model's position_ids when it passes them, else the next ones."""
        forwarded = kwargs.get("kwargs", kwargs)
        batch, _, count, _ = key_states.shape
        positions = forwarded.get("position_ids") if isinstance(forwarded, dict) else None
        if positions is None:
            positions = torch.arange(self.cumulative_length, self.cumulative_length + count, device=key_states.device)
        positions = positions.reshape(-1, count).expand(batch, count).to(POSITION_DTYPE)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=-1)

    def _quantized_key_count(self) -> int:
        return 0 if self.quantized_keys is None else self.quantized_keys.length

    def _old_keys(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quantized_keys is None:
            return self.keys[..., :0, :]
        keys = dequantize_per_channel(self.quantized_keys, torch.float32)
        if self.rotation is not None:
            keys = self.rotation.rotate(keys, self.positions[:, : keys.shape[-2]])
        return keys.to(dtype)

    def _old_values(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quantized_values is None:
            return self.values[..., :0, :]
        return self.quantized_values.dequantize(dtype)

    def _flush_keys(self) -> None:
        """Quantize the oldest whole groups of window keys beyond the last `residual`."""
        group = self.spec.group_size
        count = (self.keys.shape[-2] - self.spec.residual) // group * group
        if count <= 0:
            return
        chunk, self.keys = self.keys[..., :count, :], self.keys[..., count:, :]
        if self.rotation is not None:
            start = self._quantized_key_count()
            chunk = self.rotation.unrotate(chunk, self.positions[:, start : start + count])
        packed = quantize_per_channel(chunk, self.spec.bits, group)
        self.quantized_keys = packed if self.quantized_keys is None else self.quantized_keys.append(packed, dim=-1)

    def _flush_values(self) -> None:
        """Quantize every window value beyond the last `residual`, token by token."""
        count = self.values.shape[-2] - self.spec.residual
        if count <= 0:
            return
        chunk, self.values = self.values[..., :count, :], self.values[..., count:, :]
        packed = quantize_groups(chunk, self.spec.bits, self.value_group)
        self.quantized_values = packed if self.quantized_values is None else self.quantized_values.append(packed, dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes held now: packed codes, scales and minimums, the exact window and stored positions."""
        stored = [self.keys, self.values, self.positions]
        total = sum(t.numel() * t.element_size() for t in stored if t is not None)
        return total + sum(q.nbytes for q in (self.quantized_keys, self.quantized_values) if q is not None)

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[index], self.values[index]
        if self.positions is not None:
            self.positions = self.positions[index]
        if self.quantized_keys is not None:
            self.quantized_keys = self.quantized_keys.select_batch(index)
        if self.quantized_values is not None:
            self.quantized_values = self.quantized_values.select_batch(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a quantized KV cache cannot be cropped (assisted decoding); use a DynamicCache there")

    def reset(self) -> None:
        super().reset()
        self.quantized_keys = self.quantized_values = None
        self.positions = None
