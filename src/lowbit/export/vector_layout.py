"""Tensors of one vector-quantized layer in lowbit's own layout (see lowbit_layout, docs/formats.md).

Per layer `<module>` of a VectorFormat:
- `<module>.weight_codes`: uint8, the first stage's indices ([rows, columns / dim], row-major) as
  one bit stream of `bits` bits each, lowest bit first, padded with zero bits to a whole byte;
- `<module>.weight_codes_residual`: the residual stage's indices, likewise (residual codebooks only);
- `<module>.weight_codebook` (and `weight_codebook_residual`): float16 [groups, 2^bits, dim];
- `<module>.weight_scale`: [rows, 1] in the scale dtype, row-scaled formats only;
- `<module>.weight_shape`: int64 [2], [rows, columns].
So the stored bytes are the format's `bits_per_weight` exactly, up to the padding of each stream
to a whole byte (and the 16 bytes of `weight_shape`).
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.export.errors import ExportError
from lowbit.formats.base import QuantizedWeight
from lowbit.formats.vector import CODEBOOK_DTYPE, VectorFormat

STAGE_SUFFIXES = ("", "_residual")
"""Suffix of each codebook stage's tensors: weight_codes, weight_codes_residual, ..."""


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers below 2^bits as one dense little-endian bit stream (uint8)."""
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ExportError(f"indices must lie in 0..{(1 << bits) - 1} to be stored in {bits} bits")
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` values of a stream written by `pack_bits`, as int32."""
    if packed.numel() * 8 < count * bits:
        raise ExportError(f"a stream of {packed.numel()} bytes cannot hold {count} indices of {bits} bits")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(dim=1).to(torch.int32)


def pack_vector_layer(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    fmt = qweight.format
    assert isinstance(fmt, VectorFormat) and fmt.codebooks is not None
    rows, columns = qweight.shape
    tensors = {"weight_shape": torch.tensor([rows, columns], dtype=torch.int64)}
    for suffix, bits, codes, book in zip(STAGE_SUFFIXES, fmt.stage_bits, qweight.codes.cpu(), fmt.codebooks):
        tensors[f"weight_codes{suffix}"] = pack_bits(codes, bits)
        tensors[f"weight_codebook{suffix}"] = book.cpu().to(CODEBOOK_DTYPE)
    if fmt.row_scale:
        tensors["weight_scale"] = qweight.scale.cpu().to(fmt.scale_dtype)
    return tensors


def unpack_vector_layer(fmt: VectorFormat, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    rows, columns = (int(v) for v in tensors["weight_shape"])
    count = rows * columns // fmt.dim
    codes, books = [], []
    for suffix, bits in zip(STAGE_SUFFIXES, fmt.stage_bits):
        if f"weight_codes{suffix}" not in tensors or f"weight_codebook{suffix}" not in tensors:
            raise ExportError(f"a vector-quantized layer lacks weight_codes{suffix} or weight_codebook{suffix}")
        codes.append(unpack_bits(tensors[f"weight_codes{suffix}"], bits, count).reshape(rows, -1))
        books.append(tensors[f"weight_codebook{suffix}"].float())
    if fmt.row_scale and "weight_scale" not in tensors:
        raise ExportError("a row-scaled vector-quantized layer lacks its weight_scale")
    scale = tensors["weight_scale"].float() if fmt.row_scale else torch.ones(rows, 1)
    return QuantizedWeight(dataclasses.replace(fmt, codebooks=tuple(books)), torch.stack(codes), scale, None,
                           torch.zeros(columns, dtype=torch.long))
