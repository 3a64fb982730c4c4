"""The int4 storage layout the W4A16 kernel reads, and its conversion from lowbit's QuantizedWeight.

Layout, for a weight of `out_features` N rows and `in_features` K columns (y = x Wᵀ):
  * `qweight` int32 [K / 8, N]: word (k8, n) holds the codes of W[n, 8·k8 .. 8·k8 + 7], code j in bits
    4j .. 4j+3. Packing along K keeps the kernel's loads contiguous along N (coalesced), and eight
    codes unpack from one word with shifts, so the matmul streams exactly K·N/2 bytes of codes;
  * `scales` [K / G, N] in the storage dtype of the QuantizedWeight (float16 by default): one row per
    group of G input columns, so a K-tile of the kernel that lies inside one group reads one row;
  * `zeros` [K / G, N] for asymmetric formats (codes stand for (code - zero)·scale), in the scales'
    dtype (whole numbers 0..15, exact in float16 and bfloat16), None for symmetric ones, whose zero
    point is the constant 8. Not uint8, although that is half the bytes: the tensor-core kernel's
    16-row tile takes 109.1 us with uint8 zero points against 75.8 with float16 ones and 75.7
    without any (symmetric; 70B gate/up_proj, M = 16, one pinned config,
    gpu_zero_points_h200_bits.md), and at M = 1 the two are as fast (46.4 against 46.7 us);
  * `input_perm` int64 [K] or None: GPTQ act-order stores groups in processing order (a non-trivial
    `group_index`); sorting the columns by group makes every group contiguous again, so
    x Wᵀ = x[:, perm] W[:, perm]ᵀ runs the same kernel after one gather of x's columns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from lowbit.formats.base import FormatError, QuantizedWeight
from lowbit.formats.integer import IntegerFormat

CODES_PER_WORD = 8
SYMMETRIC_ZERO = 8
"""Implied zero point of symmetric int4 (2^(bits-1)), as in formats/integer.py."""


@dataclass
class PackedInt4:
    """An int4 weight in the kernel's layout (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    in_features: int
    out_features: int
    input_perm: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def to(self, device: torch.device | str) -> "PackedInt4":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedInt4(move(self.qweight), move(self.scales), move(self.zeros), self.group_size,
                          self.in_features, self.out_features, move(self.input_perm))

    def nbytes(self) -> int:
        """Bytes a matmul must read for the weight: codes, scales and zero points."""
        tensors = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight in the original column order."""
        codes = unpack_int4(self.qweight, self.in_features).float()  # [N, K], permuted columns
        group = torch.arange(self.in_features, device=codes.device) // self.group_size
        scales = self.scales.float()[group].T
        zeros = SYMMETRIC_ZERO if self.zeros is None else self.zeros.float()[group].T
        weight = (codes - zeros) * scales
        if self.input_perm is not None:
            weight = weight[:, torch.argsort(self.input_perm)]
        return weight


def concat_outputs(parts: list[PackedInt4]) -> PackedInt4 | None:
    """One PackedInt4 whose outputs are `parts`' outputs side by side (e.g. q, k and v projections
    that read the same input), or None where they cannot share one layout: different input sizes,
    group sizes, symmetry, scale dtypes or devices, or an act-order permutation (each part would
    need its own gather of x)."""
    first = parts[0]
    compatible = all(
        p.in_features == first.in_features and p.group_size == first.group_size
        and (p.zeros is None) == (first.zeros is None) and p.scales.dtype == first.scales.dtype
        and p.qweight.device == first.qweight.device and p.input_perm is None
        for p in parts
    )
    if not compatible:
        return None
    return PackedInt4(
        qweight=torch.cat([p.qweight for p in parts], dim=1),
        scales=torch.cat([p.scales for p in parts], dim=1),
        zeros=None if first.zeros is None else torch.cat([p.zeros for p in parts], dim=1),
        group_size=first.group_size,
        in_features=first.in_features,
        out_features=sum(p.out_features for p in parts),
    )


def _words_from_bytes(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4] (byte b of a word = bits 8b .. 8b+7) -> int32 [...], on hosts of either byte order."""
    if data.device.type == "cpu" and sys.byteorder == "big":
        data = data.flip(-1)
    return data.contiguous().view(torch.int32).squeeze(-1)


