"""FBGEMM's CUTLASS W4A16 kernel for Hopper (PyPI `fbgemm-gpu-genai`, BSD) behind lowbit's PackedInt4.

`torch.ops.fbgemm.bf16i4bf16_shuffled` is a CUTLASS mixed-input GEMM: bf16 activations, int4
weights in a layout pre-shuffled for the tensor cores' register fragments (so no shared-memory
reshuffle in the main loop), bf16 group scales and additive zero terms. Its dequantization is
w = q·scale + zero with signed codes q in [-8, 7] and a float zero term, so lowbit's
w = (code - z)·scale maps onto it exactly up to bf16 rounding of the per-group terms:
q = code - 8, zero term = (8 - z)·scale (0 for symmetric weights).

As with GemLite (w4a16_gemlite.py), the layout is built from the PackedInt4 the first time a weight
is multiplied, kept beside it keyed by the qweight tensor, and rebuilt if that is written in place;
the dispatcher (w4a16.py) times it against the other paths per shape and M bucket. bf16 only: the
library has no fp16 variant of this kernel.
"""

from __future__ import annotations

import functools
import importlib

import torch

from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, PackedInt4, unpack_int4
from lowbit.kernels.weight_copies import WeightCopies

_LAYOUTS = WeightCopies()
"""Each weight's (shuffled codes, scales, zero terms)."""

MIN_GROUP = 128
"""The kernel's smallest group size (one K tile of its main loop per group)."""


@functools.cache
def import_error() -> str | None:
    """None when FBGEMM's gen-AI ops load here; otherwise why not, in one line (for reports)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        importlib.import_module("fbgemm_gpu.experimental.gen_ai")  # registers torch.ops.fbgemm.*
    except (ImportError, OSError) as error:  # missing package, or built against another torch
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not hasattr(torch.ops.fbgemm, "bf16i4bf16_shuffled"):
        return "this fbgemm-gpu-genai build has no bf16i4bf16_shuffled"
    return None


def available() -> bool:
    """True when `fbgemm-gpu-genai` imports, matches this torch build, and a CUDA GPU is present."""
    return import_error() is None


def version() -> str | None:
    if not available():
        return None
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("fbgemm-gpu-genai")
    except PackageNotFoundError:  # carried on PYTHONPATH without metadata
        return "unknown version"


def supports(packed: PackedInt4, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this weight: bf16 activations, groups of 128 or more dividing K."""
    return (dtype == torch.bfloat16 and packed.qweight.is_cuda and packed.group_size >= MIN_GROUP
            and packed.in_features % packed.group_size == 0 and packed.out_features % 8 == 0
            and available())


def signed_code_pairs(packed: PackedInt4) -> torch.Tensor:
    """int8 [N, K / 2]: codes - 8 in [-8, 7], two per byte, column 2i in the low nibble (FBGEMM's order)."""
    signed = unpack_int4(packed.qweight, packed.in_features).to(torch.int16) - SYMMETRIC_ZERO
    pairs = (signed[:, 0::2] & 0xF) | ((signed[:, 1::2] & 0xF) << 4)
    return pairs.to(torch.uint8).view(torch.int8)


def group_terms(packed: PackedInt4) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [K / G, N] scales and zero terms with (code - 8)·scale + zero term = (code - z)·scale."""
    scales = packed.scales.float()
    if packed.zeros is None:
        zero_terms = torch.zeros_like(scales)
    else:
        zero_terms = (SYMMETRIC_ZERO - packed.zeros.float()) * scales
    return scales.to(torch.bfloat16).contiguous(), zero_terms.to(torch.bfloat16).contiguous()


def layout(packed: PackedInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBGEMM's operands for `packed` (shuffled codes, scales, zero terms), built on first use."""
    return _LAYOUTS.get(packed, lambda: _build(packed))


def _build(packed: PackedInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scales, zero_terms = group_terms(packed)
    pairs = signed_code_pairs(packed)
    # preshuffle_i4 returns its inputs' memory, shuffled; built on a side stream (a decode loop's
    # warm-up before graph capture) that came back corrupted on an H200 (125 of 128 layouts),
    # so the build runs between device-wide synchronisations and keeps copies it owns.
    torch.cuda.synchronize(pairs.device)
    shuffled_codes, shuffled_scales = torch.ops.fbgemm.preshuffle_i4(pairs, scales)
    torch.cuda.synchronize(pairs.device)
    return shuffled_codes.clone(), shuffled_scales.clone(), zero_terms


def release(packed: PackedInt4) -> None:
    """Drop `packed`'s FBGEMM copy (the dispatcher chose another path for its shape)."""
    _LAYOUTS.release(packed)


def matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [M, K] (bf16, CUDA, columns already in the packed order) @ Wᵀ -> [M, N] bf16."""
    codes, scales, zero_terms = layout(packed)
    return torch.ops.fbgemm.bf16i4bf16_shuffled(x, codes, scales, zero_terms)
