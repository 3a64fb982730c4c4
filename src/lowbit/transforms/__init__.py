"""Function-preserving rewrites of a block applied before it is quantized. Importing this package registers them all."""

from lowbit.transforms import awq, smooth  # noqa: F401  (registration side effect)
from lowbit.transforms.base import TRANSFORMS, BlockTransform, SharedInput, register_transform

__all__ = ["TRANSFORMS", "BlockTransform", "SharedInput", "register_transform"]
