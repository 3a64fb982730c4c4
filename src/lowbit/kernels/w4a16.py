"""y = x Wᵀ for an int4 weight in the PackedInt4 layout: the dispatcher and the torch reference."""

from __future__ import annotations

import functools
import importlib.util

import torch

from lowbit.kernels.int4_pack import PackedInt4


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the Triton path can run at all)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def reference_w4a16_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """Dequantize to float32 and multiply in float32: the slow, obvious definition (any device).

    `x` is [..., K]; the result has x's dtype. Used on CPU and as the check for the Triton kernel.
    """
    weight = packed.dequantize().to(x.device)
    return (x.float() @ weight.T).to(x.dtype)


def w4a16_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [..., K] (bf16/fp16 on GPU, any float dtype on CPU) times the packed weight's transpose."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {packed.in_features}")
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available():
        from lowbit.kernels import w4a16_triton

        if w4a16_triton.supports(packed):
            leading = x.shape[:-1]
            x2 = x.reshape(-1, packed.in_features)
            if packed.input_perm is not None:
                x2 = x2.index_select(1, packed.input_perm)
            return w4a16_triton.matmul(x2, packed).reshape(*leading, packed.out_features)
    return reference_w4a16_matmul(x, packed)
