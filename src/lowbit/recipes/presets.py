"""Named schemes users know (`--scheme w4a16`), each a starting recipe that flags may override."""

from __future__ import annotations

from lowbit.recipes.recipe import Recipe, RecipeError

PRESETS: dict[str, Recipe] = {
    "w4a16": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto"),
    "w3a16": Recipe(method="gptq", bits=3, symmetric=False, group_size="auto"),
    "w2a16": Recipe(method="gptq", bits=2, symmetric=False, group_size=32),
    "w8a16": Recipe(method="gptq", bits=8, symmetric=True, group_size=-1),
    "fp8": Recipe(method="rtn", format="fp8_e4m3", bits=8, group_size=-1, scale_dtype="float32"),
    "nvfp4": Recipe(method="gptq", format="nvfp4", bits=4, group_size=16),
    "mxfp4": Recipe(method="gptq", format="mxfp4", bits=4, group_size=32),
    "nf4": Recipe(method="gptq", format="nf4", bits=4, group_size=64),
}


def preset(name: str) -> Recipe:
    try:
        return PRESETS[name].model_copy(deep=True)
    except KeyError:
        raise RecipeError(f"unknown scheme {name!r}; available: {', '.join(PRESETS)}") from None
