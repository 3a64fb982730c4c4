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
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR, IntegerFormat

FORMATS: dict[str, type[WeightFormat]] = {IntegerFormat.name: IntegerFormat}

__all__ = [
    "FORMATS",
    "PER_CHANNEL",
    "PER_TENSOR",
    "FormatError",
    "GroupParams",
    "IntegerFormat",
    "QuantizedWeight",
    "SparseOutliers",
    "WeightFormat",
    "check_finite",
    "column_groups",
    "quantize_matrix",
]
