"""One quantized linear layer in compressed-tensors' `pack-quantized` layout.

What compressed-tensors (0.20) reads back, checked by loading through transformers:

- `weight_packed`: int32 [out, ceil(in * bits / 32)]. Codes are stored *signed*
  (code - 2^(bits-1), in int8) and packed densely along the input axis, lowest bits first, with
  values split across word boundaries when 32 is not a multiple of `bits` (3, 5, 6, 7 bits).
  Older compressed-tensors releases packed 3-bit codes 10 to a word, so 3-bit exports need a
  release with dense packing.
- `weight_scale`: [out, n_groups] (group), [out, 1] (channel) or [1] (tensor), in the stored
  scale dtype.
- `weight_zero_point`: only for asymmetric schemes, signed like the codes; int32 packed along
  the *output* axis ([ceil(out * bits / 32), n_groups]) for group and channel strategies, a
  plain int8 [1] for the tensor strategy.
- `weight_shape`: int64 [2], the unpacked [out, in].

The value of a weight is (code - zero) * scale in both conventions, so lowbit's unsigned codes and
zero points convert exactly: both are shifted by the same 2^(bits-1). A symmetric lowbit format
(implied zero 2^(bits-1)) is a compressed-tensors symmetric scheme with no zero point.

With quantized activations (W8A8) a symmetric 8-bit integer layer is written `int-quantized`
instead, the layout vLLM's int8 W8A8 kernels read: `weight` int8 [out, in] (the signed codes
unpacked), `weight_scale` as above. Other widths stay `pack-quantized` with the activation scheme
beside them (W4A8). The activation scheme goes into the layer's config group as
`input_activations`; a static scale is stored as `<module>.input_scale`, float32 [1].

Limits of the format: groups must divide in_features (its dequantizer reshapes the columns into
equal groups), and there is no per-column group index (`g_idx`, act-order "group"), which
compressed-tensors has removed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs

from lowbit.export.errors import ExportError
from lowbit.formats.activation import ActivationFormat
from lowbit.export.float_layout import float_scheme, has_float_layout, pack_float_layer
from lowbit.export.lowbit_layout import (has_lowbit_layout, lowbit_scheme, needs_lowbit_layout, pack_lowbit_layer,
                                         pack_unsigned, to_signed)
from lowbit.formats.binary import BinaryFormat
from lowbit.formats.base import QuantizedWeight, WeightFormat
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR, IntegerFormat

PACK_FORMAT = "pack-quantized"
"""compressed-tensors' name for bit-packed integer weights (any of 2..8 bits in 0.20)."""
INT8_FORMAT = "int-quantized"
"""compressed-tensors' name for unpacked int8 weights with quantized activations (vLLM's W8A8)."""

_KERNEL_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
"""Group sizes worth suggesting when the requested one does not divide a layer."""


@dataclass(frozen=True)
class SchemeKey:
    """The weight quantization settings of a layer; layers with equal keys share a config group.

    `compression` is the compressed-tensors format of the group (pack-quantized for integers,
    float_layout's formats for FP8/NVFP4/MXFP4, or lowbit's own LOWBIT_FORMAT)."""

    bits: int
    symmetric: bool
    strategy: str
    group_size: int | None
    type: str = "int"
    scale_dtype: torch.dtype | None = None
    compression: str = PACK_FORMAT
    description: tuple[tuple[str, Any], ...] = ()
    """lowbit-layout groups only: the format description (see lowbit_layout.describe_format)."""
    input_activations: ActivationFormat | None = None

    def to_args(self) -> QuantizationArgs:
        return QuantizationArgs(
            num_bits=self.bits,
            type=self.type,
            symmetric=self.symmetric,
            strategy=self.strategy,
            group_size=self.group_size,
            dynamic=False,
            scale_dtype=self.scale_dtype,
        )

    def input_args(self) -> QuantizationArgs | None:
        """The `input_activations` of the layer's config group (None: weight-only)."""
        fmt = self.input_activations
        if fmt is None:
            return None
        return QuantizationArgs(
            num_bits=fmt.bits,
            type="float" if fmt.type == "fp8_e4m3" else "int",
            symmetric=fmt.symmetric,
            strategy=fmt.granularity,
            dynamic=fmt.dynamic,
            **({} if fmt.dynamic else {"observer": "static_minmax"}),
        )


