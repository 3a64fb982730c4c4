"""Number formats: how quantized values are stored. One module per family, one registry."""

from lowbit.formats.base import (
    FormatError,
    GroupParams,
    QuantizedWeight,
    SparseOutliers,
    WeightFormat,
    check_finite,
    column_groups,
    quantize_matrix,
)
from lowbit.formats.binary import BinaryFormat
from lowbit.formats.families import FAMILIES, FormatFamily, format_family
from lowbit.formats.floating import FloatFormat, MXFormat, NVFP4Format
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR, IntegerFormat
from lowbit.formats.lookup import LookupFormat

FORMATS: dict[str, type[WeightFormat]] = {
    cls.name: cls for cls in (BinaryFormat, IntegerFormat, FloatFormat, MXFormat, NVFP4Format, LookupFormat)
}

__all__ = [
    "BinaryFormat",
    "FAMILIES",
    "FORMATS",
    "PER_CHANNEL",
    "PER_TENSOR",
    "FloatFormat",
    "FormatError",
    "FormatFamily",
    "GroupParams",
    "IntegerFormat",
    "LookupFormat",
    "MXFormat",
    "NVFP4Format",
    "QuantizedWeight",
    "SparseOutliers",
    "WeightFormat",
    "check_finite",
    "column_groups",
    "format_family",
    "quantize_matrix",
]
