"""Fake-quantized linear inputs: the run-time half of weight-and-activation quantization.

`quantize_inputs(linear, fmt, scale)` makes `linear` round its input to `fmt` on every call, through
a forward pre-hook, so the module keeps its class, its name and its state dict (exports, loaders and
the pipeline see an ordinary nn.Linear). The hook object is also kept on the module, so
`input_quantizer(linear)` finds its format and static scale (what the export writes as
`input_scale`), and a deep copy of the model copies it along.

The pipeline attaches it to each linear the moment its weights are solved, so the next layers and
the next block are calibrated on what the quantized model really feeds them; evaluation and the
export's loader attach it too, so perplexity is measured on the W8A8 model, not on W8A16.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.activation import ActivationFormat

_ATTRIBUTE = "lowbit_input_quantizer"


class InputQuantizer:
    """Forward pre-hook rounding the first input of a linear to `fmt` (with `scale` when static)."""

    def __init__(self, fmt: ActivationFormat, scale: torch.Tensor | None = None) -> None:
        if fmt.dynamic != (scale is None):
            raise ValueError(f"{fmt.describe()} needs {'no' if fmt.dynamic else 'a'} calibrated scale")
        self.fmt = fmt
        self.scale = None if scale is None else scale.detach().float().reshape(1).cpu()

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.fmt.fake_quantize(args[0], self.scale), *args[1:])


def quantize_inputs(linear: nn.Module, fmt: ActivationFormat, scale: torch.Tensor | None = None) -> InputQuantizer:
    """Round `linear`'s input to `fmt` from now on, replacing any input quantizer it had."""
    remove_input_quantizer(linear)
    quantizer = InputQuantizer(fmt, scale)
    linear.register_forward_pre_hook(quantizer)
    setattr(linear, _ATTRIBUTE, quantizer)
    return quantizer


def input_quantizer(linear: nn.Module) -> InputQuantizer | None:
    """The input quantizer attached to `linear`, or None."""
    return getattr(linear, _ATTRIBUTE, None)


def remove_input_quantizer(linear: nn.Module) -> None:
    """Found by identity among the module's hooks rather than through a handle, which a deep copy of
    the model would leave pointing at the original's hooks."""
    quantizer = input_quantizer(linear)
    if quantizer is None:
        return
    for key, hook in list(linear._forward_pre_hooks.items()):
        if hook is quantizer:
            del linear._forward_pre_hooks[key]
    delattr(linear, _ATTRIBUTE)
