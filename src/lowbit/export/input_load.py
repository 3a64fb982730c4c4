"""Restoring activation quantization when an export is loaded back, so `lowbit eval out/` measures
the W8A8 model that vLLM serves rather than its weights alone.

transformers (with compressed-tensors 0.20) already rounds the inputs of layers whose config group
has `input_activations`, on CPU too: its quantized forward fake-quantizes the input before the
(decompressed) matmul. Its integer rule differs from vLLM's kernels, though: it takes a symmetric
int8 scale as max|x| / 127.5 with codes in [-128, 127], where vLLM's dynamic per-token kernel (and
lowbit) use max|x| / 127 and [-127, 127]. FP8 agrees (max|x| / 448, round to nearest even). So
lowbit's loader switches compressed-tensors' rounding off for those layers (`quantization_enabled =
False`, its documented switch) and attaches lowbit's input quantizer instead, with the static scale
read from the checkpoint in float32 (vLLM keeps `input_scale` in float32 whatever the model dtype).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowbit.export.layout import activation_format
from lowbit.export.shards import INDEX_FILE, SINGLE_FILE
from lowbit.modules.input_quant import quantize_inputs


def restore_input_quantization(model: nn.Module, folder: Path) -> int:
    """Attach lowbit's input quantizer to every layer whose scheme quantizes its input; returns how many."""
    restored = 0
    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "input_activations", None)
        if args is None:
            continue
        fmt = activation_format(args)
        scale = None if fmt.dynamic else stored_tensor(folder, f"{name}.input_scale")
        quantize_inputs(module, fmt, scale)
        module.quantization_enabled = False
        restored += 1
    return restored


def stored_tensor(folder: Path, name: str) -> torch.Tensor:
    """One tensor of an export as written (its own dtype), from whichever shard holds it."""
    index = folder / INDEX_FILE
    shard = json.loads(index.read_text())["weight_map"][name] if index.is_file() else SINGLE_FILE
    with safe_open(str(folder / shard), framework="pt") as file:
        return file.get_tensor(name)