def _bytes_from_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> uint8 [..., 4], byte b = bits 8b .. 8b+7 (the inverse of _words_from_bytes)."""
    data = words.contiguous().unsqueeze(-1).view(torch.uint8)
    return data.flip(-1) if data.device.type == "cpu" and sys.byteorder == "big" else data


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (values 0..15, K a multiple of 8) -> int32 words [K / 8, N].

    Built a byte at a time (two codes each) and viewed as words: no wider integers, no shifts
    across a word (an 8B model's layers repack in a fraction of the int64 version's time)."""
    rows, columns = codes.shape
    if columns % CODES_PER_WORD:
        raise FormatError(f"int4 packing needs in_features divisible by {CODES_PER_WORD}, got {columns}")
    if codes.numel() and int(codes.max()) > 15:
        raise FormatError("int4 packing got codes above 15; the weight was not quantized to 4 bits")
    pairs = codes.T.to(torch.uint8).reshape(columns // CODES_PER_WORD, 4, 2, rows)  # [K/8, byte, low/high, N]
    data = pairs[:, :, 0] | (pairs[:, :, 1] << 4)  # [K/8, 4, N]: byte b holds codes 2b and 2b + 1
    return _words_from_bytes(data.permute(0, 2, 1))


def unpack_int4(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 words [K / 8, N] -> uint8 codes [N, K]; the inverse of pack_int4. Views and bit masks
    only, on the words' device (the reference matmul runs it inside captured CUDA graphs)."""
    data = _bytes_from_words(qweight)  # [K/8, N, 4]
    nibbles = torch.stack((data & 0xF, data >> 4), dim=-1)  # [K/8, N, 4, 2]: code 2b + h of each word
    return nibbles.permute(1, 0, 2, 3).reshape(-1, in_features).contiguous()


def pack_quantized_weight(qweight: QuantizedWeight) -> PackedInt4:
    """Repack a 4-bit integer QuantizedWeight once into the kernel's layout.

    Raises FormatError, saying what to use instead, for anything the layout cannot hold exactly.
    """
    fmt = qweight.format
    if not isinstance(fmt, IntegerFormat) or fmt.bits != 4:
        raise FormatError(
            f"the W4A16 kernel takes 4-bit integer weights, got {getattr(fmt, 'describe', lambda: fmt.name)()}; "
            "keep such layers as dequantized nn.Linear"
        )
    if fmt.symmetric is False and qweight.zero is None:
        raise FormatError("asymmetric int4 weight without zero points; re-quantize the layer")
    out_features, in_features = qweight.codes.shape
    group_size = fmt.group_size_for(in_features)
    if in_features % group_size:
        raise FormatError(
            f"in_features {in_features} is not a multiple of the group size {group_size}; "
            "choose a group size that divides it (group_size: auto does)"
        )
    n_groups = in_features // group_size
    scale = qweight.scale.expand(out_features, n_groups)  # per-tensor scales broadcast to every row
    zero = None if qweight.zero is None else qweight.zero.expand(out_features, n_groups)
    if zero is not None and not (torch.equal(zero, zero.round()) and 0 <= zero.min() and zero.max() <= 15):
        # The kernels take a zero point into floats by its bits (int4_unpack.paired_offset).
        raise FormatError("the W4A16 layout holds zero points as whole numbers 0..15; these are not: "
                          "keep the layer as dequantized nn.Linear or re-quantize it with an integer format")
    codes, perm = qweight.codes, None
    if not qweight.has_trivial_group_index:
        # Group g's columns become columns g·G .. g·G + G - 1; act-order groups all have G members
        # (the last one possibly fewer), so the sorted layout is the plain one.
        perm = torch.argsort(qweight.group_index, stable=True)
        expected = torch.arange(in_features, device=perm.device) // group_size
        if not torch.equal(qweight.group_index[perm], expected):
            raise FormatError("group_index has groups of unequal sizes; the W4A16 layout cannot hold it")
        codes = codes[:, perm]
    return PackedInt4(
        qweight=pack_int4(codes),
        scales=scale.T.contiguous(),
        zeros=None if zero is None else zero.T.to(scale.dtype).contiguous(),
        group_size=group_size,
        in_features=in_features,
        out_features=out_features,
        input_perm=perm,
    )
