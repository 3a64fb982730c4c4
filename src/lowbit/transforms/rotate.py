"""Rotations of the residual stream folded into the weights (QuaRot, and the folding step of SpinQuant).

For any orthogonal Q, a Llama-style model computes the same function when its residual stream h is
replaced by h·Q, provided every norm is scale-free (RMS(h·Q) = RMS(h) for orthogonal Q, but a
per-channel norm weight does not commute with Q). So:
  1. `prepare`: multiply each RMSNorm's weight into the columns of the linears that read it (q/k/v,
     gate/up, and the final norm into lm_head) and set the norm weights to 1. The embeddings and
     lm_head are untied first when they share a tensor, since lm_head now differs (it absorbed the
     final norm) and is rotated on the other side; the export then stores both (the config says
     tie_word_embeddings: false).
  2. `rotated_weights`: embeddings E·Q (rows), residual readers W·Q (input columns), residual writers
     Qᵀ·W (o_proj and down_proj output rows, and their biases b·Q). Optionally a per-head rotation R
     of head_dim: every value head's output v·R (v_proj rows Rᵀ·W_h) undone in o_proj's input columns
     of every attention head (W_h·R); attention mixes tokens, not channels, so v·R passes through it
     unchanged, and grouped-query heads share R. Optionally an online Hadamard H before down_proj
     (transforms.online): down_proj's weight becomes W·H.
Rotating spreads outlier channels over all channels, so the weights (and activations) quantize with
less error; the full-precision function is unchanged up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.models.architectures import Architecture, RotationLayout, untie_head
from lowbit.transforms import online
from lowbit.transforms.hadamard import orthogonal_rotation


class RotationError(ValueError):
    """A model this rotation cannot be applied to; the message says why."""


@dataclass(frozen=True)
class RotationRoles:
    """Full parameter names of the model grouped by how a rotation changes them."""

    embeddings: tuple[str, ...]
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    writer_biases: tuple[str, ...]
    values: tuple[str, ...]
    value_biases: tuple[str, ...]
    attention_outputs: tuple[str, ...]
    mlp_outputs: tuple[str, ...]
    key_value_heads: int
    head_dim: int

    def names(self) -> tuple[str, ...]:
        """Every parameter a rotation may change, each once."""
        return tuple(dict.fromkeys([
            *self.embeddings, *self.readers, *self.writers, *self.writer_biases,
            *self.values, *self.value_biases, *self.attention_outputs, *self.mlp_outputs,
        ]))


def layout_of(architecture: Architecture) -> RotationLayout:
    if architecture.rotation is None:
        raise RotationError(f"rotations are not supported for the {architecture.family} family yet")
    return architecture.rotation


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The name of `module` inside `model`."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def roles_of(model: nn.Module, architecture: Architecture) -> RotationRoles:
    layout = layout_of(architecture)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    blocks = [f"{architecture.blocks}.{index}." for index in range(len(architecture.block_list(model)))]

    def params(suffixes: list[str], kind: str) -> tuple[str, ...]:
        names = [f"{prefix}{suffix}.{kind}" for prefix in blocks for suffix in suffixes]
        return tuple(name for name in names if _has_parameter(model, name))

    readers = [name for _, linears in layout.norm_readers for name in linears]
    head = module_name(model, model.get_output_embeddings())
    return RotationRoles(
        embeddings=(f"{module_name(model, model.get_input_embeddings())}.weight",),
        readers=(*params(readers, "weight"), f"{head}.weight"),
        writers=params(list(layout.residual_writers), "weight"),
        writer_biases=params(list(layout.residual_writers), "bias"),
        values=params([layout.value], "weight"),
        value_biases=params([layout.value], "bias"),
        attention_outputs=params([layout.attention_output], "weight"),
        mlp_outputs=params([layout.mlp_output], "weight"),
        key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def _has_parameter(model: nn.Module, name: str) -> bool:
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute, None) is not None


@torch.no_grad()
def prepare(model: nn.Module, architecture: Architecture) -> None:
    """Untie the output head from the embeddings and fold every RMSNorm's weight into its readers.

    Function-preserving; afterwards every norm is scale-free (weight 1), so any orthogonal rotation
    of the residual stream can be folded into the linears around it."""
    layout = layout_of(architecture)
    if any(online.has_online_hadamard(m) for m in model.modules()):
        raise RotationError("the model is already rotated (it has online Hadamards); rotate the original once")
    untie_head(model)
    head = model.get_output_embeddings()
    pairs = [(f"{architecture.blocks}.{index}.{norm}", [f"{architecture.blocks}.{index}.{name}" for name in readers])
             for index in range(len(architecture.block_list(model)))
             for norm, readers in layout.norm_readers]
    pairs.append((architecture.final_norm, [module_name(model, head)]))
    for norm_name, reader_names in pairs:
        norm = model.get_submodule(norm_name)
        if getattr(norm, "bias", None) is not None:
            raise RotationError(f"{norm_name} has a bias (LayerNorm); rotations need RMSNorm")
        scale = norm.weight.detach().double()
        for name in reader_names:
            linear = model.get_submodule(name)
            linear.weight.copy_((linear.weight.double() * scale[None, :]).to(linear.weight.dtype))
        norm.weight.fill_(1.0)


def rotated_weights(
    weights: dict[str, torch.Tensor],
    roles: RotationRoles,
    residual: torch.Tensor,
    head: torch.Tensor | None = None,
    mlp: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The rotated values of `roles.names()` given their values in `weights` (differentiable in the
    rotations: SpinQuant trains through it). `residual` [hidden, hidden], `head` [head_dim, head_dim]
    for the values and attention outputs, `mlp` [intermediate, intermediate] for down_proj's input."""
    out = {name: weights[name] @ residual for name in (*roles.embeddings, *roles.readers, *roles.writer_biases)}
    out.update({name: residual.T @ weights[name] for name in roles.writers})
    if head is not None:
        hd = roles.head_dim
        for name in roles.values:
            w = out.get(name, weights[name])
            out[name] = (head.T @ w.reshape(-1, hd, w.shape[-1])).reshape(w.shape)
        for name in roles.value_biases:
            out[name] = (weights[name].reshape(-1, hd) @ head).reshape(-1)
        for name in roles.attention_outputs:
            w = out.get(name, weights[name])
            out[name] = (w.reshape(w.shape[0], -1, hd) @ head).reshape(w.shape)
    if mlp is not None:
        for name in roles.mlp_outputs:
            out[name] = out.get(name, weights[name]) @ mlp
    return out


