"""Format families by name (`--format NAME`, a recipe's `format:`): each builds a WeightFormat from
a recipe's generic fields (bits, symmetric, group size, scale dtype) and says which it accepts.

Adding a format to the command line is one entry here. Families with a fixed code width or block
(fp8, mxfp4, nvfp4, nf4) reject other values instead of silently ignoring them, so a recipe never
claims settings that its weights do not have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lowbit.formats.base import FormatError, WeightFormat
from lowbit.formats.binary import BinaryFormat
from lowbit.formats.floating import MXFormat, NVFP4Format, float_format
from lowbit.formats.integer import PER_CHANNEL, IntegerFormat, scale_dtype_from_name
from lowbit.formats.lookup import LookupFormat, nf4_format
from lowbit.formats.minifloat import E2M1
from lowbit.formats.vector import MAX_BITS, MIN_BITS, vector_format

Builder = Callable[..., WeightFormat]
"""(bits, symmetric, group_size, scale_dtype name, **options) -> format; group_size is already
resolved per layer; options are the recipe's `format_options`, which only families naming them take."""


@dataclass(frozen=True)
class FormatFamily:
    """`bits`: accepted code widths; `default_bits`: the width naming the family gives (else the
    first); `block`: a fixed group size, else None; `group_size`: the default when the user names
    the family without a group size; `options`: the `format_options` keys it takes; `methods`:
    the only solvers that can fill it (None: any solver)."""

    name: str
    build: Builder
    bits: tuple[int, ...]
    group_size: int | str
    symmetric_only: bool = True
    block: int | None = None
    help: str = ""
    default_bits: int | None = None
    options: tuple[str, ...] = ()
    methods: tuple[str, ...] | None = None

    @property
    def initial_bits(self) -> int:
        return self.default_bits or self.bits[0]

    def check_options(self, options: dict[str, object]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = f"it takes {', '.join(self.options)}" if self.options else "it takes none"
            raise FormatError(f"format {self.name} has no option {unknown[0]!r}; {takes}")

    def check_method(self, method: str, accepted_families: tuple[str, ...] | None) -> None:
        """FormatError when the method cannot fill this family (either side may restrict the pairing)."""
        if self.methods is not None and method not in self.methods:
            raise FormatError(f"format {self.name} is filled by method {' or '.join(self.methods)}, not {method}")
        if accepted_families is not None and self.name not in accepted_families:
            raise FormatError(f"method {method} needs format {' or '.join(accepted_families)}, not {self.name}")

    def check(self, bits: int, symmetric: bool, group_size: int | str) -> None:
        """FormatError naming the setting to change when the family cannot hold these fields."""
        if bits not in self.bits:
            allowed = f"{self.bits[0]}" if len(self.bits) == 1 else f"{self.bits[0]}..{self.bits[-1]}"
            raise FormatError(f"format {self.name} has {allowed}-bit codes, not {bits}; set bits to {allowed}")
        if self.symmetric_only and not symmetric:
            raise FormatError(f"format {self.name} is symmetric (no zero point); set symmetric: true (drop --asym)")
        if self.block is not None and group_size not in ("auto", self.block):
            raise FormatError(
                f"format {self.name} uses fixed blocks of {self.block}; set group size to {self.block} or auto"
            )


def _int(bits: int, symmetric: bool, group_size: int, scale_dtype: str) -> WeightFormat:
    return IntegerFormat(bits, symmetric, group_size, scale_dtype_from_name(scale_dtype))


def _binary(bits: int, symmetric: bool, group_size: int, scale_dtype: str) -> WeightFormat:
    return BinaryFormat(split=bits == 2, group_size=group_size, scale_dtype=scale_dtype_from_name(scale_dtype))


def _lut(bits: int, symmetric: bool, group_size: int, scale_dtype: str) -> WeightFormat:
    return LookupFormat(bits, group_size, learned=True, scale_dtype=scale_dtype_from_name(scale_dtype))


def _vq(bits: int, symmetric: bool, group_size: int, scale_dtype: str, **options) -> WeightFormat:
    return vector_format(bits, group_size, scale_dtype_from_name(scale_dtype), **options)


FAMILIES: dict[str, FormatFamily] = {
    family.name: family
    for family in (
        FormatFamily("int", _int, tuple(range(2, 9)), "auto", symmetric_only=False,
                     help="uniform integers, scale (and zero point if asymmetric) per group"),
        FormatFamily("fp8_e4m3", lambda b, s, g, d: float_format("e4m3", g, d), (8,), PER_CHANNEL,
                     help="FP8 E4M3 (max 448), scale per channel/tensor/group"),
        FormatFamily("fp8_e5m2", lambda b, s, g, d: float_format("e5m2", g, d), (8,), PER_CHANNEL,
                     help="FP8 E5M2 (max 57344), scale per channel/tensor/group"),
        FormatFamily("mxfp4", lambda b, s, g, d: MXFormat(E2M1, 32), (4,), 32, block=32,
                     help="OCP MXFP4: E2M1 in blocks of 32 with a power-of-two (E8M0) scale"),
        FormatFamily("nvfp4", lambda b, s, g, d: NVFP4Format(16), (4,), 16, block=16,
                     help="NVFP4: E2M1 in blocks of 16, FP8 E4M3 block scale x FP32 tensor scale"),
        FormatFamily("nf4", lambda b, s, g, d: nf4_format(g, d), (4,), 64,
                     help="QLoRA NF4 table, absmax scale per group (64)"),
        FormatFamily("lut", _lut, tuple(range(2, 9)), PER_CHANNEL,
                     help="learned table per output row (k-means; method squeezellm weights it by the Hessian)"),
        FormatFamily("binary", _binary, (1, 2), 128,
                     help="signs x mean |w| per row and group (bits 1); bits 2: BiLLM's split into two "
                     "magnitudes; method binary adds Hessian-chosen salient columns (residual binarization)"),
        FormatFamily("vq", _vq, tuple(range(MIN_BITS, MAX_BITS + 1)), PER_CHANNEL, default_bits=8,
                     options=("dim", "residual_bits", "row_scale"), methods=("vq",),
                     help="vector quantization: bits = log2 codebook size, --vq-dim weights per index, "
                     "--residual-bits a second codebook, --row-scale; group size = columns per codebook "
                     "(-1: one per layer); method vq"),
    )
}


def format_family(name: str) -> FormatFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; available: {', '.join(FAMILIES)}") from None
