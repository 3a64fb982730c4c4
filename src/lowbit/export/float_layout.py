"""Floating-point layers in compressed-tensors' layouts (names and dtypes as compressed-tensors 0.20
writes and reads them):

- FP8 E4M3 with a scale per channel / group / tensor, `float-quantized`: `weight` float8_e4m3fn
  [out, in] (the codes are its bytes), `weight_scale` [out, 1] / [out, groups] / [1] in the scale
  dtype. compressed-tensors multiplies weight.to(scale dtype) · scale, the product lowbit computes.
- NVFP4, `nvfp4-pack-quantized` (strategy tensor_group, group 16, scale dtype float8_e4m3fn):
  `weight_packed` uint8 [out, in/2], two E2M1 codes per byte, the even column in the low nibble;
  `weight_scale` float8_e4m3fn [out, in/16]; `weight_global_scale` float32 [1], the divisor of the
  block scales (lowbit's `global_scale`).
- MXFP4, `mxfp4-pack-quantized` (strategy group, group 32, scale dtype uint8): `weight_packed` as
  for NVFP4; `weight_scale` uint8 [out, in/32], the E8M0 byte 127 + log2(scale).

The E2M1 nibble and the E4M3 byte are lowbit's codes unchanged (sign bit on top, same bit order).
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.export.errors import ExportError
from lowbit.formats.base import QuantizedWeight, WeightFormat
from lowbit.formats.floating import FloatFormat, MXFormat, NVFP4Format
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR
from lowbit.formats.minifloat import E2M1, E4M3

FLOAT_FORMAT = "float-quantized"
NVFP4_FORMAT = "nvfp4-pack-quantized"
MXFP4_FORMAT = "mxfp4-pack-quantized"


def has_float_layout(fmt: WeightFormat) -> bool:
    """Whether compressed-tensors has a layout for this floating-point format."""
    if isinstance(fmt, FloatFormat):
        return fmt.element == E4M3
    if isinstance(fmt, MXFormat):
        return fmt.element == E2M1 and fmt.block_size == 32
    return isinstance(fmt, NVFP4Format) and fmt.block_size == 16


def float_scheme(fmt: WeightFormat) -> dict[str, Any]:
    """SchemeKey fields (compression format and weight QuantizationArgs) of a format that
    `has_float_layout` accepts."""
    if isinstance(fmt, NVFP4Format):
        return dict(compression=NVFP4_FORMAT, type="float", bits=4, symmetric=True, strategy="tensor_group",
                    group_size=16, scale_dtype=torch.float8_e4m3fn)
    if isinstance(fmt, MXFormat):
        return dict(compression=MXFP4_FORMAT, type="float", bits=4, symmetric=True, strategy="group",
                    group_size=32, scale_dtype=torch.uint8)
    assert isinstance(fmt, FloatFormat)
    if fmt.group_size == PER_TENSOR:
        strategy, group_size = "tensor", None
    elif fmt.group_size == PER_CHANNEL:
        strategy, group_size = "channel", None
    else:
        strategy, group_size = "group", fmt.group_size
    return dict(compression=FLOAT_FORMAT, type="float", bits=8, symmetric=True, strategy=strategy,
                group_size=group_size)


def pack_float_layer(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The layer's tensors (suffixes after `<module>.`) in its compressed-tensors layout."""
    fmt = qweight.format
    codes = qweight.codes.cpu()
    if isinstance(fmt, FloatFormat):
        scale = qweight.scale.cpu()
        return {"weight": codes.view(torch.float8_e4m3fn),
                "weight_scale": scale.reshape(1) if fmt.group_size == PER_TENSOR else scale}
    if codes.shape[1] % 2:
        raise ExportError(f"packed FP4 needs an even number of input columns, not {codes.shape[1]}")
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    if isinstance(fmt, NVFP4Format):
        scale = qweight.scale.cpu().to(torch.float8_e4m3fn)
        if not torch.equal(scale.float(), qweight.scale.cpu().float()):
            raise ExportError("NVFP4 block scales must be E4M3 values (fit them with NVFP4Format.fit)")
        return {"weight_packed": packed, "weight_scale": scale,
                "weight_global_scale": torch.tensor([fmt.global_scale], dtype=torch.float32)}
    exponent = torch.frexp(qweight.scale.cpu().float())[1] - 1
    return {"weight_packed": packed, "weight_scale": (exponent + 127).to(torch.uint8)}


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes [out, in] from `weight_packed` [out, in/2]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