@torch.no_grad()
def fold_rotation(
    model: nn.Module,
    architecture: Architecture,
    residual: torch.Tensor,
    head: torch.Tensor | None = None,
    online_hadamard: bool = False,
) -> None:
    """Rotate a prepared model's weights in place (float64 products, stored in each weight's dtype),
    and give down_proj its online Hadamard when `online_hadamard`."""
    roles = roles_of(model, architecture)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    weights = {name: parameters[name].detach().double() for name in roles.names()}
    # The rotations are built on the CPU; the products run where the model lives.
    device = next(iter(weights.values())).device
    as_weights = lambda matrix: None if matrix is None else matrix.to(device, torch.float64)  # noqa: E731
    mlp = None
    if online_hadamard:
        mlp = online.online_factors(parameters[roles.mlp_outputs[0]].shape[1]).matrix()
    rotated = rotated_weights(weights, roles, as_weights(residual), as_weights(head), as_weights(mlp))
    for name, value in rotated.items():
        parameters[name].copy_(value.to(parameters[name].dtype))
    if online_hadamard:
        for name in roles.mlp_outputs:
            online.attach(model.get_submodule(name.removesuffix(".weight")))


def initial_rotations(model: nn.Module, architecture: Architecture, seed: int,
                      heads: bool) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """QuaRot's randomized Hadamard Q = H·diag(±1) for the residual stream and, when `heads`, one of
    head_dim for the values; with the construction used for each (logged by the callers)."""
    hidden, head_dim = model.config.hidden_size, roles_of(model, architecture).head_dim
    residual, how = orthogonal_rotation(hidden, seed)
    notes = [f"residual {hidden}: {how}"]
    head = None
    if heads:
        head, head_how = orthogonal_rotation(head_dim, seed + 1)
        notes.append(f"heads {head_dim}: {head_how}")
    return residual, head, notes
