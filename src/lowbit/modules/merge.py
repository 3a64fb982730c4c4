"""Linears that read the same input, multiplied as one: q/k/v, and gate/up, in a decode step.

At batch 1 a decode step's matmuls are small (an 8B model's k/v projections are 1024 x 4096) and
take a few microseconds each, mostly the time to fill the GPU and drain it again; one product
with the outputs side by side pays that once and gives the GEMV more columns to spread over the
SMs. The merged module holds the only copy of the weights: the model's own linears are re-pointed
at their slices of it (views), so they compute what they did and merging costs no memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lowbit.kernels.int4_pack import concat_outputs
from lowbit.modules.quant_linear import QuantLinear


def merge_linears(modules: Sequence[nn.Module]) -> nn.Module | None:
    """One module computing every module's output, concatenated along the last dimension, or None
    where they do not share a form: all nn.Linear (same input size, dtype, device, bias or none)
    or all QuantLinear whose packed layouts concatenate (int4_pack.concat_outputs), none with hooks
    (an input quantizer or an online rotation runs as a forward pre-hook, which the merged module
    would skip). Each module's tensors become views of the merged module's (module.weight =
    merged.weight[rows], and the packed words, scales and zero points' columns): their old storage
    is freed."""
    if any(m._forward_pre_hooks or m._forward_hooks for m in modules):
        return None
    if all(type(m) is nn.Linear for m in modules):
        first = modules[0]
        if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
               or m.weight.device != first.weight.device or (m.bias is None) != (first.bias is None)
               for m in modules):
            return None
        merged = nn.Linear(first.in_features, sum(m.out_features for m in modules), bias=first.bias is not None,
                           device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(torch.cat([m.weight for m in modules]))
            if first.bias is not None:
                merged.bias.copy_(torch.cat([m.bias for m in modules]))
        merged.requires_grad_(False)
        for module, rows in zip(modules, _slices([m.out_features for m in modules])):
            module.weight = nn.Parameter(merged.weight[rows], requires_grad=False)
            if first.bias is not None:
                module.bias = nn.Parameter(merged.bias[rows], requires_grad=False)
        return merged
    if all(type(m) is QuantLinear for m in modules):
        packed = concat_outputs([m.packed for m in modules])
        if packed is None:
            return None
        biases = [m.bias for m in modules]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            biases = [torch.zeros(m.out_features, device=packed.qweight.device) if b is None else b
                      for m, b in zip(modules, biases)]
        bias = None if all(b is None for b in biases) else torch.cat([b.float() for b in biases])
        merged = QuantLinear(packed, bias)
        for module, columns in zip(modules, _slices([m.out_features for m in modules])):
            module.qweight, module.scales = merged.qweight[:, columns], merged.scales[:, columns]
            if merged.zeros is not None:
                module.zeros = merged.zeros[:, columns]
        return merged
    return None


def _slices(sizes: list[int]) -> list[slice]:
    """Consecutive slices of the given lengths: where each part's outputs sit in the merged ones."""
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [slice(end - size, end) for size, end in zip(sizes, ends)]
