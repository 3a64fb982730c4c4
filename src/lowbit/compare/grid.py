"""The grid of `lowbit compare`: every combination of the chosen recipe values, plus peer tools.

Axes are recipe fields, so a method, format or option that a later module adds to `Recipe` or to
the solver registry becomes a grid axis without any change here. Every cell's recipe is validated
before any work starts, so a typo in the last value of an axis fails in a second, not after an
hour of quantizing the cells before it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR
from lowbit.recipes import Recipe


FORMAT_CHECK_WIDTH = 4096
"""Layer width at which each cell's format is built once up front, to reject bad settings early."""


class GridError(ValueError):
    """A grid that cannot be built; the message names the axis or value to change."""


@dataclass(frozen=True)
class Scheme:
    """The storage scheme a peer tool is asked to reproduce: integer bits, grouping, zero points."""

    bits: int
    group_size: int
    symmetric: bool

    def describe(self) -> str:
        return f"w{self.bits} {'sym' if self.symmetric else 'asym'} {layout_name(self.group_size)}"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a lowbit recipe, or a peer tool on the scheme of some recipe."""

    tool: str
    """"lowbit" or a peer's name."""
    recipe: Recipe | None = None
    scheme: Scheme | None = None

    @property
    def label(self) -> str:
        if self.recipe is not None:
            return short_label(self.recipe)
        return f"{self.tool} {self.scheme.describe()}"

    @property
    def method(self) -> str:
        return self.recipe.method if self.recipe is not None else self.tool


def layout_name(group_size: int | str) -> str:
    if group_size == "auto":
        return "gauto"
    if group_size == PER_CHANNEL:
        return "per-channel"
    if group_size == PER_TENSOR:
        return "per-tensor"
    return f"g{group_size}"


def short_label(recipe: Recipe) -> str:
    """`gptq w4 asym g64`, plus any option that differs from the solver's defaults."""
    options = "".join(f" {k}={v}" for k, v in sorted(recipe.method_options.items()))
    extra = "" if recipe.scale_dtype == "auto" else f" scale={recipe.scale_dtype}"
    return f"{recipe.method} w{recipe.bits} {'sym' if recipe.symmetric else 'asym'} " \
           f"{layout_name(recipe.group_size)}{extra}{options}"


def split_values(text: str) -> list[str]:
    """Split `a,b,{c: 1, d: 2}` on the commas that are not inside brackets or braces."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        values.append(current.strip())
    return values


def parse_axis(spec: str) -> tuple[str, list[Any]]:
    """`FIELD=V1,V2` -> (field, [values]); values are YAML scalars or flow mappings (`{damp: 0.1}`)."""
    field, sep, raw = spec.partition("=")
    field = field.strip()
    if not sep or not raw.strip():
        raise GridError(f"axis {spec!r} must look like FIELD=VALUE1,VALUE2 (e.g. symmetric=true,false)")
    if field not in Recipe.model_fields:
        raise GridError(f"unknown recipe field {field!r} in axis {spec!r}; fields: {', '.join(Recipe.model_fields)}")
    try:
        values = [yaml.safe_load(value) for value in split_values(raw)]
    except yaml.YAMLError as err:
        raise GridError(f"cannot parse the values of axis {spec!r}: {str(err).splitlines()[0]}") from None
    return field, values


def build_recipes(axes: dict[str, list[Any]], base: Recipe | None = None) -> list[Recipe]:
    """Every combination of `axes` applied to `base` (default Recipe()), in axis order, validated."""
    base_fields = (base or Recipe()).model_dump()
    for field, values in axes.items():
        if not values:
            raise GridError(f"axis {field!r} has no values")
    recipes: list[Recipe] = []
    seen: set[str] = set()
    for combination in itertools.product(*axes.values()):
        fields = {**base_fields, **dict(zip(axes, combination))}
        try:
            recipe = Recipe.model_validate(fields)
            recipe.solver()
            recipe.format_for(FORMAT_CHECK_WIDTH)
        except (ValidationError, ValueError) as err:
            where = ", ".join(f"{k}={v!r}" for k, v in zip(axes, combination))
            if isinstance(err, ValidationError):
                reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            else:
                reason = str(err).strip().splitlines()[0]
            raise GridError(f"grid cell {where} is not a valid recipe: {reason}") from None
        key = recipe.model_dump_json()
        if key not in seen:
            seen.add(key)
            recipes.append(recipe)
    return recipes


def peer_cells(recipes: list[Recipe], peers: list[str]) -> list[Cell]:
    """One cell per peer and distinct integer scheme among `recipes` (method and options aside)."""
    schemes: list[Scheme] = []
    for recipe in recipes:
        if recipe.group_size == "auto":
            continue  # a per-layer choice peers have no equivalent for; the CLI says so
        scheme = Scheme(recipe.bits, recipe.group_size, recipe.symmetric)
        if scheme not in schemes:
            schemes.append(scheme)
    return [Cell(tool=peer, scheme=scheme) for scheme in schemes for peer in peers]


def build_cells(axes: dict[str, list[Any]], peers: list[str] | None = None, base: Recipe | None = None) -> list[Cell]:
    recipes = build_recipes(axes, base)
    return [Cell(tool="lowbit", recipe=recipe) for recipe in recipes] + peer_cells(recipes, peers or [])
