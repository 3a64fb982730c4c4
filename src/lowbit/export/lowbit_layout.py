"""lowbit's own safetensors layout, for what no serving engine reads: NF4, learned lookup tables,
FP8 E5M2, vector codebooks, binary weights, and any weight with sparse fp16 outliers or a low-rank
correction (those parts, and the binary bit planes, are in extras_layout; vector-quantized layers
have their own tensors, export/vector_layout.py). docs/formats.md documents it; `load_quantized`
reloads it. The other layers are stored as:

Per quantized linear `<module>`:
- `<module>.weight_codes`: int32, the codes shifted to signed (code - 2^(bits-1)) and packed densely
  along the input axis, lowest bits first (compressed-tensors' `pack_to_int32`, as for integers);
- `<module>.weight_scale`: [out, n_groups] in the format's scale dtype;
- `<module>.weight_table`: float16 [out, 2^bits], learned lookup tables only (sorted ascending);
- `<module>.weight_shape`: int64 [2], the unpacked [out, in].
config.json's `quantization_config` has `quant_method: "lowbit"` (so that a plain transformers load
fails loudly instead of running random weights) and, per config group, the format description
that `format_from_description` rebuilds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from lowbit.export.errors import ExportError
from lowbit.export.extras_layout import pack_binary, pack_extras, unpack_binary, unpack_extras
from lowbit.export.vector_layout import pack_vector_layer, unpack_vector_layer
from lowbit.formats.base import QuantizedWeight, WeightFormat
from lowbit.formats.binary import BinaryFormat
from lowbit.formats.floating import FloatFormat
from lowbit.formats.integer import PER_CHANNEL, IntegerFormat, scale_dtype_from_name
from lowbit.formats.lookup import TABLE_DTYPE, LookupFormat
from lowbit.formats.minifloat import E5M2, ELEMENTS
from lowbit.formats.vector import VectorFormat
from lowbit.kernels.int4_pack import CODES_PER_WORD, pack_int4

LOWBIT_FORMAT = "lowbit-packed"
LOWBIT_QUANT_METHOD = "lowbit"


def has_lowbit_layout(fmt: WeightFormat) -> bool:
    """Formats only lowbit's layout stores."""
    return isinstance(fmt, (LookupFormat, BinaryFormat, VectorFormat)) or (
        isinstance(fmt, FloatFormat) and fmt.element == E5M2)


def needs_lowbit_layout(qweight: QuantizedWeight) -> bool:
    """A weight whose format, sparse outliers or low-rank correction only lowbit's layout stores."""
    return has_lowbit_layout(qweight.format) or qweight.sparse is not None or qweight.lowrank is not None


def describe_format(fmt: WeightFormat) -> dict[str, Any]:
    """JSON-able description of a format `has_lowbit_layout` accepts (its tables go in tensors)."""
    dtype = str(fmt.scale_dtype).removeprefix("torch.")
    if isinstance(fmt, VectorFormat):
        return {"family": "vector", "dim": fmt.dim, "bits": fmt.bits, "residual_bits": fmt.residual_bits,
                "group_size": fmt.group_size, "row_scale": fmt.row_scale, "scale_dtype": dtype}
    if isinstance(fmt, LookupFormat):
        return {"family": "lookup", "bits": fmt.bits, "group_size": fmt.group_size, "learned": fmt.learned,
                "scale_dtype": dtype}
    if isinstance(fmt, BinaryFormat):
        return {"family": "binary", "split": fmt.split, "group_size": fmt.group_size, "scale_dtype": dtype}
    if isinstance(fmt, IntegerFormat):
        return {"family": "int", "bits": fmt.bits, "symmetric": fmt.symmetric, "group_size": fmt.group_size,
                "scale_dtype": dtype}
    assert isinstance(fmt, FloatFormat)
    return {"family": "float", "element": fmt.element.name, "group_size": fmt.group_size, "scale_dtype": dtype}