def activation_format(args: QuantizationArgs) -> ActivationFormat:
    """The activation format a config group's `input_activations` describe (the inverse of
    SchemeKey.input_args); ExportError for the schemes lowbit does not run."""
    if args.type == "float" and args.num_bits != 8:
        raise ExportError(f"input activations of {args.num_bits}-bit floats are not supported (FP8 only)")
    if args.strategy not in ("token", "tensor"):
        raise ExportError(f"input activation strategy {args.strategy!r} is not supported (token or tensor)")
    return ActivationFormat(
        type="fp8_e4m3" if args.type == "float" else "int", bits=args.num_bits,
        granularity=args.strategy, dynamic=bool(args.dynamic), symmetric=args.symmetric,
    )


def scheme_key(fmt: IntegerFormat) -> SchemeKey:
    if fmt.group_size == PER_TENSOR:
        return SchemeKey(fmt.bits, fmt.symmetric, "tensor", None)
    if fmt.group_size == PER_CHANNEL:
        return SchemeKey(fmt.bits, fmt.symmetric, "channel", None)
    return SchemeKey(fmt.bits, fmt.symmetric, "group", fmt.group_size)


def check_exportable(
    fmt: WeightFormat, in_features: int, layer_name: str | None = None, *, permuted_groups: bool = False
) -> str | None:
    """Why a layer of this format and width cannot be exported to compressed-tensors, or None.

    Meant for the CLI to call before any work starts. `permuted_groups` says the solver will
    produce a non-identity group index (act-order that regroups columns); static act-order, which
    keeps groups of consecutive columns, exports fine.
    """
    where = f"{layer_name}: " if layer_name else ""
    if not isinstance(fmt, IntegerFormat) and not has_float_layout(fmt) and not has_lowbit_layout(fmt):
        return f"{where}format {type(fmt).__name__} has no compressed-tensors or lowbit layout"
    group_size = fmt.group_size_for(in_features)
    # Binary weights store their group layout explicitly; a shorter last group is fine there.
    if not isinstance(fmt, BinaryFormat) and group_size != in_features and in_features % group_size:
        dividing = [str(size) for size in _KERNEL_GROUP_SIZES if in_features % size == 0]
        choices = ", ".join(dividing) + " or " if dividing else ""
        return (
            f"{where}group size {group_size} does not divide in_features={in_features}; "
            f"compressed-tensors needs equal groups: use group size {choices}-1 (per channel)"
        )
    if permuted_groups:
        return (
            f"{where}act-order that regroups columns needs a per-column group index (g_idx), which "
            "compressed-tensors no longer supports; use static act-order (groups of consecutive columns)"
        )
    return None


def activation_export_problem(fmt: WeightFormat, activations: ActivationFormat | None, layer_name: str) -> str | None:
    """Why a layer of this format cannot be exported with quantized inputs, or None."""
    if activations is not None and has_lowbit_layout(fmt):
        return (f"{layer_name}: quantized activations are not exportable with lowbit's own layout "
                "(nf4, lut, fp8_e5m2); use an int or fp8_e4m3 weight format")
    return None


