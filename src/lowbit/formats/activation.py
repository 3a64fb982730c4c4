"""Activation formats: how the input of a quantized linear is rounded at run time (the "A" of W8A8).

Weights are rounded once, offline; activations are rounded on every forward pass, so their format
says how the scale is found as well as the grid:

- `dynamic` with `granularity: token`: one scale per token (row of the input), computed from that
  row at run time, the scheme vLLM's W8A8 int8 and FP8-dynamic kernels run (scale = max|x_row| /
  127 for int8, / 448 for FP8 E4M3). Nothing is stored in the checkpoint.
- `dynamic` with `granularity: tensor`: one scale per call, from the whole input.
- static (`dynamic: false`, `granularity: tensor`): one scale per layer, calibrated as the largest
  |x| the layer saw on the calibration data, stored beside the weights (compressed-tensors'
  `input_scale`). Inputs beyond it saturate.

Integer grids are symmetric ([-(2^(b-1) - 1), 2^(b-1) - 1] · scale, the range vLLM's symmetric int8
kernels produce) or asymmetric (2^b levels from min to max per token, with a zero point, as vLLM's
"azp" kernels do; dynamic only). FP8 E4M3 rounds to nearest even and saturates at ±448 (see
`minifloat`). The rounding is simulated in float32 ("fake quantization"): the value a real kernel
multiplies with, returned in the input's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from lowbit.formats.minifloat import E4M3

MIN_SCALE = 1e-12
"""Floor of a scale: an all-zero token must stay zero, not become NaN."""


class ActivationFormat(BaseModel):
    """The number format and scale rule of the inputs of quantized linears (a recipe's `activations`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["int", "fp8_e4m3"] = "int"
    bits: int = 8
    granularity: Literal["token", "tensor"] = "token"
    dynamic: bool = True
    symmetric: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "ActivationFormat":
        if self.type == "fp8_e4m3" and (self.bits != 8 or not self.symmetric):
            raise ValueError("fp8_e4m3 activations are 8 bits and symmetric; drop bits/symmetric")
        if self.type == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"integer activations take 2..8 bits, got {self.bits}")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError("static activation scales are per tensor; use granularity: tensor or dynamic: true")
        if not self.dynamic and not self.symmetric:
            raise ValueError("static activation scales are symmetric; use symmetric: true or dynamic: true")
        return self

    @property
    def grid_max(self) -> float:
        """The largest magnitude on the grid: scale = max|x| / grid_max (symmetric)."""
        return E4M3.max if self.type == "fp8_e4m3" else float((1 << (self.bits - 1)) - 1)

    def describe(self) -> str:
        number = "fp8" if self.type == "fp8_e4m3" else f"int{self.bits}"
        how = f"dynamic per-{self.granularity}" if self.dynamic else "static per-tensor"
        return f"activations {number} {how}{'' if self.symmetric else ' asym'}"

    def static_scale(self, max_abs: torch.Tensor | float) -> torch.Tensor:
        """The stored per-tensor scale for inputs whose largest magnitude on the calibration data is `max_abs`."""
        return (torch.as_tensor(max_abs, dtype=torch.float32) / self.grid_max).clamp(min=MIN_SCALE).reshape(1)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x rounded to this format and back, in x's dtype; `scale` is the static scale (None: dynamic)."""
        if self.dynamic == (scale is not None):
            raise ValueError("pass a scale exactly when activation scales are static")
        values = x.float()
        if not self.symmetric:
            return _asymmetric(values, self.bits, self.granularity).to(x.dtype)
        if scale is None:
            magnitude = values.abs().amax(dim=-1, keepdim=True) if self.granularity == "token" else values.abs().amax()
            scale = (magnitude / self.grid_max).clamp(min=MIN_SCALE)
        scale = scale.to(device=values.device, dtype=torch.float32)
        scaled = values / scale
        if self.type == "fp8_e4m3":
            # torch's cast rounds to nearest even like E4M3.round, several times faster (this runs
            # on every forward pass); it turns values beyond ±448 into NaN, hence the clamp.
            rounded = scaled.clamp(-E4M3.max, E4M3.max).to(torch.float8_e4m3fn).float()
        else:
            rounded = scaled.round().clamp(-self.grid_max, self.grid_max)
        return (rounded * scale).to(x.dtype)


def _asymmetric(values: torch.Tensor, bits: int, granularity: str) -> torch.Tensor:
    """2^bits levels from the minimum to the maximum (zero always representable), per token or tensor."""
    if granularity == "token":
        low, high = values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True)
    else:
        low, high = values.amin(), values.amax()
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).clamp(min=MIN_SCALE)
    zero = (-low / scale).round()
    codes = (values / scale).round().add(zero).clamp(0, levels)
    return (codes - zero) * scale


ACTIVATION_SPEC_HELP = (
    "none, or int<bits> | fp8 followed by any of -token (default) / -tensor, -static (per tensor, "
    "calibrated), -asym: e.g. int8, int4, fp8, fp8-static, int8-tensor"
)


def parse_activations(spec: str) -> ActivationFormat | None:
    """The activation format a short spec names (the CLI's --activations; see ACTIVATION_SPEC_HELP)."""
    if spec == "none":
        return None
    number, *options = spec.split("-")
    unknown = set(options) - {"token", "tensor", "static", "asym"}
    if unknown or not (number == "fp8" or (number.startswith("int") and number[3:].isdigit())):
        raise ValueError(f"bad activation spec {spec!r}; expected {ACTIVATION_SPEC_HELP}")
    static = "static" in options
    return ActivationFormat(
        type="fp8_e4m3" if number == "fp8" else "int",
        bits=8 if number == "fp8" else int(number[3:]),
        granularity="tensor" if static or "tensor" in options else "token",
        dynamic=not static,
        symmetric="asym" not in options,
    )
