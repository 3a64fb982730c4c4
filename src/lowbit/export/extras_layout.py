"""The parts of a stored weight that lowbit's layout holds besides codes and scales: the binary
format's bit planes, sparse fp16 outliers and a low-rank correction. Each is stored with exactly the
bits that `bits_per_weight` counts, so a layer's tensors add up to its reported size.

Per layer `<module>`:
- binary (formats.binary): `weight_signs` and `weight_outer` (uint8, bits packed flat, lowest bit
  first: every code's sign bit; the outer bit of every weight when split, else of the salient
  columns only, row by row), `weight_salient` (packed column mask, when set), `weight_scale`
  (α per row and group), `weight_scale_outer` (β of the groups that have one);
- outliers: `weight_sparse_offsets` (int32, rows + 1), `weight_sparse_columns` (int16; indices of
  wider matrices in int32), `weight_sparse_values` (float16), compressed sparse rows;
- low rank: `weight_lowrank_a` [rank, in] and `weight_lowrank_b` [out, rank], float16.
"""

from __future__ import annotations

import torch

from lowbit.export.errors import ExportError
from lowbit.formats.base import LowRankCorrection, QuantizedWeight, SparseOutliers
from lowbit.formats.binary import OUTER_BIT, SIGN_BIT, BinaryFormat

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor holding `bits` (any shape, read row-major) eight to a byte, lowest first."""
    flat = bits.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (padded.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of `pack_bits`' output, as a flat bool tensor."""
    return ((packed.reshape(-1, 1) & _BIT_WEIGHTS) != 0).reshape(-1)[:count]


def pack_binary(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    fmt = qweight.format
    assert isinstance(fmt, BinaryFormat)
    rows, columns = qweight.codes.shape
    if not torch.equal(qweight.group_index.cpu(), fmt.group_index(columns)):
        raise ExportError("binary weights are stored in their format's group layout; drop act-order")
    codes = qweight.codes.cpu()
    outer = (codes & OUTER_BIT) != 0
    if not fmt.split:
        plain = outer if fmt.salient is None else outer[:, ~fmt.salient]
        if plain.any():
            raise ExportError("unsplit binary codes set the outer bit outside salient columns")
        outer = outer[:, :0] if fmt.salient is None else outer[:, fmt.salient]
    tensors = {
        "weight_signs": pack_bits((codes & SIGN_BIT) != 0),
        "weight_outer": pack_bits(outer),
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64),
    }
    scale, beta = qweight.scale.cpu(), qweight.zero.cpu()
    if fmt.salient is not None:
        tensors["weight_salient"] = pack_bits(fmt.salient)
    tensors["weight_scale"] = scale
    if fmt.split:
        tensors["weight_scale_outer"] = beta
    elif fmt.salient is not None:
        tensors["weight_scale_outer"] = beta[:, 1::2]  # the salient groups
    return tensors


def unpack_binary(fmt: BinaryFormat, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    rows, columns = (int(v) for v in tensors["weight_shape"])
    if "weight_salient" in tensors:
        fmt = fmt.with_salient(unpack_bits(tensors["weight_salient"], columns))
    signs = unpack_bits(tensors["weight_signs"], rows * columns).reshape(rows, columns)
    outer = torch.zeros(rows, columns, dtype=torch.bool)
    if fmt.split:
        outer = unpack_bits(tensors["weight_outer"], rows * columns).reshape(rows, columns)
    elif fmt.salient is not None:
        count = int(fmt.salient.sum())
        outer[:, fmt.salient] = unpack_bits(tensors["weight_outer"], rows * count).reshape(rows, count)
    codes = signs.to(torch.uint8) * SIGN_BIT + outer.to(torch.uint8) * OUTER_BIT
    scale = tensors["weight_scale"]
    if fmt.split:
        beta = tensors["weight_scale_outer"]
    else:
        beta = scale.clone()
        if fmt.salient is not None:
            beta[:, 1::2] = tensors["weight_scale_outer"]
    return QuantizedWeight(fmt, codes, scale, beta, fmt.group_index(columns))


def pack_extras(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The sparse and low-rank tensors of a weight (none when it has neither)."""
    tensors: dict[str, torch.Tensor] = {}
    columns = qweight.codes.shape[1]
    if qweight.sparse is not None:
        sparse = qweight.sparse.cpu()
        index_dtype = torch.int16 if columns <= 1 << 16 else torch.int32
        tensors["weight_sparse_offsets"] = sparse.row_offsets.to(torch.int32)
        # Indices up to 65535 in int16 (safetensors has no uint16 everywhere): wrapped, unwrapped on load.
        tensors["weight_sparse_columns"] = sparse.columns.to(torch.int32).to(index_dtype)
        tensors["weight_sparse_values"] = sparse.values.to(torch.float16)
    if qweight.lowrank is not None:
        tensors["weight_lowrank_a"] = qweight.lowrank.a.cpu().to(torch.float16)
        tensors["weight_lowrank_b"] = qweight.lowrank.b.cpu().to(torch.float16)
    return tensors


def unpack_extras(qweight: QuantizedWeight, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    """`qweight` with the sparse and low-rank parts found in `tensors` attached."""
    if "weight_sparse_values" in tensors:
        columns = tensors["weight_sparse_columns"].to(torch.int64)
        if tensors["weight_sparse_columns"].dtype == torch.int16:
            columns &= 0xFFFF
        qweight.sparse = SparseOutliers(
            tensors["weight_sparse_offsets"].to(torch.int64), columns, tensors["weight_sparse_values"]
        )
    if "weight_lowrank_a" in tensors:
        qweight.lowrank = LowRankCorrection(tensors["weight_lowrank_a"], tensors["weight_lowrank_b"])
    return qweight