def pack_layer(
    name: str, qweight: QuantizedWeight, activations: ActivationFormat | None = None
) -> tuple[SchemeKey, dict[str, torch.Tensor]]:
    """The config-group key of one layer and its tensors, named `<name>.weight_packed` etc.;
    `activations` is the format its input is rounded to at run time (None: weight-only)."""
    fmt = qweight.format
    rows, columns = qweight.shape
    # Binary weights keep salient columns in groups of their own; their layout checks that itself.
    regrouped = not isinstance(fmt, BinaryFormat) and not qweight.has_trivial_group_index
    problem = check_exportable(fmt, columns, name, permuted_groups=regrouped)
    if problem:
        raise ExportError(problem)
    if has_float_layout(fmt):
        key = SchemeKey(**float_scheme(fmt), input_activations=activations)
        tensors = pack_float_layer(qweight)
        return key, {f"{name}.{suffix}": tensor.contiguous() for suffix, tensor in tensors.items()}
    problem = activation_export_problem(fmt, activations, name)
    if problem is None and activations is not None and needs_lowbit_layout(qweight):
        problem = (f"{name}: quantized activations are not exportable with sparse outliers or EoRA factors "
                   "(lowbit's own layout); drop --outliers/--eora-rank or the activations")
    if problem:
        raise ExportError(problem)
    if needs_lowbit_layout(qweight):
        key, tensors = SchemeKey(**lowbit_scheme(fmt)), pack_lowbit_layer(qweight)
        return key, {f"{name}.{suffix}": tensor.contiguous() for suffix, tensor in tensors.items()}
    assert isinstance(fmt, IntegerFormat)
    key = dataclasses.replace(scheme_key(fmt), input_activations=activations)
    _check_params(name, qweight, fmt, key)

    if activations is not None and fmt.bits == 8 and fmt.symmetric:
        key = dataclasses.replace(key, compression=INT8_FORMAT)
        tensors = {"weight": to_signed(qweight.codes.cpu(), fmt.bits),
                   "weight_scale": _per_tensor_as_1d(qweight.scale.cpu(), key)}
        return key, {f"{name}.{suffix}": tensor.contiguous() for suffix, tensor in tensors.items()}
    tensors = {
        "weight_packed": pack_unsigned(qweight.codes.cpu(), fmt.bits),
        "weight_scale": _per_tensor_as_1d(qweight.scale.cpu(), key),
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64),
    }
    if qweight.zero is not None:
        if key.strategy == "tensor":
            tensors["weight_zero_point"] = _per_tensor_as_1d(to_signed(qweight.zero.cpu(), fmt.bits), key)
        else:
            tensors["weight_zero_point"] = pack_unsigned(qweight.zero.cpu(), fmt.bits, packed_dim=0)
    return key, {f"{name}.{suffix}": tensor.contiguous() for suffix, tensor in tensors.items()}


def _per_tensor_as_1d(param: torch.Tensor, key: SchemeKey) -> torch.Tensor:
    """compressed-tensors keeps a per-tensor parameter as shape [1], not lowbit's [1, 1]."""
    return param.reshape(1) if key.strategy == "tensor" else param


def _check_params(name: str, qweight: QuantizedWeight, fmt: IntegerFormat, key: SchemeKey) -> None:
    """Refuse codes and parameters that the checkpoint would store wrongly or that loaders misread."""
    codes = qweight.codes
    if codes.dtype != torch.uint8 or codes.ndim != 2:
        raise ExportError(f"{name}: codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if int(codes.max()) > fmt.max_code:
        raise ExportError(f"{name}: codes exceed {fmt.max_code}, the largest {fmt.bits}-bit code")
    rows, columns = codes.shape
    if key.group_size is None:
        expected = (1, 1) if key.strategy == "tensor" else (rows, 1)
    else:
        expected = (rows, columns // key.group_size)
    for what, param in (("scale", qweight.scale), ("zero", qweight.zero)):
        if param is not None and tuple(param.shape) != expected:
            raise ExportError(f"{name}: {what} has shape {tuple(param.shape)}, expected {expected}")
    if fmt.symmetric != (qweight.zero is None):
        raise ExportError(f"{name}: zero points must be given exactly when the format is asymmetric")
    zero = qweight.zero
    in_range = zero is None or bool(0 <= zero.min() <= zero.max() <= fmt.max_code)
    if zero is not None and not (in_range and torch.equal(zero, zero.round())):
        raise ExportError(f"{name}: zero points must be integers in 0..{fmt.max_code}")