def format_from_description(description: dict[str, Any]) -> WeightFormat:
    try:
        dtype = scale_dtype_from_name(description["scale_dtype"])
        if description["family"] == "lookup":
            return LookupFormat(description["bits"], description["group_size"], description["learned"], dtype)
        if description["family"] == "vector":
            return VectorFormat(description["dim"], description["bits"], description["residual_bits"],
                                description["group_size"], description["row_scale"], dtype)
        if description["family"] == "float":
            return FloatFormat(ELEMENTS[description["element"]], description["group_size"], dtype)
        if description["family"] == "binary":
            return BinaryFormat(description["split"], description["group_size"], dtype)
        if description["family"] == "int":
            return IntegerFormat(description["bits"], description["symmetric"], description["group_size"], dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(f"unreadable lowbit format description {description}: {error}") from None
    raise ExportError(f"unknown lowbit format family {description.get('family')!r}; upgrade lowbit")


def pack_lowbit_layer(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {**_pack_grid(qweight), **pack_extras(qweight)}


def _pack_grid(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    fmt = qweight.format
    if isinstance(fmt, BinaryFormat):
        return pack_binary(qweight)
    if isinstance(fmt, VectorFormat):
        return pack_vector_layer(qweight)
    rows, columns = qweight.codes.shape
    bits = fmt.bits
    if not qweight.has_trivial_group_index:
        raise ExportError("the lowbit layout stores groups of consecutive columns; use static act-order")
    tensors = {
        "weight_codes": pack_unsigned(qweight.codes.cpu(), bits),
        "weight_scale": qweight.scale.cpu(),
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64),
    }
    if isinstance(fmt, LookupFormat) and fmt.learned:
        tensors["weight_table"] = fmt.table.cpu().to(TABLE_DTYPE)
    if qweight.zero is not None:  # asymmetric integers: zero points packed along the output axis
        tensors["weight_zero_point"] = pack_unsigned(qweight.zero.cpu(), bits, packed_dim=0)
    return tensors


def unpack_lowbit_layer(fmt: WeightFormat, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    """The stored weight of one layer from its tensors (suffixes as written by `pack_lowbit_layer`)."""
    if isinstance(fmt, BinaryFormat):
        return unpack_extras(unpack_binary(fmt, tensors), tensors)
    if isinstance(fmt, VectorFormat):
        return unpack_extras(unpack_vector_layer(fmt, tensors), tensors)
    rows, columns = (int(v) for v in tensors["weight_shape"])
    codes = unpack_signed(tensors["weight_codes"], fmt.bits, torch.Size([rows, columns]))
    if isinstance(fmt, LookupFormat):
        table = tensors.get("weight_table")
        if fmt.learned and table is None:
            raise ExportError("a learned lookup layer lacks its weight_table")
        fmt = fmt.prepare(codes) if table is None else dataclasses.replace(fmt, table=table.float())
    group_size = fmt.group_size_for(columns)
    scale = tensors["weight_scale"]
    zero = None
    if "weight_zero_point" in tensors:
        zero = unpack_signed(tensors["weight_zero_point"], fmt.bits, scale.shape, packed_dim=0, dtype=scale.dtype)
    qweight = QuantizedWeight(fmt, codes, scale, zero, torch.arange(columns) // group_size)
    return unpack_extras(qweight, tensors)


def pack_unsigned(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Codes or zero points packed into int32 words stored signed (value - 2^(bits-1)), as both this
    layout and compressed-tensors' pack-quantized one write them; the inverse of `unpack_signed`.
    4-bit codes along the input axis go through int4_pack.pack_int4, a byte at a time: the words
    compressed-tensors' `pack_to_int32` writes, in less time, which every quantized layer of an
    export spends while the pipeline waits (benchmarks/results/export_pack.md)."""
    if bits == 4 and packed_dim == 1 and values.shape[1] % CODES_PER_WORD == 0:
        return pack_int4(values).T.contiguous()
    return pack_to_int32(to_signed(values, bits), bits, packed_dim=packed_dim)


def to_signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes or zero points as both layouts store them: int8, less 2^(bits-1)."""
    return (values.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def unpack_signed(packed: torch.Tensor, bits: int, shape: torch.Size, packed_dim: int = 1,
                  dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Codes or zero points stored signed (value - 2^(bits-1)) and packed into int32 words, as both
    this layout and compressed-tensors' pack-quantized one write them: the unsigned values, in `dtype`."""
    values = unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=packed_dim)
    return (values.to(torch.int16) + (1 << (bits - 1))).to(dtype)


def lowbit_scheme(fmt: WeightFormat) -> dict[str, Any]:
    """SchemeKey fields of a lowbit-layout format; `description` is hashable (sorted pairs)."""
    group_size = None if fmt.group_size == PER_CHANNEL else fmt.group_size
    return dict(compression=LOWBIT_FORMAT, type="lowbit", bits=fmt.bits, symmetric=True,
                strategy="channel" if group_size is None else "group", group_size=group_size,
                description=tuple(sorted(describe_format(fmt).items())))
