"""Architecture adapters: where a model keeps its blocks and which linears read the same input.

The pipeline needs two facts per family: the list of transformer blocks, and, inside a block, the
linears in execution order grouped by shared input (q/k/v read one normed input, gate/up another).
Shared-input groups let one Hessian serve several layers; the order lets each group see inputs
produced by the already quantized groups before it (GPTQ's "true sequential").

Transforms that rescale input channels (AWQ) need a third: the module that produces each group's
input and can absorb the inverse scale, `input_sources` (parallel to `linear_groups`). A norm
absorbs it in its weight (y = w · x / rms(x) scales linearly with w); a linear in its output rows;
v_proj feeds o_proj through attention, which mixes tokens but not channels, so it qualifies too
when each o_proj input channel has its own v_proj row (no grouped-query sharing).

Rotations of the residual stream (QuaRot, SpinQuant) need a fourth: `rotation`, which linears read
the residual stream through which norm, which write to it, and where the value heads and the MLP's
down projection are (transforms.rotate).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter yet."""


@dataclass(frozen=True)
class RotationLayout:
    """Where the residual stream is read and written, by names relative to a block. The final norm
    is the architecture's `final_norm`; the embeddings and the output head are found through
    transformers' get_input_embeddings / get_output_embeddings."""

    norm_readers: tuple[tuple[str, tuple[str, ...]], ...]
    """Each RMSNorm of a block and the linears that read its output."""
    residual_writers: tuple[str, ...]
    value: str
    attention_output: str
    mlp_output: str


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    blocks: str
    linear_groups: tuple[tuple[str, ...], ...]
    input_sources: tuple[str | None, ...]
    """Per linear group, the module whose output is the group's input and can absorb a channel scale."""
    rotation: RotationLayout | None = None
    head: str = "lm_head"
    """The output head: the one linear outside the blocks a recipe may quantize."""
    final_norm: str = "model.norm"
    """The norm whose output the head reads (the head's calibration input; rotations fold it into the head)."""

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)


_LLAMA_LIKE_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_LIKE_INPUT_SOURCES = ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj")
_LLAMA_LIKE_ROTATION = RotationLayout(
    norm_readers=(("input_layernorm", _LLAMA_LIKE_GROUPS[0]), ("post_attention_layernorm", _LLAMA_LIKE_GROUPS[2])),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    value="self_attn.v_proj",
    attention_output="self_attn.o_proj",
    mlp_output="mlp.down_proj",
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_LIKE_GROUPS,
                 _LLAMA_LIKE_INPUT_SOURCES, _LLAMA_LIKE_ROTATION),
)


def untie_head(model: nn.Module) -> None:
    """Give the output head a weight of its own where it shares the input embedding's, and say so in
    the config (so exports save both): rotations rewrite the head apart from the embedding, and a
    quantized head must leave the embedding exact."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(embeddings.weight.detach().clone())
        model.config.tie_word_embeddings = False


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_of(model: nn.Module) -> Architecture:
    """The adapter for `model`, or a clear error listing what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
    )
