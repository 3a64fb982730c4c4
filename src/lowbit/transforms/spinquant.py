"""`spinquant`: rotations learned on calibration data (SpinQuant), then folded like QuaRot's.

The residual rotation R1 [hidden, hidden] and the value-head rotation R2 [head_dim, head_dim] start
from QuaRot's randomized Hadamards and are trained to make the *quantized* model match the
full-precision one: each step rotates the (norm-folded) weights, rounds every linear the recipe
quantizes to nearest in the recipe's own format with a straight-through gradient, and lowers the
KL divergence of the quantized model's next-token distribution from the original's. The online
Hadamard before down_proj (R4) stays fixed, as in SpinQuant.

Orthogonality is kept by construction: R = R0 · cayley(A) with A = P - Pᵀ skew-symmetric and
cayley(A) = (I - A)⁻¹ (I + A), which is orthogonal for every P, so Adam can update P freely. After
training the final R1, R2 are folded into the weights exactly as `quarot` folds its Hadamards, and
the recipe's solver (RTN, GPTQ, ...) then quantizes the rotated model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from lowbit.formats.base import quantize_matrix
from lowbit.models.architectures import Architecture
from lowbit.transforms import online
from lowbit.transforms.model import LayerFormats, ModelTransform, register_model_transform
from lowbit.transforms.rotate import fold_rotation, initial_rotations, module_name, prepare, roles_of, rotated_weights

logger = logging.getLogger(__name__)


def cayley(parameter: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix (I - A)⁻¹ (I + A) of the skew-symmetric A = P - Pᵀ (identity at P = 0)."""
    skew = parameter - parameter.T
    identity = torch.eye(parameter.shape[0], dtype=parameter.dtype, device=parameter.device)
    return torch.linalg.solve(identity - skew, identity + skew)


def straight_through_rtn(weight: torch.Tensor, fmt) -> torch.Tensor:
    """The weight rounded to nearest in `fmt` in the forward pass, the identity in the backward pass."""
    rounded = quantize_matrix(fmt, weight.detach()).dequantize().to(weight.dtype)
    return weight + (rounded - weight).detach()


@contextmanager
def _rotated_activations(model: nn.Module, inputs: dict[str, torch.Tensor],
                         outputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """x -> x·M on the inputs of the modules named in `inputs` and on the outputs of those in
    `outputs`, for the duration of a forward pass. Training uses it for what is cheaper to rotate
    as activations than as weights (the unquantized embeddings and lm_head: E[ids]·R1 and
    x·R1ᵀ·Wᵀ) and for the online Hadamard (the folded model gets OnlineHadamard modules instead)."""
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, m=matrix: (args[0] @ m.to(args[0].dtype), *args[1:])) for name, matrix in inputs.items()]
    handles += [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, m=matrix: out @ m.to(out.dtype)) for name, matrix in outputs.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@register_model_transform
@dataclass
class SpinQuant(ModelTransform):
    """Learned residual (and value-head) rotations, initialised from QuaRot's and trained briefly."""

    name: ClassVar[str] = "spinquant"
    needs_calibration: ClassVar[bool] = True

    steps: int = 8
    lr: float = 1e-3
    batch_size: int = 1
    max_tokens: int = 128
    """Tokens per calibration window used for training (windows are cut to this length: CPU cost)."""
    seed: int = 0
    heads: bool = True
    online: bool = True
    progress: bool = True
    losses: list[float] = field(default_factory=list, init=False, repr=False)
    """The training objective before each step (read by tests and logs)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.max_tokens < 2 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1, max_tokens >= 2 and lr > 0")

    def apply(self, model: nn.Module, architecture: Architecture, formats: LayerFormats,
              calibration: torch.Tensor | None) -> None:
        prepare(model, architecture)
        residual, head, notes = initial_rotations(model, architecture, self.seed, self.heads)
        logger.info("spinquant initial rotation: %s", "; ".join(notes))
        if self.steps:
            residual, head = self.train(model, architecture, formats, calibration, residual, head)
        fold_rotation(model, architecture, residual, head, online_hadamard=self.online)

    def train(self, model: nn.Module, architecture: Architecture, formats: LayerFormats, calibration: torch.Tensor,
              residual: torch.Tensor, head: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adam on the Cayley parameters; returns the trained rotations (float64)."""
        roles = roles_of(model, architecture)
        device = next(model.parameters()).device
        parameters = dict(model.named_parameters())
        quantized = {name: fmt for name in roles.readers + roles.writers + roles.values + roles.mlp_outputs
                     if (fmt := formats(name.removesuffix(".weight"),
                                        model.get_submodule(name.removesuffix(".weight")))) is not None}
        # The embeddings (and lm_head where it stays unquantized) are the largest matrices: rotating
        # their activations instead of their weights costs tokens x hidden² rather than vocab x hidden².
        embedding = roles.embeddings[0].removesuffix(".weight")
        head_name = module_name(model, model.get_output_embeddings())
        head_in_weights = f"{head_name}.weight" in quantized
        roles = replace(roles, embeddings=(),
                        readers=tuple(r for r in roles.readers if head_in_weights or r != f"{head_name}.weight"))
        base = {name: parameters[name].detach().float() for name in roles.names()}
        mlp = None
        if self.online:
            mlp = online.online_factors(base[roles.mlp_outputs[0]].shape[1]).matrix().float().to(device)
        r1_start = residual.float().to(device)
        r2_start = None if head is None else head.float().to(device)
        p1 = torch.zeros_like(r1_start, requires_grad=True)
        p2 = None if head is None else torch.zeros_like(r2_start, requires_grad=True)
        optimizer = torch.optim.Adam([p for p in (p1, p2) if p is not None], lr=self.lr)
        windows = calibration[:, : self.max_tokens].to(device)
        generator = torch.Generator().manual_seed(self.seed)
        self.losses.clear()
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        for _ in tqdm(range(self.steps), desc="spinquant", disable=not self.progress):
            ids = windows[torch.randint(0, windows.shape[0], (self.batch_size,), generator=generator)]
            with torch.no_grad():
                target = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            r1 = r1_start @ cayley(p1)
            r2 = None if p2 is None else r2_start @ cayley(p2)
            weights = rotated_weights(base, roles, r1, r2, mlp)
            weights.update({name: straight_through_rtn(weights[name], fmt) for name, fmt in quantized.items()})
            weights = {name: value.to(parameters[name].dtype) for name, value in weights.items()}
            inputs = {} if mlp is None else {name.removesuffix(".weight"): mlp for name in roles.mlp_outputs}
            if not head_in_weights:
                inputs[head_name] = r1.T
            with _rotated_activations(model, inputs, {embedding: r1}):
                logits = functional_call(model, weights, args=(), kwargs={"input_ids": ids}).logits
            loss = F.kl_div(F.log_softmax(logits.float(), dim=-1), target, log_target=True, reduction="batchmean")
            loss = loss / ids.shape[1]  # per token
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.losses.append(loss.item())
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        if self.losses:
            logger.info("spinquant KL per token: %.5f -> %.5f over %d steps", self.losses[0], self.losses[-1], self.steps)
        with torch.no_grad():
            r1 = (r1_start.double() @ cayley(p1.detach().double())).cpu()
            r2 = None if p2 is None else (r2_start.double() @ cayley(p2.detach().double())).cpu()
        return r1, r2
