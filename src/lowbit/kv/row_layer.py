"""One attention layer's row-coded KV cache (int8 or fp8 codes, kv/row_codes.py) for transformers' Cache API.

Each update quantizes the new keys and values a row (token and head) at a time and returns the
dequantized earlier entries followed by the new ones exactly: a chunk's tokens attend to each other
exactly and to earlier chunks through their codes, as through the integer layer (layer.py) and as
StaticDecoder's coded cache reads them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from lowbit.kv.row_codes import dequantize_rows, quantize_rows


class RowKVLayer(DynamicLayer):
    """A transformers cache layer holding keys and values as 8-bit codes (`codes`: int8 or float8
    e4m3) with a scale per row."""

    is_croppable = False

    def __init__(self, codes: torch.dtype) -> None:
        super().__init__()
        self.code_dtype = codes
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

    def _append(self, codes: torch.Tensor | None, scales: torch.Tensor | None,
                new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_codes, new_scales = quantize_rows(new, self.code_dtype)
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
