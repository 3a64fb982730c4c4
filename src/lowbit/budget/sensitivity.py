"""How much each layer would hurt the model under each candidate setting.

For a linear y = W x with calibration Hessian H = 2/n Σ x xᵀ, quantizing W to Ŵ changes its outputs
by a mean squared amount ½ tr(ΔW H ΔWᵀ) (ΔW = W - Ŵ), row by row: e_r = (ΔW H ΔWᵀ)_rr. How much an
output error costs depends on where the layer sits, so each row's error is weighted by the mean
squared gradient of the loss with respect to that output, f_r = 1/n Σ_t (∂L/∂y_t,r)² (a diagonal
empirical Fisher of the outputs). Taking inputs and output gradients as independent (K-FAC's
assumption), the expected increase of the loss per token is

    damage ≈ ½ Σ_r f_r · ½ e_r = ¼ Σ_r f_r e_r,

which adds up across layers in one unit (nats per token), so a knapsack can trade them. Without
the gradient pass (`weighting="hessian"`) the damage is Σ_r e_r, each layer's own output error.

Statistics come from one pass of the unquantized model over the calibration windows (a backward
pass on the first `fisher_samples` of them); each candidate is then solved on every layer with the
same solver the plan will use (GPTQ on the float Hessian, or RTN), and ΔW is measured against the
undamped H. A table depends only on the model, the calibration tokens and the settings, so it is
cached on disk under a hash of them: a second budget on the same model is instant.

All Hessians of the model are held at once (a pass over the whole model, not block by block), which
is fine for models of up to a few billion parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.budget.candidates import Candidate
from lowbit.calibrate.stats import HessianStats
from lowbit.compare.cache import model_fingerprint, tensor_digest
from lowbit.formats.base import QuantizedWeight
from lowbit.models.architectures import Architecture
from lowbit.solvers import SOLVERS

CACHE_VERSION = 1
"""Bump when the numbers a table holds change meaning; older cached tables are then ignored."""

WEIGHTINGS = ("fisher", "hessian")


def default_cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit"
    return Path(root) / "sensitivity"


@dataclass
class SensitivityTable:
    """Estimated damage of every (layer, candidate) pair that can be stored, with layer shapes.

    `damage[layer][candidate.key]`; a candidate a layer cannot take (a group size that does not
    divide its width) is absent for that layer.
    """

    weighting: str
    shapes: dict[str, tuple[int, int]]
    damage: dict[str, dict[str, float]]
    seconds: float = 0.0
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.shapes)

    def to_json(self) -> dict:
        return {"weighting": self.weighting, "shapes": {k: list(v) for k, v in self.shapes.items()},
                "damage": self.damage, "seconds": self.seconds, "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict) -> SensitivityTable:
        shapes = {k: (int(v[0]), int(v[1])) for k, v in data["shapes"].items()}
        return cls(data["weighting"], shapes, data["damage"], data.get("seconds", 0.0), data.get("meta", {}))


@dataclass
class _Group:
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
) -> tuple[list[_Group], dict[str, torch.Tensor]]:
    """One pass of the float model: a Hessian per group input and, for the first `fisher_samples`
    windows, the mean squared loss gradient of every planned linear's outputs (per output row)."""
    device = next(model.parameters()).device
    stats = [_Group(names, linears, HessianStats(linears[0].in_features, device)) for names, linears in groups]
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


def stacked_device(stats: list[_Group]) -> torch.device:
    return stats[0].linears[0].weight.device


def row_errors(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(ΔW H ΔWᵀ)_rr for every row r: twice the mean squared error of that output."""
    delta = (weight - w_hat).double()
    return ((delta @ hessian.double()) * delta).sum(dim=1)


def solved_candidates(
    stats: list[_Group], candidates: list[Candidate], method_options: dict[str, dict], scale_dtype: str
) -> Iterator[tuple[_Group, Candidate, torch.Tensor, QuantizedWeight]]:
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


def measure_sensitivity(
    model: nn.Module,
    architecture: Architecture,
    calibration: torch.Tensor,
    candidates: list[Candidate],
    is_planned: Callable[[str], bool],
    *,
    weighting: str = "fisher",
    fisher_samples: int = 8,
    scale_dtype: str = "float16",
    method_options: dict[str, dict] | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 1,
) -> SensitivityTable:
    """The damage table of `candidates` on every planned linear, read from the cache when present.

    `method_options[method]` are the solver's options (e.g. GPTQ's damp), as the plan will use them.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if weighting == "fisher" and fisher_samples < 1:
        raise ValueError("fisher weighting needs at least one calibration window with gradients "
                         "(--fisher-samples >= 1), or use --weighting hessian")
    method_options = method_options or {}
    groups = planned_groups(model, architecture, is_planned)
    if not groups:
        raise ValueError("no layer to plan: the recipe's ignore list leaves none")
    description = {
        "version": CACHE_VERSION, "model": model_fingerprint(model), "calibration": tensor_digest(calibration),
        "candidates": [c.key for c in candidates], "weighting": weighting,
        "fisher_samples": fisher_samples if weighting == "fisher" else 0, "scale_dtype": scale_dtype,
        "options": {c.method: method_options.get(c.method, {}) for c in candidates},
        "layers": [name for names, _ in groups for name in names],
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = (cache_dir or default_cache_dir()) / f"{key}.json"
    if path.is_file():
        return SensitivityTable.from_json(json.loads(path.read_text()))

    start = time.perf_counter()
    stats, fisher = collect_statistics(
        model, groups, calibration, fisher_samples if weighting == "fisher" else 0, batch_size
    )
    table = SensitivityTable(weighting, {}, {})
    for names, linears in groups:
        for name, linear in zip(names, linears):
            table.shapes[name] = (linear.out_features, linear.in_features)
            table.damage[name] = {}
    hessians: dict[int, torch.Tensor] = {}  # the current group's, mirrored once
    for group, candidate, stacked, qweight in solved_candidates(stats, candidates, method_options, scale_dtype):
        if id(group) not in hessians:
            hessians = {id(group): group.stats.hessian}
        errors = row_errors(stacked, qweight.dequantize(), hessians[id(group)]).split([l.out_features for l in group.linears])
        for name, error in zip(group.names, errors):
            if weighting == "fisher":
                damage = 0.25 * float((fisher[name].double() * error).sum())
            else:
                damage = float(error.sum())
            table.damage[name][candidate.key] = damage
    table.seconds = time.perf_counter() - start
    table.meta = {"key": key, "calibration_windows": int(calibration.shape[0]),
                  "calibration_seq_len": int(calibration.shape[1]), "fisher_samples": description["fisher_samples"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(table.to_json()))
    temporary.replace(path)
    return table
