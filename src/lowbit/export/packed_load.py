"""Running an export on its codes: 4-bit integer layers as QuantLinear, vector-quantized ones as VQLinear.

`load_quantized` gives every layer a dense weight, which is what evaluation wants. To use the
speed and memory a quantized export buys, its layers are read back as the modules whose matmuls
read the codes: an int4 layer's stored words are already the W4A16 kernel's (transposed), so it
becomes a QuantLinear before the export is decompressed and is never decoded; a VQ layer is read
back as the QuantizedWeight it was written from and swapped for a VQLinear. Layers neither module
holds (other widths, sparse outliers or low-rank corrections, quantized inputs, an online rotation
on the layer's input) keep their dense weight, so the model computes the same function either
way (up to the order of each product's sums).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lowbit.export.layout import PACK_FORMAT
from lowbit.export.errors import ExportError
from lowbit.export.load import load_quantized, online_rotation_layers
from lowbit.export.lowbit_layout import LOWBIT_QUANT_METHOD, unpack_signed
from lowbit.export.lowbit_load import load_lowbit_weights
from lowbit.export.shards import ShardedTensors
from lowbit.formats.base import QuantizedWeight
from lowbit.formats.vector import VectorFormat
from lowbit.kernels.int4_pack import CODES_PER_WORD, PackedInt4
from lowbit.modules import QuantLinear, VQLinear


def load_packed(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, int]:
    """The export as `load_quantized` gives it, with every layer QuantLinear or VQLinear can hold
    swapped for it, on `device`; and the tokenizer and the number of layers swapped.

    Both take their places before the rest of the export loads, so their codes are read once and
    never decoded to dense weights. A layer with an online rotation on its input stays dense: the
    rotation is restored onto the dense module."""
    folder = Path(path)
    rotated = online_rotation_layers(folder)
    layers = {name: layer for name, layer in packed_layers(folder).items() if name not in rotated}
    with ShardedTensors(folder) as tensors:
        modules = {name: _on_codes(layer, tensors.get(f"{name}.bias")) for name, layer in layers.items()}
    model, tokenizer = load_quantized(folder, device="cpu", dtype=dtype, replacements=modules)
    return model.to(device), tokenizer, len(layers)


def _on_codes(layer: PackedInt4 | QuantizedWeight, bias: torch.Tensor | None) -> QuantLinear | VQLinear:
    return QuantLinear(layer, bias) if isinstance(layer, PackedInt4) else VQLinear(layer, bias)


def packed_layers(folder: Path) -> dict[str, PackedInt4 | QuantizedWeight]:
    """The layers of an export that run on their codes, by module name: 4-bit weight-only integer
    layers of a compressed-tensors export, in the W4A16 kernel's layout; the vector-quantized layers
    of a lowbit-layout one (whose int4 layers all carry outliers or corrections), as quantized."""
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if config.get("quant_method") == LOWBIT_QUANT_METHOD:
        vq = load_lowbit_weights(folder, lambda fmt: isinstance(fmt, VectorFormat))
        return {name: qweight for name, qweight in vq.items() if qweight.lowrank is None and qweight.sparse is None}
    layers = {}
    groups = list((config.get("config_groups") or {}).values())
    with ShardedTensors(folder) as tensors:
        for group in groups:
            weights = group.get("weights") or {}
            if (group.get("format") != PACK_FORMAT or group.get("input_activations") or weights.get("type") != "int"
                    or weights.get("num_bits") != 4 or weights.get("strategy") not in ("group", "channel")):
                continue
            names = [name for name in group.get("targets", []) if f"{name}.weight_packed" in tensors]
            if not names and len(groups) == 1:  # a class target ("Linear", llm-compressor's): every packed layer
                names = [key.removesuffix(".weight_packed") for key in tensors.names()
                         if key.endswith(".weight_packed")]
            layers.update({name: _packed_layer(name, weights, tensors) for name in names})
    return layers


def _packed_layer(name: str, weights: dict, tensors: ShardedTensors) -> PackedInt4:
    """One pack-quantized layer in the kernel's layout, read off its words.

    compressed-tensors stores the codes offset by 8 (export/layout.py writes them signed), so the
    nibbles of `weight_packed` [N, K / 8] are the unsigned codes, code j of a word in bits 4j ..
    4j + 3: the kernel's words [K / 8, N] are its transpose, and no code is unpacked. Zero points
    are packed along the output dimension instead and are few: they are unpacked.
    """
    rows, columns = (int(v) for v in tensors[f"{name}.weight_shape"])
    scale = tensors[f"{name}.weight_scale"]  # [N, groups]
    words = tensors[f"{name}.weight_packed"]
    if columns % CODES_PER_WORD or tuple(words.shape) != (rows, columns // CODES_PER_WORD):
        raise ExportError(f"{name}.weight_packed has shape {tuple(words.shape)}, not the "
                          f"({rows}, {columns} / {CODES_PER_WORD}) of a {rows}x{columns} int4 weight; "
                          "the export is damaged or not lowbit's")
    zero = None
    if f"{name}.weight_zero_point" in tensors:
        zero = unpack_signed(tensors[f"{name}.weight_zero_point"], 4, scale.shape, packed_dim=0, dtype=scale.dtype)
    group_size = weights.get("group_size") if weights["strategy"] == "group" else columns
    return PackedInt4(qweight=words.T.contiguous(), scales=scale.T.contiguous(),
                      zeros=None if zero is None else zero.T.contiguous(), group_size=group_size,
                      in_features=columns, out_features=rows)
