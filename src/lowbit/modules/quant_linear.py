"""QuantLinear: an nn.Linear whose weight stays int4-packed and is multiplied by the W4A16 kernel.

A model quantized by lowbit holds dequantized float weights (what the solvers measured). Swapping
its linears for QuantLinear keeps only the packed codes, scales and zero points (about a quarter of
the bf16 bytes) and runs y = x Wᵀ + b through `lowbit.kernels.w4a16_matmul`: the Triton kernel on
GPU, the dequantize-then-matmul reference on CPU. The weight is repacked once, here, into the
layout the kernel reads, never per call.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lowbit.formats.base import QuantizedWeight
from lowbit.kernels.int4_pack import PackedInt4, pack_quantized_weight
from lowbit.formats.vector import VectorFormat
from lowbit.kernels.w4a16 import w4a16_matmul
from lowbit.modules.vq_linear import VQLinear


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored as packed int4 (group-wise scales, optional zero points)."""

    def __init__(self, packed: PackedInt4, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.group_size = packed.group_size
        # Buffers, so .to(device) moves them and state_dict saves them; they are not trainable.
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("input_perm", packed.input_perm)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Pack a solver's QuantizedWeight (4-bit integer format); FormatError for anything else."""
        return cls(pack_quantized_weight(qweight), bias)

    @property
    def packed(self) -> PackedInt4:
        return PackedInt4(self.qweight, self.scales, self.zeros, self.group_size, self.in_features,
                          self.out_features, self.input_perm)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 [out, in] weight this module multiplies by (for checks and debugging)."""
        return self.packed.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w4a16_matmul(x, self.packed)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kind = "sym" if self.zeros is None else "asym"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 {kind} g{self.group_size}"


def _module_for(qweight: QuantizedWeight, bias: torch.Tensor | None) -> nn.Module:
    if isinstance(qweight.format, VectorFormat):
        return VQLinear(qweight, bias)
    return QuantLinear.from_quantized(qweight, bias)


def replace_linears(model: nn.Module, quantized: Mapping[str, QuantizedWeight]) -> nn.Module:
    """Swap every nn.Linear named in `quantized` (full module names) for a QuantLinear (int4) or a
    VQLinear (vector-quantized), in place.

    The QuantLinear lands on the device of the linear it replaces. Returns the model.
    """
    for name, qweight in quantized.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not an nn.Linear; nothing to replace")
        if tuple(qweight.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}: quantized weight {tuple(qweight.shape)} does not fit the linear's "
                             f"({linear.out_features}, {linear.in_features})")
        module = _module_for(qweight, linear.bias).to(linear.weight.device)
        setattr(parent, child, module)
    return model
