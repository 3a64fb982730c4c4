"""What a quantized KV cache does, as plain data: stored in recipes and exports, parsed from flags."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lowbit.kv.packing import PACKABLE_BITS

KV_CACHE_NAMES = {f"int{bits}": bits for bits in sorted(PACKABLE_BITS, reverse=True)}
"""`--kv-cache int4` and the like: the name of each width."""


class KVCacheSpec(BaseModel):
    """A KIVI-style integer KV cache.

    `bits`: code width (8, 4 or 2). `group_size`: tokens per key group (keys are quantized per
    channel, in chunks of this many tokens) and channels per value group (values are quantized per
    token; a group never spans two heads, so it is capped at the head dimension). `residual`: the
    most recent tokens kept exact. `pre_rope`: quantize keys before the rotary embedding (KVQuant)
    and rotate them again when read.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = 4
    group_size: int = Field(default=64, ge=1)
    residual: int = Field(default=128, ge=0)
    pre_rope: bool = False

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
        return f"int{self.bits}"

    def describe(self) -> str:
        keys = "pre-RoPE keys" if self.pre_rope else "post-RoPE keys"
        return f"KV {self.name} g{self.group_size} residual {self.residual}, {keys}"


def bits_of_name(name: str) -> int:
    """8 for "int8" and so on; a clear error for anything else."""
    try:
        return KV_CACHE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; choose one of {', '.join(KV_CACHE_NAMES)}") from None
