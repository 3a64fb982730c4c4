"""How curved the loss is around each layer's weights: Hutchinson's estimate of the Hessian trace.

HAWQ-V2 ranks layers by the average eigenvalue of the loss Hessian with respect to their weights,
Tr(∇²_W L) / n, and predicts the loss increase of a perturbation ΔW as ½ · Tr/n · ||ΔW||². The trace
is estimated without forming the Hessian: for random signs v, E[vᵀ H v] = Tr(H), and H v is one
Hessian-vector product (a second backward pass through the gradient). One probe per calibration
window gives a usable estimate for ranking layers; more windows lower its variance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Fused attention kernels have no second derivative on CPU; the plain one does."""
    setter = getattr(model, "set_attn_implementation", None)
    previous = getattr(model.config, "_attn_implementation", None)
    if setter is None or previous in (None, "eager"):
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(previous)


def hutchinson_traces(
    model: nn.Module, names: list[str], calibration: torch.Tensor, windows: int, seed: int = 0
) -> dict[str, float]:
    """Mean Hessian diagonal Tr(∇²_W L)/numel(W) of the mean token loss for each named linear's weight.

    One Rademacher probe per window on the first `windows` calibration windows. The estimate can be
    negative (away from a minimum, or for a noisy estimate of a nearly flat direction); callers that
    need a curvature for ranking clamp it at zero.
    """
    if windows < 1:
        raise ValueError("the trace weighting needs at least one calibration window with probes")
    weights = [model.get_submodule(name).weight for name in names]
    device = weights[0].device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    totals = [0.0] * len(names)
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    used = calibration[:windows]
    try:
        with _eager_attention(model):
            for window in tqdm(used, desc="Hessian traces (Hutchinson)", unit="window"):
                ids = window[None].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                probes = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights]
                products = torch.autograd.grad(grads, weights, grad_outputs=probes)
                for index, (probe, product) in enumerate(zip(probes, products)):
                    totals[index] += float((probe * product).sum())
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return {name: total / len(used) / w.numel() for name, total, w in zip(names, totals, weights)}
