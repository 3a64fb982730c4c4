"""Loading an export in lowbit's own layout (see lowbit_layout): the model is built from its config,
the stored codes are decoded by the same format code that quantized them (so the weights are the
in-memory quantized model's, bit for bit), and the dense tensors load as they are. A layer with a
low-rank correction runs it as a side branch (modules.lowrank_linear) instead of merging it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lowbit.export.errors import ExportError
from lowbit.export.lowbit_layout import format_from_description, unpack_lowbit_layer
from lowbit.export.shards import INDEX_FILE, SINGLE_FILE
from lowbit.formats.base import LowRankCorrection, QuantizedWeight
from lowbit.modules.lowrank_linear import attach_lowrank

def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def _quantized_layers(
    quantization: dict, state: dict[str, torch.Tensor], folder: Path
) -> dict[str, QuantizedWeight]:
    """The stored weight of every lowbit-layout layer; its tensors are taken out of `state`."""
    layers = {}
    for group in quantization["config_groups"].values():
        fmt = format_from_description(group["format"])
        for name in group["targets"]:
            prefix = f"{name}.weight_"
            parts = {key.removeprefix(f"{name}."): state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
            if "weight_codes" not in parts and "weight_signs" not in parts:
                raise ExportError(f"{folder} lacks the codes of {name} ({name}.weight_codes)")
            layers[name] = unpack_lowbit_layer(fmt, parts)
    return layers


def load_lowbit_weights(folder: Path) -> dict[str, QuantizedWeight]:
    """The stored weight of every quantized layer of a lowbit-layout export, by module name: what
    `modules.replace_linears` needs to run the model on its codes (VQLinear) instead of dense weights."""
    quantization = AutoConfig.from_pretrained(folder).quantization_config
    return _quantized_layers(quantization, _read_tensors(Path(folder)), Path(folder))


def load_lowbit_layout(folder: Path, device: str | torch.device, dtype: torch.dtype | None) -> PreTrainedModel:
    """The model with every lowbit-layout layer decoded to a dense weight, on `device`, in eval mode."""
    config = AutoConfig.from_pretrained(folder)
    quantization = config.quantization_config
    del config.quantization_config
    dtype = dtype or config.dtype or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _read_tensors(folder)
    corrections: dict[str, LowRankCorrection] = {}
    for name, qweight in _quantized_layers(quantization, state, folder).items():
        if qweight.lowrank is not None:
            corrections[name], qweight.lowrank = qweight.lowrank, None
        state[f"{name}.weight"] = qweight.dequantize().to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {key for key in missing if key in (getattr(model, "_tied_weights_keys", None) or ())}
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        problem = f"lacks {missing[:3]}" if missing else f"has unexpected tensors {sorted(unexpected)[:3]}"
        raise ExportError(f"{folder} {problem}; it was not written by this lowbit version")
    model.tie_weights()
    for name, correction in corrections.items():
        attach_lowrank(model, name, correction)
    return model.to(device).eval()
