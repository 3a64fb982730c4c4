"""GemLite's W4A16 Triton kernels (PyPI `gemlite`, Apache-2.0) behind lowbit's PackedInt4.

GemLite keeps its own layout (codes packed along K into int32, scales and `-zero·scale` per group,
both transposed, in the activations' dtype) and its own kernels per M: a reversed split-K GEMV at
M <= 4, split-K GEMMs to M = 64, a tiled GEMM above, each autotuned per shape with configs shipped
per GPU. The dispatcher (w4a16.py) times it against lowbit's own kernels once per shape and M
bucket and keeps the faster, so this module only converts and calls.

The GemLite layout is built from the PackedInt4 the first time a weight meets a given activation
dtype, kept beside it (keyed by the qweight tensor itself, so a moved or reloaded module builds a
fresh one), and rebuilt if the qweight is written in place. Both layouts stay in memory: about
0.56 bytes per weight each at group 128.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, PackedInt4, unpack_int4
from lowbit.kernels.weight_copies import WeightCopies

_LAYOUTS = WeightCopies()
"""Each weight's GemLite modules, one per activation dtype."""

_SAME_CHIP_CONFIGS = {"h200": "h100"}
"""GPUs GemLite ships no autotuning results for, and the shipped file of the same chip to load."""


@functools.cache
def available() -> bool:
    """True when the `gemlite` package is installed (it needs Triton >= 3.6 and a CUDA GPU to run)."""
    return importlib.util.find_spec("gemlite") is not None and torch.cuda.is_available()


@functools.cache
def _gemlite():
    """Import GemLite once, with float32 split-K sums, and its tuned configs for this GPU's chip."""
    import gemlite

    # Split-K partial sums added atomically in bf16 lost too much: 1.9e-2 relative error at M=1 on
    # an H200 (bound 1e-2). Float32 sums plus one cast per call instead.
    gemlite.set_native_atomic_bfp16(False)
    name = torch.cuda.get_device_name().lower()
    for chip, shipped in _SAME_CHIP_CONFIGS.items():
        if chip in name:
            path = os.path.join(os.path.dirname(gemlite.__file__), "configs", f"{shipped}.json")
            gemlite.load_config(path)
    return gemlite


def supports(packed: PackedInt4, dtype: torch.dtype) -> bool:
    """Whether GemLite takes this weight: bf16/fp16 activations, K a multiple of 32 and of the group."""
    return (available() and dtype in (torch.float16, torch.bfloat16) and packed.qweight.is_cuda
            and packed.in_features % 32 == 0 and packed.group_size >= 16
            and packed.in_features % packed.group_size == 0)


def layout(packed: PackedInt4, dtype: torch.dtype):
    """The GemLite module holding `packed` for activations of `dtype`, built on first use."""
    return _LAYOUTS.get(packed, lambda: _build(packed, dtype), variant=dtype)


def release(packed: PackedInt4, dtype: torch.dtype) -> None:
    """Drop `packed`'s GemLite module for activations of `dtype` (the dispatcher chose another path)."""
    _LAYOUTS.release(packed, variant=dtype)


def _build(packed: PackedInt4, dtype: torch.dtype):
    gemlite = _gemlite()
    kind = gemlite.DType.BF16 if dtype == torch.bfloat16 else gemlite.DType.FP16
    n, k = packed.out_features, packed.in_features
    module = gemlite.GemLiteLinearTriton(W_nbits=4, group_size=packed.group_size, in_features=k, out_features=n,
                                         input_dtype=kind, output_dtype=kind)
    codes = unpack_int4(packed.qweight, k)  # [N, K] uint8, columns in the packed (sorted) order
    scales = packed.scales.T.to(dtype).contiguous()  # [N, K / G]
    # Asymmetric: GemLite's fma mode stores -zero·scale and computes code·scale + that, one FMA per weight.
    zeros = SYMMETRIC_ZERO if packed.zeros is None else packed.zeros.T.to(dtype).contiguous()
    return module.pack(codes, scales, zeros)


def matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [M, K] (bf16/fp16, CUDA, columns already in the packed order) @ Wᵀ -> [M, N] in x's dtype."""
    return layout(packed, x.dtype)(x)
