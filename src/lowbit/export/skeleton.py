"""What transformers will expect from a checkpoint of a given config, read off a weightless model.

Loading a checkpoint that lacks a tensor does not fail in transformers: the tensor is randomly
initialized with a warning. The writer therefore compares what it wrote with the model that the
config describes before it declares an export finished, and takes the linears it must list as
unquantized (`ignore`) from the same model. Building it on the meta device costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from lowbit.export.errors import ExportError


@dataclass(frozen=True)
class ModelSkeleton:
    """`linears`: [out, in] of every nn.Linear by module name; `tensor_names`: the checkpoint keys
    transformers loads (a tied weight, such as lm_head under tie_word_embeddings, counted once)."""

    linears: dict[str, tuple[int, int]]
    tensor_names: frozenset[str]

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelSkeleton:
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception as error:  # any failure means the export could not be loaded either
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"transformers cannot build a causal LM from this config: {detail}") from error
        linears = {
            name: (module.out_features, module.in_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        owned = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        return cls(linears, frozenset(name for name in model.state_dict() if name in owned))
