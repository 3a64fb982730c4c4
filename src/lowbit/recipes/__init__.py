"""Recipes (what to do to each layer) and the named presets built from them."""

from lowbit.recipes.presets import PRESETS, preset
from lowbit.recipes.recipe import Recipe, RecipeError

__all__ = ["PRESETS", "Recipe", "RecipeError", "preset"]
