"""The arithmetic of the GEMV's F16_PAIRS path, operation by operation in torch on CPU: a slow,
obvious model of what int4_unpack.stage_f16_rows and int4_unpack.f16_word_dot compute, so its
error and range can be checked without a GPU, and the kernel checked against it (to the output's
last bit, nearly) on one.

Every fp16 operation is done exactly in float64 and rounded once to fp16, as the PTX `.rn`
instructions do: products of fp16 values and sums of a product and an fp16 fit float64 exactly.
"""

from __future__ import annotations

import torch

from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, PackedInt4, unpack_int4


def _fp16(value: torch.Tensor) -> torch.Tensor:
    """Round float64 to fp16 (to nearest, ties to even) and back: one `.rn` fp16 result."""
    return value.half().double()


def row_factors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of eight x values: the power of two stage_f16_rows scales it by, and its inverse.

    E is the float32 exponent field of the row's largest |x|, at least 6; the factor 2^(133 - E)
    brings that value into [64, 128), and the inverse 2^(E - 133) is zero where E = 6 (a row of
    zeros or of values below 2^-120)."""
    biggest = x.float().view(-1, 8).abs().amax(dim=1)
    exponent = torch.clamp(biggest.view(torch.int32) >> 23, min=6).double()
    inverse = torch.where(exponent > 6, torch.exp2(exponent - 133), torch.zeros_like(exponent))
    return torch.exp2(133 - exponent), inverse


def f16_pairs_matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """y = x Wᵀ for one row x [K] (bf16 or fp16) as F16_PAIRS computes it, in float64 [N]."""
    k = packed.in_features
    codes = unpack_int4(packed.qweight, k).double()  # [N, K]
    group = torch.arange(k) // packed.group_size
    zeros = SYMMETRIC_ZERO if packed.zeros is None else packed.zeros.double()[group].T
    steps = (codes - zeros).view(-1, k // 8, 8)  # q - z, exact in fp16
    factor, inverse = row_factors(x)
    scaled = _fp16((x.float().view(-1, 8) * factor.float()[:, None]).double())  # float32 product, cvt.rn
    lanes = []
    for first in (0, 4):  # bits 0-15 hold codes 0-3 of the word, bits 16-31 codes 4-7
        lane = _fp16(steps[:, :, first] * scaled[:, first])
        for j in range(first + 1, first + 4):
            lane = _fp16(steps[:, :, j] * scaled[:, j] + lane)
        lanes.append(lane)
    words = _fp16(lanes[0] + lanes[1]).float()  # [N, K / 8], widened to float32
    rows = (words * inverse.float()).double()
    sums = rows.view(rows.shape[0], -1, packed.group_size // 8).sum(dim=2)  # [N, groups]
    return (sums * packed.scales.double().T).sum(dim=1)
