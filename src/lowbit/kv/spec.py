"""What a quantized KV cache does, as plain data: stored in recipes and exports, parsed from flags."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lowbit.kv.packing import PACKABLE_BITS

KV_CACHE_NAMES = {f"int{bits}": bits for bits in sorted(PACKABLE_BITS, reverse=True)}
"""`--kv-cache int4` and the like: the name of each integer width."""
ROW_KINDS = ("int8-token", "fp8")
"""`--kv-cache int8-token` / `fp8`: 8-bit codes with a scale per token and head (kv/row_codes.py),
the caches StaticDecoder decodes with."""
_ROW_FIXED = {"bits": 8, "group_size": 64, "residual": 0, "pre_rope": False}
"""What a row-coded cache's integer-layout fields must read (its codes are 8 bits, its rows whole
heads, no position stays exact beyond the one being written, keys are post-RoPE)."""


class KVCacheSpec(BaseModel):
    """A quantized KV cache: a KIVI-style integer cache (`kind` "int"), or 8-bit codes with a scale
    per token and head (`kind` "int8-token" or "fp8", kv/row_codes.py; the other fields keep their
    fixed values).

    Integer caches:

    `bits`: code width (8, 4 or 2). `group_size`: tokens per key group (keys are quantized per
    channel, in chunks of this many tokens) and channels per value group (values are quantized per
    token; a group never spans two heads, so it is capped at the head dimension). `residual`: the
    most recent tokens kept exact. `pre_rope`: quantize keys before the rotary embedding (KVQuant)
    and rotate them again when read.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["int", "int8-token", "fp8"] = "int"
    bits: int = 4
    group_size: int = Field(default=64, ge=1)
    residual: int = Field(default=128, ge=0)
    pre_rope: bool = False

    @model_validator(mode="before")
    @classmethod
    def _row_fields(cls, data: Any) -> Any:
        """A row-coded cache takes none of the integer layout's settings: a clear error for any given."""
        if not isinstance(data, dict) or data.get("kind") not in ROW_KINDS:
            return data
        for field, fixed in _ROW_FIXED.items():
            if data.get(field, fixed) != fixed:
                raise ValueError(f"the {data['kind']} KV cache quantizes each token's head as one row: it takes no "
                                 f"{field} setting (it is {fixed}); drop it, or choose an intN cache")
        return {**data, **_ROW_FIXED}

    @model_validator(mode="after")
    def _packable(self) -> KVCacheSpec:
        if self.bits not in PACKABLE_BITS:
            raise ValueError(f"KV cache bits must be one of {', '.join(map(str, PACKABLE_BITS))}, got {self.bits}")
        per_byte = 8 // self.bits
        if self.group_size % per_byte:
            raise ValueError(f"KV group size {self.group_size} must be a multiple of {per_byte} at {self.bits} bits "
                             "so that every group fills whole bytes")
        return self

    @property
    def name(self) -> str:
        return self.kind if self.kind in ROW_KINDS else f"int{self.bits}"

    def describe(self) -> str:
        if self.kind == "fp8":
            return "KV fp8 (e4m3, a scale per token and head)"
        if self.kind == "int8-token":
            return "KV int8-token (symmetric, a scale per token and head)"
        keys = "pre-RoPE keys" if self.pre_rope else "post-RoPE keys"
        return f"KV {self.name} g{self.group_size} residual {self.residual}, {keys}"


def bits_of_name(name: str) -> int:
    """8 for "int8" and so on; a clear error for anything else."""
    try:
        return KV_CACHE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; choose one of {', '.join(KV_CACHE_NAMES)}") from None


def spec_of_name(name: str, **settings: Any) -> KVCacheSpec:
    """The cache `--kv-cache NAME` asks for ("int4", "int8-token", "fp8", ...), with the integer layout's settings."""
    if name in ROW_KINDS:
        return KVCacheSpec(kind=name, **settings)
    return KVCacheSpec(bits=bits_of_name(name), **settings)
