"""Function-preserving rewrites applied before a model is quantized. Importing this package registers them all.

Block transforms (base.py: AWQ, SmoothQuant) rewrite one block at a time inside the pipeline; model
transforms (model.py: rotations) rewrite the whole model once before the pipeline starts.
"""

from lowbit.transforms import awq, quarot, smooth, spinquant  # noqa: F401  (registration side effect)
from lowbit.transforms.base import TRANSFORMS, BlockTransform, SharedInput, register_transform
from lowbit.transforms.model import MODEL_TRANSFORMS, ModelTransform, register_model_transform

__all__ = [
    "MODEL_TRANSFORMS", "TRANSFORMS", "BlockTransform", "ModelTransform", "SharedInput",
    "register_model_transform", "register_transform",
]
