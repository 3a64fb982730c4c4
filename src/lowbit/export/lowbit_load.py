"""Loading an export in lowbit's own layout (see lowbit_layout): the model is built from its config,
the stored codes are decoded by the same format code that quantized them (so the weights are the
in-memory quantized model's, bit for bit), and the dense tensors load as they are. A layer with a
low-rank correction runs it as a side branch (modules.lowrank_linear) instead of merging it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4
    from transformers.modeling_utils import no_init_weights

from lowbit.export.errors import ExportError
from lowbit.export.lowbit_layout import format_from_description, unpack_lowbit_layer
from lowbit.export.shards import ShardedTensors
from lowbit.formats.base import LowRankCorrection, WeightFormat, QuantizedWeight
from lowbit.modules.lowrank_linear import attach_lowrank


def _read_tensors(folder: Path, wanted: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """The export's tensors whose names `wanted` accepts (the others are never read)."""
    with ShardedTensors(folder) as tensors:
        return {name: tensors[name] for name in tensors.names() if wanted(name)}


def _targets(quantization: dict, kept: Callable[[WeightFormat], bool]) -> dict[str, WeightFormat]:
    """The quantized layers whose format `kept` accepts, with that format, by module name."""
    return {name: fmt for group in quantization["config_groups"].values()
            for fmt in [format_from_description(group["format"])] if kept(fmt) for name in group["targets"]}


def _quantized_layers(targets: Mapping[str, WeightFormat], state: dict[str, torch.Tensor],
                      folder: Path) -> dict[str, QuantizedWeight]:
    """The stored weight of each target layer; its tensors are taken out of `state`."""
    layers = {}
    for name, fmt in targets.items():
        prefix = f"{name}.weight_"
        parts = {key.removeprefix(f"{name}."): state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
        if "weight_codes" not in parts and "weight_signs" not in parts:
            raise ExportError(f"{folder} lacks the codes of {name} ({name}.weight_codes)")
        layers[name] = unpack_lowbit_layer(fmt, parts)
    return layers


def load_lowbit_weights(folder: Path, kept: Callable[[WeightFormat], bool] = lambda fmt: True
                        ) -> dict[str, QuantizedWeight]:
    """The stored weight of every quantized layer of a lowbit-layout export whose format `kept`
    accepts, by module name (only those layers' tensors are read): what `modules.replace_linears`
    needs to run the model on its codes (VQLinear) instead of dense weights."""
    folder = Path(folder)
    targets = _targets(AutoConfig.from_pretrained(folder).quantization_config, kept)
    state = _read_tensors(folder, lambda key: key.rpartition(".")[0] in targets)
    return _quantized_layers(targets, state, folder)


def load_lowbit_layout(folder: Path, device: str | torch.device, dtype: torch.dtype | None,
                       replacements: Mapping[str, nn.Module] | None = None) -> PreTrainedModel:
    """The model with every lowbit-layout layer decoded to a dense weight, on `device`, in eval mode.

    `replacements`: modules that take the named layers' places instead; those layers' tensors
    (codes and bias alike: a replacement holds its own) are neither read nor decoded."""
    config = AutoConfig.from_pretrained(folder)
    quantization = config.quantization_config
    del config.quantization_config
    dtype = dtype or config.dtype or torch.float32
    with no_init_weights():  # every tensor is loaded below (or reported missing): no random fill first
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replaced = set(replacements or {})
    for name, module in (replacements or {}).items():
        model.set_submodule(name, module)
    state = _read_tensors(folder, lambda key: key.rpartition(".")[0] not in replaced)
    corrections: dict[str, LowRankCorrection] = {}
    targets = {name: fmt for name, fmt in _targets(quantization, lambda fmt: True).items() if name not in replaced}
    for name, qweight in _quantized_layers(targets, state, folder).items():
        if qweight.lowrank is not None:
            corrections[name], qweight.lowrank = qweight.lowrank, None
        state[f"{name}.weight"] = qweight.dequantize().to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {key for key in missing if key in (getattr(model, "_tied_weights_keys", None) or ())}
    missing = sorted(key for key in set(missing) - tied if not any(key.startswith(f"{name}.") for name in replaced))
    if missing or unexpected:
        problem = f"lacks {missing[:3]}" if missing else f"has unexpected tensors {sorted(unexpected)[:3]}"
        raise ExportError(f"{folder} {problem}; it was not written by this lowbit version")
    model.tie_weights()
    for name, correction in corrections.items():
        attach_lowrank(model, name, correction)
    return model.to(device).eval()
