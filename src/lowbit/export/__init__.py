"""Writing quantized models in formats that serving engines read, and loading them back for evaluation."""

from lowbit.export.compressed_tensors import CompressedTensorsWriter
from lowbit.export.errors import ExportError
from lowbit.export.layout import check_exportable
from lowbit.export.load import check_export_folder, load_quantized

__all__ = [
    "CompressedTensorsWriter",
    "ExportError",
    "check_export_folder",
    "check_exportable",
    "load_quantized",
]
