"""y = x Wᵀ for an int4 weight in the PackedInt4 layout: the dispatcher and the torch reference.

On GPU, M <= 64 rows always take the fused Triton kernels (they read a quarter of bf16's bytes,
which is what decode time is made of). Above that the matmul turns compute-bound and cuBLAS's bf16
GEMM may beat the fused kernel even after a separate dequantize pass, so the first call for each
(shape, M bucket, dtype) times both paths and keeps the faster: `path_table()` shows the choices.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

from lowbit.kernels.int4_pack import PackedInt4


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the Triton path can run at all)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


MatmulPath = Literal["fused", "dequantize+cublas"]
_PATHS: dict[tuple, MatmulPath] = {}


def path_table() -> dict[tuple, MatmulPath]:
    """The measured choices so far: (device, dtype, M bucket, N, K, group, symmetric) -> path."""
    return dict(_PATHS)


def _large_m_path(x: torch.Tensor, packed: PackedInt4) -> MatmulPath:
    """The faster of the fused kernel and dequantize-then-cuBLAS for this shape, timed once."""
    from lowbit.kernels import w4a16_triton

    key = (x.device.index, x.dtype, w4a16_triton.bucket(x.shape[0]), packed.out_features, packed.in_features,
           packed.group_size, packed.symmetric)
    if key not in _PATHS:
        if torch.cuda.is_current_stream_capturing():
            return "fused"  # nothing can be timed inside a graph capture; warm up outside it
        import triton

        fused = triton.testing.do_bench(lambda: w4a16_triton.matmul(x, packed), warmup=5, rep=25)
        cublas = triton.testing.do_bench(lambda: w4a16_triton.dequantize_matmul(x, packed), warmup=5, rep=25)
        _PATHS[key] = "fused" if fused <= cublas else "dequantize+cublas"
    return _PATHS[key]


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
            x2 = x2.contiguous()
            if x2.shape[0] > w4a16_triton.DECODE_MAX_M and _large_m_path(x2, packed) == "dequantize+cublas":
                y = w4a16_triton.dequantize_matmul(x2, packed)
            else:
                y = w4a16_triton.matmul(x2, packed)
            return y.reshape(*leading, packed.out_features)
    return reference_w4a16_matmul(x, packed)
