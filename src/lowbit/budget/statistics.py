"""Statistics of a float model's planned linears for the budget: Hessians, output gradients, solutions.

One pass of the unquantized model over the calibration windows gives every shared input's Hessian
(and, on some windows, the loss gradients of the outputs); every candidate is then solved on every
layer from those Hessians. The sensitivity table and the evolutionary search's candidate bank both
start here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.budget.candidates import Candidate
from lowbit.calibrate.stats import HessianStats
from lowbit.formats.base import QuantizedWeight
from lowbit.models.architectures import Architecture
from lowbit.solvers import SOLVERS


@dataclass
class InputGroup:
    """Planned linears of one block that read the same input."""

    names: list[str]
    linears: list[nn.Linear]
    stats: HessianStats | None
    seen_this_batch: bool = False


def planned_groups(
    model: nn.Module, architecture: Architecture, is_planned: Callable[[str], bool]
) -> list[tuple[list[str], list[nn.Linear]]]:
    """(names, linears) of each shared-input group, in model order, keeping only planned layers."""
    groups = []
    for index, block in enumerate(architecture.block_list(model)):
        for members in architecture.linear_groups:
            names = [f"{architecture.blocks}.{index}.{name}" for name in members]
            kept = [(n, block.get_submodule(m)) for n, m in zip(names, members) if is_planned(n)]
            if kept:
                groups.append(([n for n, _ in kept], [linear for _, linear in kept]))
    return groups


def collect_statistics(
    model: nn.Module,
    groups: list[tuple[list[str], list[nn.Linear]]],
    calibration: torch.Tensor,
    fisher_samples: int,
    batch_size: int = 1,
) -> tuple[list[InputGroup], dict[str, torch.Tensor]]:
    """One pass of the float model: a Hessian per group input and, for the first `fisher_samples`
    windows, the mean squared loss gradient of every planned linear's outputs (per output row)."""
    device = next(model.parameters()).device
    stats = [InputGroup(names, linears, HessianStats(linears[0].in_features, device)) for names, linears in groups]
    grad_sq = {name: torch.zeros(linear.out_features, device=device) for names, linears in groups
               for name, linear in zip(names, linears)}
    grad_tokens = 0
    handles = []
    for group in stats:
        # q/k/v (or gate/up) see the same input: a hook on each member, counted once per forward.
        def input_hook(module, args, group=group):
            if not group.seen_this_batch:
                group.stats.add(args[0].detach())
                group.seen_this_batch = True

        for linear in group.linears:
            handles.append(linear.register_forward_pre_hook(input_hook))
        for name, linear in zip(group.names, group.linears):
            def accumulate(grad: torch.Tensor, name: str = name) -> None:  # returns None: grad unchanged
                grad_sq[name].add_(grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0))

            def output_hook(module, args, output, accumulate=accumulate):
                if output.requires_grad:
                    output.register_hook(accumulate)
            handles.append(linear.register_forward_hook(output_hook))
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(
        lambda module, args, output: output.requires_grad_(True) if torch.is_grad_enabled() else None))
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        starts = range(0, calibration.shape[0], batch_size)
        for start in tqdm(starts, desc="sensitivity statistics", unit="batch"):
            batch = calibration[start : start + batch_size].to(device)
            for group in stats:
                group.seen_this_batch = False
            with_grad = start < fisher_samples
            with torch.set_grad_enabled(with_grad):
                out = model(input_ids=batch, labels=batch if with_grad else None, use_cache=False)
                if with_grad:
                    # Loss summed over tokens, so every token's gradient has its own scale.
                    tokens = batch.shape[0] * (batch.shape[1] - 1)
                    (out.loss * tokens).backward()
                    grad_tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    fisher = {name: total / max(grad_tokens, 1) for name, total in grad_sq.items()} if grad_tokens else {}
    return stats, fisher


def stacked_device(stats: list[InputGroup]) -> torch.device:
    return stats[0].linears[0].weight.device


def solved_candidates(
    stats: list[InputGroup], candidates: list[Candidate], method_options: dict[str, dict], scale_dtype: str
) -> Iterator[tuple[InputGroup, Candidate, torch.Tensor, QuantizedWeight]]:
    """(group, candidate, stacked float weight, its solution) for every candidate that fits the group.

    The members of a group are solved stacked, as the pipeline solves them; each group's Hessian is
    freed once its last candidate is yielded. Progress is shown per group.
    """
    solvers = {m: SOLVERS[m](**method_options.get(m, {})) for m in sorted({c.method for c in candidates})}
    threads = torch.get_num_threads()
    if stacked_device(stats).type == "cpu":
        torch.set_num_threads(1)  # long chains of small ops: one thread is faster (see pipeline._solver_threads)
    try:
        for group in tqdm(stats, desc="solving candidates per layer", unit="group"):
            stacked = torch.cat([linear.weight.detach().float() for linear in group.linears])
            for candidate in candidates:
                if candidate.fits(stacked.shape[1]):
                    qweight = solvers[candidate.method].solve(stacked, candidate.format(scale_dtype), group.stats)
                    yield group, candidate, stacked, qweight
            group.stats = None  # free the Hessian
    finally:
        torch.set_num_threads(threads)
