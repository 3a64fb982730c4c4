"""The executor: walks a model block by block and applies a recipe."""
