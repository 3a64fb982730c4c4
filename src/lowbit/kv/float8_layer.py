"""One attention layer's fp8 KV cache for transformers' Cache API (kv/float8.py's rows).

Each update quantizes the new keys and values a row (token and head) at a time and returns the
dequantized earlier entries followed by the new ones exactly: a chunk's tokens attend to each other
exactly and to earlier chunks through their codes, as through the integer layer (layer.py) and as
StaticDecoder's fp8 cache reads them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from lowbit.kv.float8 import dequantize_rows, quantize_rows


class Float8KVLayer(DynamicLayer):
    """A transformers cache layer holding keys and values as float8 e4m3 codes with a scale per row."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.cumulative_length = 0
        self.key_codes = self.key_scales = self.value_codes = self.value_scales = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = self._read(self.key_codes, self.key_scales, key_states)
        values = self._read(self.value_codes, self.value_scales, value_states)
        self.key_codes, self.key_scales = self._append(self.key_codes, self.key_scales, key_states)
        self.value_codes, self.value_scales = self._append(self.value_codes, self.value_scales, value_states)
        return keys, values

    @staticmethod
    def _read(codes: torch.Tensor | None, scales: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """The stored entries dequantized, followed by `new` exactly."""
        if codes is None:
            return new
        return torch.cat([dequantize_rows(codes, scales, new.dtype), new], dim=-2)

    @staticmethod
    def _append(codes: torch.Tensor | None, scales: torch.Tensor | None,
                new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_codes, new_scales = quantize_rows(new)
        if codes is None:
            return new_codes, new_scales
        return torch.cat([codes, new_codes], dim=-2), torch.cat([scales, new_scales], dim=-1)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes held now: codes and scales."""
        stored = (self.key_codes, self.key_scales, self.value_codes, self.value_scales)
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.key_codes is None:
            return
        self.key_codes, self.key_scales = self.key_codes[index], self.key_scales[index]
        self.value_codes, self.value_scales = self.value_codes[index], self.value_scales[index]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.key_codes is not None:
            self._select_batch(torch.arange(self.key_codes.shape[0], device=self.key_codes.device)
                               .repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a quantized KV cache cannot be cropped (assisted decoding); use a DynamicCache there")

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.key_codes = self.key_scales = self.value_codes = self.value_scales = None
