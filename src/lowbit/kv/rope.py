"""Rotary position embedding applied and undone around the cache, for pre-RoPE key quantization.

Why the cache undoes RoPE instead of patching the attention: transformers' attention modules
rotate keys before they call `cache.update`, so a cache that wants pre-RoPE keys would otherwise
need a copy of every architecture's attention forward. RoPE is a rotation of each channel pair
(i, i + d/2) by position * frequency, so the post-RoPE key determines the pre-RoPE key exactly:
k = R(-θ) k_rot (divided by the squared attention scaling some RoPE variants fold into cos/sin).
The cache un-rotates keys as they are quantized (in float32, rounding error ~1e-7 relative),
stores their positions, and rotates the dequantized keys back with the model's own rotary
embedding when they are read. Keys still in the full-precision window are kept as received.

This needs the rotate-half RoPE over the whole head (Llama, Mistral, Qwen, Gemma...); models
with partial or interleaved rotary embeddings are refused.
"""

from __future__ import annotations

import torch
from torch import nn


class RopeError(ValueError):
    """The model's rotary embedding is not one the cache can undo; the message says what to do."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KeyRotation:
    """The model's rotary embedding at given positions, applied to or removed from [B, H, T, D] keys."""

    def __init__(self, rotary_embedding: nn.Module) -> None:
        self.rotary_embedding = rotary_embedding
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """(positions, cos, sin) of the last call: every layer of one forward pass reads the same
        positions, so one evaluation serves them all (a transient, like the dequantized keys)."""

    @classmethod
    def of_model(cls, model: nn.Module, head_dim: int) -> KeyRotation:
        inner = getattr(model, "model", model)
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is None:
            raise RopeError(f"{type(model).__name__} has no model.rotary_emb; use post-RoPE keys (drop pre_rope)")
        if getattr(model.config, "partial_rotary_factor", 1.0) != 1.0:
            raise RopeError("pre-RoPE keys need a rotary embedding over the whole head; this model rotates part "
                            "of it: use post-RoPE keys (drop pre_rope)")
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None or 2 * inv_freq.numel() != head_dim:
            raise RopeError(f"the rotary embedding of {type(model).__name__} does not span the head dimension "
                            f"{head_dim}; use post-RoPE keys (drop pre_rope)")
        return cls(rotary)

    def _cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin [B, 1, T, D] for positions [B, T]."""
        positions = positions.to(device=device, dtype=torch.long)
        if self._last is not None and self._last[0].shape == positions.shape and torch.equal(self._last[0], positions):
            return self._last[1], self._last[2]
        probe = torch.empty(0, device=device, dtype=torch.float32)
        cos, sin = self.rotary_embedding(probe, positions)
        self._last = (positions, cos.float().unsqueeze(1), sin.float().unsqueeze(1))
        return self._last[1], self._last[2]

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(positions, keys.device)
        x = keys.float()
        return (x * cos + rotate_half(x) * sin).to(keys.dtype)

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """float32 pre-RoPE keys from post-RoPE `keys`: the inverse rotation over cos² + sin²."""
        cos, sin = self._cos_sin(positions, keys.device)
        x = keys.float()
        return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
