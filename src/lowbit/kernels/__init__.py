"""Matmul kernels for quantized weights: a CPU reference path, and Triton paths chosen at run time.

`w4a16_matmul` is the one entry point: it runs the Triton kernel when the input lives on a CUDA
device, Triton imports and the packed layout is one the kernel handles, and the torch reference
(dequantize, then matmul in float32) otherwise, so every caller works on any device.
"""

from lowbit.kernels.int4_pack import PackedInt4, pack_int4, unpack_int4
from lowbit.kernels.w4a16 import reference_w4a16_matmul, triton_available, w4a16_matmul

__all__ = [
    "PackedInt4",
    "pack_int4",
    "reference_w4a16_matmul",
    "triton_available",
    "unpack_int4",
    "w4a16_matmul",
]
