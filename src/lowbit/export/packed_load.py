"""Running an export on its codes: 4-bit integer layers as QuantLinear, vector-quantized ones as VQLinear.

`load_quantized` gives every layer a dense weight, which is what evaluation wants. To use the
speed and memory a quantized export buys, its layers are read back as the QuantizedWeight they
were written from (codes, scales, zero points, codebooks) and swapped for the modules whose
matmuls read those codes (modules.replace_linears). Layers neither module holds (other widths,
sparse outliers or low-rank corrections, quantized inputs, an online rotation hooked onto the
layer) keep their dense weight, so the model computes the same function either way (up to the
order of each product's sums).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lowbit.export.layout import PACK_FORMAT
from lowbit.export.load import load_quantized
from lowbit.export.lowbit_layout import LOWBIT_QUANT_METHOD, unpack_signed
from lowbit.export.lowbit_load import load_lowbit_weights
from lowbit.export.shards import INDEX_FILE, SINGLE_FILE
from lowbit.formats.base import QuantizedWeight
from lowbit.formats.integer import PER_CHANNEL, IntegerFormat
from lowbit.formats.vector import VectorFormat
from lowbit.modules import replace_linears


def load_packed(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, int]:
    """The export as `load_quantized` gives it, with every layer QuantLinear or VQLinear can hold
    swapped for it, on `device`; and the tokenizer and the number of layers swapped."""
    model, tokenizer = load_quantized(path, device="cpu", dtype=dtype)
    swapped = 0
    for name, qweight in packed_layers(Path(path)).items():
        linear = model.get_submodule(name)
        if linear._forward_pre_hooks or linear._forward_hooks:
            continue  # an online rotation rides on this layer: it stays dense
        replace_linears(model, {name: qweight})
        swapped += 1
    return model.to(device), tokenizer, swapped


def packed_layers(folder: Path) -> dict[str, QuantizedWeight]:
    """The layers of an export that run on their codes, by module name, as they were quantized:
    4-bit weight-only integer layers of a compressed-tensors export; the vector-quantized layers
    of a lowbit-layout one (whose int4 layers all carry outliers or corrections)."""
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if config.get("quant_method") == LOWBIT_QUANT_METHOD:
        return {name: qweight for name, qweight in load_lowbit_weights(folder).items()
                if isinstance(qweight.format, VectorFormat) and qweight.lowrank is None and qweight.sparse is None}
    layers = {}
    groups = list((config.get("config_groups") or {}).values())
    with _TensorFiles(folder) as tensors:
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


def _packed_layer(name: str, weights: dict, tensors: "_TensorFiles") -> QuantizedWeight:
    """One pack-quantized layer (export/layout.py writes its codes and zero points signed)."""
    rows, columns = (int(v) for v in tensors[f"{name}.weight_shape"])
    scale = tensors[f"{name}.weight_scale"]
    group_size = weights.get("group_size") if weights["strategy"] == "group" else PER_CHANNEL
    fmt = IntegerFormat(4, symmetric=bool(weights.get("symmetric")), group_size=group_size)
    codes = unpack_signed(tensors[f"{name}.weight_packed"], 4, torch.Size([rows, columns]))
    zero = None
    if f"{name}.weight_zero_point" in tensors:
        zero = unpack_signed(tensors[f"{name}.weight_zero_point"], 4, scale.shape, packed_dim=0, dtype=scale.dtype)
    return QuantizedWeight(fmt, codes, scale, zero, torch.arange(columns) // fmt.group_size_for(columns))


class _TensorFiles:
    """The export's tensors by name, read from shards opened once (a context manager: they close at its end)."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX_FILE
        self._handles = ExitStack()
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_FILE]
        self._file = {}
        for file in files:
            handle = self._handles.enter_context(safe_open(str(folder / file), "pt"))
            self._file.update({name: handle for name in handle.keys()})

    def __enter__(self) -> "_TensorFiles":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.close()

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file[name].get_tensor(name)
