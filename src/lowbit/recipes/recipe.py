"""Recipes: what to do to which layer, as plain data that can be saved and replayed."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from torch import nn

from lowbit.formats.activation import ActivationFormat
from lowbit.formats.base import FormatError, WeightFormat
from lowbit.formats.families import FAMILIES, format_family
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR
from lowbit.kv.spec import KVCacheSpec
from lowbit.solvers import SOLVERS
from lowbit.solvers.base import Solver
from lowbit.solvers.lowrank import LowRankCompensation
from lowbit.solvers.outliers import MAX_OUTLIER_FRACTION, DenseAndSparse, OutlierCriterion
from lowbit.transforms import MODEL_TRANSFORMS, TRANSFORMS, BlockTransform, ModelTransform

EXTRA_DEFAULTS: dict[str, Any] = {"outliers": 0.0, "outlier_criterion": "hessian", "eora_rank": 0}
"""Fields left out of a dump at their defaults: recipes without them save and hash as before they existed."""

AUTO_GROUP_SIZES = (128, 64, 32)
"""`group_size: auto` picks the first of these that divides a layer's input width."""


class RecipeError(ValueError):
    """A recipe that cannot be applied; the message names the field to change."""


class LayerOverride(BaseModel):
    """Settings that replace the recipe's own for the layers whose names match `pattern`.

    `pattern` matches like `ignore` (a glob on the full name, or a name suffix such as
    "mlp.down_proj"); unset fields keep the recipe's values. Mixed-precision plans (`lowbit plan`)
    are recipes with one override per layer, so they replay exactly.
    """

    model_config = ConfigDict(extra="forbid")

    pattern: str
    method: str | None = None
    bits: int | None = None
    symmetric: bool | None = None
    group_size: int | Literal["auto"] | None = None
    method_options: dict[str, Any] | None = None
    outliers: float | None = None
    eora_rank: int | None = None
    format_options: dict[str, Any] | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str | None) -> str | None:
        if method is not None and method not in SOLVERS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(SOLVERS))}")
        return method

    def matches(self, name: str) -> bool:
        return _matches(name, self.pattern)

    def settings(self) -> dict[str, Any]:
        """The fields this override sets."""
        return self.model_dump(exclude={"pattern"}, exclude_none=True)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern)


