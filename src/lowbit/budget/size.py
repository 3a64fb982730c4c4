"""Storage cost of a plan, predicted from formats and measured from a saved checkpoint.

A budget is only honest if the files on disk meet it, so the same quantity is computed two ways:
`linear_bits` from a format's own accounting before anything is quantized, and `saved_size` from
the tensors of an exported compressed-tensors folder. The quantized part of a layer on disk is its
packed codes, scales and zero points (`weight_shape`, 16 bytes of metadata per layer, is left
out); everything else in the safetensors files is dense (embeddings, norms, unquantized heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from torch import nn

from lowbit.formats.base import WeightFormat

QUANTIZED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point")
"""Tensors of a compressed-tensors layer that hold its weight (codes and their parameters)."""


def linear_bits(fmt: WeightFormat, rows: int, columns: int) -> float:
    """Bits a [rows, columns] weight takes in `fmt`, scales and zero points included."""
    return fmt.bits_per_weight(rows, columns) * rows * columns


def dense_bytes(model: nn.Module, quantized: set[str]) -> int:
    """Bytes of every state-dict tensor outside the quantized linears' weights, tied tensors once.

    The exporter writes these tensors in the dtype they have in memory, so this is what the
    checkpoint will hold besides the quantized layers.
    """
    seen: set[int] = set()
    total = 0
    for name, tensor in model.state_dict().items():
        if name.removesuffix(".weight") in quantized:
            continue
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class SavedSize:
    """Sizes read back from the safetensors files of an export."""

    quantized_weights: int = 0
    """Weights (rows x columns) of the quantized layers."""
    quantized_bits: int = 0
    """Bits of their packed codes, scales and zero points."""
    dense_bytes: int = 0
    layers: dict[str, float] = field(default_factory=dict)
    """Bits per weight of each quantized layer, by module name."""

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensors of the checkpoint, quantized and dense (headers and metadata excluded)."""
        return self.quantized_bits // 8 + self.dense_bytes


def saved_size(folder: Path) -> SavedSize:
    """Measure an exported folder: bits of each quantized layer and bytes of the dense tensors."""
    size = SavedSize()
    layer_bits: dict[str, int] = {}
    shapes: dict[str, tuple[int, int]] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                dtype = _DTYPE_BITS[tensor.get_dtype()]
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                module, _, suffix = name.rpartition(".")
                if name.endswith(".weight_shape"):
                    shapes[module] = tuple(int(v) for v in handle.get_tensor(name).tolist())
                elif name.endswith(QUANTIZED_SUFFIXES):
                    layer_bits[module] = layer_bits.get(module, 0) + count * dtype
                else:
                    size.dense_bytes += count * dtype // 8
    for module, bits in sorted(layer_bits.items()):
        rows, columns = shapes[module]
        size.quantized_weights += rows * columns
        size.quantized_bits += bits
        size.layers[module] = bits / (rows * columns)
    return size


_DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
    "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
}
