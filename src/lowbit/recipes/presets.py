"""Named schemes users know (`--scheme w4a16`), each a starting recipe that flags may override."""

from __future__ import annotations

from lowbit.recipes.recipe import Recipe, RecipeError

PRESETS: dict[str, Recipe] = {
    "w4a16": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto"),
    "w3a16": Recipe(method="gptq", bits=3, symmetric=False, group_size="auto"),
    "w2a16": Recipe(method="gptq", bits=2, symmetric=False, group_size=32),
    "w8a16": Recipe(method="gptq", bits=8, symmetric=True, group_size=-1),
}


def preset(name: str) -> Recipe:
    try:
        return PRESETS[name].model_copy(deep=True)
    except KeyError:
        raise RecipeError(f"unknown scheme {name!r}; available: {', '.join(PRESETS)}") from None