class Recipe(BaseModel):
    """One quantization recipe: a weight format, a solver and the layers it applies to.

    `group_size` is a number of input columns per scale, -1 for one scale per output channel,
    0 for one per tensor, or "auto" for the largest of 128/64/32 that divides each layer (so
    that a model whose width 128 does not divide still gets the finest grouping that exports).
    `format` names a format family (formats.families: int, fp8_e4m3, nvfp4, nf4, ...) that builds
    each layer's format from these fields; families with a fixed width or block check them.
    `transforms` are applied to each block before its linears are solved (`[awq]` with
    `method: gptq` is AWQ scaling followed by GPTQ), after any the method itself implies; model
    transforms among them (rotations: `[hadamard]`, `[quarot]`, `[spinquant]`) rewrite the whole
    model once before the first block. `transform_options` gives a transform its settings by name
    (`{spinquant: {steps: 32}}`).
    `overrides` change these settings for some layers; the first override that matches a layer
    applies, and `ignore` wins over all of them. The pipeline quantizes the decoder blocks' linears
    and, where `ignore` leaves it out (the default keeps it), the output head lm_head, calibrated on
    the final norm's output and untied from the input embedding first; a recipe that leaves any
    other linear outside the blocks to quantize is refused before work starts (api.check_plan).
    `format_options` are settings only some families
    take (vq: dim, residual_bits, row_scale); for `vq`, `bits` is log2 of the codebook size and
    `group_size` the columns sharing a codebook.
    `scale_dtype` is the dtype scales are stored in; "auto" is the model's own where that is
    float16 or bfloat16, else float16 (`for_model_dtype`): transformers and vLLM load a
    compressed-tensors checkpoint's scales into parameters of the model's dtype, so scales of
    another 16-bit dtype would be rounded on loading and the served model would not be the one
    lowbit measured.
    `outliers` (a fraction, e.g. 0.005) keeps that share of each matrix's weights in fp16 as a sparse
    matrix, ranked by `outlier_criterion`, and quantizes the rest with `method` (solvers.outliers);
    `eora_rank` > 0 adds a rank-r EoRA correction of the remaining error (solvers.lowrank). Both
    wrap any method, and their layers export in lowbit's own layout.
    `activations` (None: weight-only) is the format the input of every quantized layer is rounded
    to at run time (W8A8, FP8 dynamic/static). `kv_cache` (optional) is the quantized KV cache the
    model is meant to run with (lowbit.kv); it is stored in the export and used by `lowbit eval`.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "gptq"
    format: str = "int"
    bits: int = 4
    symmetric: bool = True
    group_size: int | Literal["auto"] = "auto"
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    method_options: dict[str, Any] = Field(default_factory=dict)
    format_options: dict[str, Any] = Field(default_factory=dict)
    transforms: list[str] = Field(default_factory=list)
    transform_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    overrides: list[LayerOverride] = Field(default_factory=list)
    outliers: float = Field(default=0.0, ge=0.0, le=MAX_OUTLIER_FRACTION)
    outlier_criterion: OutlierCriterion = "hessian"
    eora_rank: int = Field(default=0, ge=0)
    activations: ActivationFormat | None = None
    kv_cache: KVCacheSpec | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in SOLVERS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(SOLVERS))}")
        return method

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        if name not in FAMILIES:
            raise ValueError(f"unknown format {name!r}; available: {', '.join(FAMILIES)}")
        return name

    @model_validator(mode="after")
    def _fields_fit_format(self) -> "Recipe":
        family = format_family(self.format)
        try:
            family.check(self.bits, self.symmetric, self.group_size)
            family.check_options(self.format_options)
            family.check_method(self.method, SOLVERS[self.method].format_families)
            if self.format_options:  # build once so that a bad option value is refused now
                group_size = self.group_size if isinstance(self.group_size, int) else PER_CHANNEL
                family.build(self.bits, self.symmetric, group_size, self.stored_scale_dtype(), **self.format_options)
        except FormatError as err:
            raise ValueError(str(err)) from None
        except TypeError as err:
            raise ValueError(f"bad format option for {self.format}: {err}") from None
        return self

    @field_validator("transforms")
    @classmethod
    def _known_transforms(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in TRANSFORMS and name not in MODEL_TRANSFORMS]
        if unknown:
            available = ", ".join(sorted([*TRANSFORMS, *MODEL_TRANSFORMS]))
            raise ValueError(f"unknown transform {unknown[0]!r}; available: {available}")
        rotations = [name for name in names if name in MODEL_TRANSFORMS]
        if len(rotations) > 1:
            raise ValueError(f"choose one model transform, not {' and '.join(rotations)}: each rotates the original model")
        return names

    @model_validator(mode="after")
    def _options_name_transforms(self) -> "Recipe":
        stray = sorted(set(self.transform_options) - set(self.transform_names()))
        if stray:
            raise ValueError(f"transform_options names {stray[0]!r}, which is not among the recipe's transforms")
        for name in self.transform_names():
            try:
                self._transform(name)
            except (TypeError, ValueError) as err:
                raise ValueError(f"bad option for transform {name!r}: {err}") from None
        return self

    def transform_names(self) -> list[str]:
        """The method's own transforms, then the recipe's, each once."""
        return list(dict.fromkeys([*SOLVERS[self.method].implied_transforms, *self.transforms]))

    def _transform(self, name: str) -> BlockTransform | ModelTransform:
        kind = TRANSFORMS.get(name) or MODEL_TRANSFORMS[name]
        return kind(**self.transform_options.get(name, {}))

    def block_transforms(self) -> list[BlockTransform]:
        """The transforms the pipeline runs on each block, in order."""
        return [self._transform(name) for name in self.transform_names() if name in TRANSFORMS]

    def model_transforms(self) -> list[ModelTransform]:
        """The transforms that rewrite the whole model before the pipeline starts."""
        return [self._transform(name) for name in self.transform_names() if name in MODEL_TRANSFORMS]

    def layer_formats(self) -> Callable[[str, nn.Linear], WeightFormat | None]:
        """The format each linear will be quantized to (None where ignored), for model transforms."""
        return lambda name, linear: None if self.is_ignored(name) else self.for_layer(name).format_for(
            linear.in_features)

    @model_serializer(mode="wrap")
    def _without_unused_fields(self, handler) -> dict[str, Any]:
        """A recipe without overrides, format options, transform options, activations or KV cache
        dumps as before those fields existed (same cache keys, same saved files)."""
        data = handler(self)
        if not self.overrides:
            data.pop("overrides", None)
        for key, default in EXTRA_DEFAULTS.items():
            if data.get(key) == default:
                data.pop(key, None)
        if not self.format_options:
            data.pop("format_options", None)
        if self.activations is None:
            data.pop("activations", None)
        if not self.transform_options:
            data.pop("transform_options", None)
        if self.kv_cache is None:
            data.pop("kv_cache", None)
        return data

    def solver(self) -> Solver:
        """The method's solver, inside dense-and-sparse (`outliers`) and EoRA (`eora_rank`) when set."""
        try:
            solver = SOLVERS[self.method](**self.method_options)
        except TypeError as err:
            raise RecipeError(f"bad option for method {self.method!r}: {err}") from None
        if self.outliers:
            solver = DenseAndSparse(solver, self.outliers, self.outlier_criterion)
        if self.eora_rank:
            solver = LowRankCompensation(solver, self.eora_rank)
        return solver

    def group_size_for(self, in_features: int) -> int:
        if self.group_size != "auto":
            return self.group_size
        for size in AUTO_GROUP_SIZES:
            if in_features % size == 0:
                return size
        return PER_CHANNEL

    def format_for(self, in_features: int) -> WeightFormat:
        family = format_family(self.format)
        group_size = family.block or self.group_size_for(in_features)
        return family.build(self.bits, self.symmetric, group_size, self.stored_scale_dtype(), **self.format_options)

    def for_model_dtype(self, dtype: torch.dtype) -> Recipe:
        """This recipe with `scale_dtype: auto` made concrete for a model loaded in `dtype`."""
        if self.scale_dtype != "auto":
            return self
        name = str(dtype).removeprefix("torch.") if dtype in (torch.float16, torch.bfloat16) else "float16"
        return self.model_copy(update={"scale_dtype": name})

    def stored_scale_dtype(self) -> str:
        """The name of the scale dtype formats are built with: "auto" not yet made concrete for a
        model (a recipe read for planning or printing) counts as float16, which has the same width."""
        return "float16" if self.scale_dtype == "auto" else self.scale_dtype

    def is_ignored(self, name: str) -> bool:
        return any(_matches(name, pattern) for pattern in self.ignore)

    def for_layer(self, name: str) -> Recipe:
        """The recipe that applies to layer `name`: this one, with its first matching override applied."""
        for override in self.overrides:
            if override.matches(name):
                return self.model_copy(update={**override.settings(), "overrides": []})
        return self

    def layer_recipes(self) -> list[Recipe]:
        """This recipe without overrides, then each override applied: every setting some layer may get."""
        base = self.model_copy(update={"overrides": []})
        return [base] + [base.model_copy(update=o.settings()) for o in self.overrides]

    def needs_calibration(self) -> bool:
        """True when a block transform, a model transform that trains, static activation scales, or
        the solver of the recipe or of any override reads calibration data."""
        if self.block_transforms() or any(t.needs_calibration for t in self.model_transforms()):
            return True
        if self.activations is not None and not self.activations.dynamic:
            return True
        return any(recipe.solver().needs_hessian for recipe in self.layer_recipes())

    def plan(self) -> Callable[[str, nn.Linear], tuple[WeightFormat, Solver] | None]:
        """The per-layer plan the pipeline executes.

        Layers with equal solver settings share one solver instance, which is what lets the
        pipeline stack the matrices of one input (q/k/v) into a single solve.
        """
        solvers: dict[str, Solver] = {}

        def choose(name: str, linear: nn.Linear) -> tuple[WeightFormat, Solver] | None:
            if self.is_ignored(name):
                return None
            recipe = self.for_layer(name)
            key = f"{recipe.method}{sorted(recipe.method_options.items())}{recipe.outliers}{recipe.eora_rank}"
            if key not in solvers:
                solvers[key] = recipe.solver()
            return recipe.format_for(linear.in_features), solvers[key]

        return choose

    def describe(self) -> str:
        if self.group_size == "auto":
            layout = "g" + "/".join(map(str, AUTO_GROUP_SIZES))
        elif self.group_size == PER_CHANNEL:
            layout = "per-channel"
        elif self.group_size == PER_TENSOR:
            layout = "per-tensor"
        else:
            layout = f"g{self.group_size}"
        options = "".join(f", {k}={v}" for k, v in sorted(self.method_options.items()))
        extra = [name for name in self.transform_names() if name != self.method]
        method = "+".join([*extra, self.method])
        if self.format == "int":
            number = f"int{self.bits} {'sym' if self.symmetric else 'asym'}"
        elif self.format == "binary":
            number = "binary" if self.bits == 1 else "binary split"
        else:
            number = f"{self.format}{self.bits if self.format in ('lut', 'vq') else ''}"
        number += "".join(f", {k}={v}" for k, v in sorted(self.format_options.items()))
        parts = [method, number] + ([] if format_family(self.format).block else [layout])
        mixed = f" + {len(self.overrides)} layer override(s)" if self.overrides else ""
        extras = f" + {self.outliers:.2%} {self.outlier_criterion} outliers" if self.outliers else ""
        extras += f" + eora r{self.eora_rank}" if self.eora_rank else ""
        inputs = f" + {self.activations.describe()}" if self.activations is not None else ""
        kv = f"; {self.kv_cache.describe()}" if self.kv_cache is not None else ""
        return " ".join(parts) + options + extras + mixed + inputs + kv

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "Recipe":
        try:
            data = yaml.safe_load(Path(path).read_text())
            return cls.model_validate(data or {})
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {path}") from None
        except (yaml.YAMLError, ValidationError) as err:
            first = str(err).strip().splitlines()
            raise RecipeError(f"invalid recipe {path}: {' '.join(first[:3])}") from None
